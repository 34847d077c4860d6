// l1fx CPU kernels: the l1 ("adder") linear core and its MGS backward.
//
//   forward   y[n,m]  = bias[m] - sum_k |x[n,k] - w[m,k]|
//   input     gx[n,k] = sum_m g[n,m] * (a*clamp(w-x,-1,1) + b*sign(w-x))
//   weight    gw[m,k] = sum_n g[n,m] * (a*(x-w) + b*sign(x-w))
//
// with a = mix, b = 1 - mix. Convolutions (N-d as 3-d) have direct kernels:
// the forward as an implicit GEMM (reading patches from per-thread copies of
// the input lines a tile of output rows needs when the last axis has stride 1,
// else from patch tiles packed from NC(D)HW x), the input gradient for stride
// 1 (vectorised along input lines, reducing over filters and kernel offsets)
// and the weight gradient (patch tiles packed per thread, reduced in registers).
//
// Exactness first: every summand is formed from the difference x - w itself,
// rounded once to float32 (|fl(x - w)| for the forward: sub, AND off the sign
// bit, FMA), so each output is within ~(T + 2) eps sum_t |term_t| of the exact
// value for T terms, whatever the offset or spread of the data (for the
// forward without bias that is (K + 2) eps |y|). Cheaper identities whose
// terms grow with the data's offset (|x - w| = x + w - 2 min(x, w), centring,
// g^T x - w * colsum(g)) are not used. NaN/inf follow the formula per element,
// as the reference kernel computes it (sign(NaN) = 0, as torch.sign on CPU).
//
// Written like a GEMM: weights are repacked once, a register tile of rows x
// filters (or rows x k) is accumulated with the reduced dimension innermost,
// and rows are processed in blocks copied (and converted from bfloat16) into
// small per-thread float buffers. No N x M x K tensor exists; the extra memory
// is the packed weights plus a few row blocks per thread (plus, for the weight
// gradient, one M x K accumulator per thread). Accumulation is float32 for
// both dtypes.
//
// Plain C ABI (called through ctypes) and GCC/Clang vector extensions, so the
// file needs no PyTorch headers and compiles in a few seconds. The vector
// width follows the compile target (-march=native where available).
// Threads: OpenMP. Loaded into a process where torch already loaded its
// libgomp, the dynamic linker reuses that runtime (same SONAME), so the l1
// kernels and torch share one thread pool.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register (32 registers)
constexpr int FWD_R = 8, FWD_FV = 2;  // forward tile: 8 rows x 2 vectors of filters (M <= 32, conv)
constexpr int WIDE_R = 6, WIDE_FV = 4;  // forward tile for M > 32: fewer broadcasts per min+FMA
constexpr int CONV_MT = 4, CONV_PV = 4;  // conv forward tile (packed): 4 filters x 4 vectors of positions
constexpr int GX1_R = 4, GX1_KV = 2;  // input grad, mix 1: 4 rows x 2 vectors of k
constexpr int GXS_R = 4, GXS_KV = 2;  // input grad, mix 0
constexpr int GXB_R = 4, GXB_KV = 2;  // input grad, blended mix (acc + x per tile element)
constexpr int GW_KB = 4, GW_FV = 2;   // sign sum: 4 k x 2 vectors of filters
#else
constexpr int VW = 8;  // AVX2 / NEON-pairs: 16 registers
constexpr int FWD_R = 4, FWD_FV = 2;
constexpr int WIDE_R = 4, WIDE_FV = 2;
constexpr int CONV_MT = 3, CONV_PV = 3;
constexpr int GX1_R = 2, GX1_KV = 1;
constexpr int GXS_R = 2, GXS_KV = 2;
constexpr int GXB_R = 1, GXB_KV = 2;
constexpr int GW_KB = 2, GW_FV = 1;
#endif

// Linear forwards with K up to this take forward_direct (no row packing).
constexpr int FWD_DIRECT_MAX_K = 16;
constexpr int CONV_PW = CONV_PV * VW;  // positions per conv panel
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

// a - 0.0f folds away (a + 0.0f would not: -0.0f + 0.0f == +0.0f), leaving one broadcast.
inline vf splat(float a) { return a - vf{}; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// a < b ? a : b and a > b ? a : b (b when either is NaN): MINPS / MAXPS. Spelled
// with intrinsics on AVX-512, where GCC 12 leaves the vector select as compare + blend.
inline vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
  if (VW == 16) {
    __m512 x, y;
    std::memcpy(&x, &a, sizeof x);
    std::memcpy(&y, &b, sizeof y);
    x = _mm512_min_ps(x, y);
    std::memcpy(&a, &x, sizeof a);
    return a;
  }
#endif
  return a < b ? a : b;
}
inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  if (VW == 16) {
    __m512 x, y;
    std::memcpy(&x, &a, sizeof x);
    std::memcpy(&y, &b, sizeof y);
    x = _mm512_max_ps(x, y);
    std::memcpy(&a, &x, sizeof a);
    return a;
  }
#endif
  return a > b ? a : b;
}
// |a|: clear the sign bit (one AND, any FP pipe); NaN stays NaN, -inf -> inf.
inline vf vabs(vf a) { return (vf)((vi)a & (vi{} + 0x7fffffff)); }
// |x - w|, rounded once: the exact summand of the forward.
inline vf absdiff(vf x, vf w) { return vabs(x - w); }
// HardTanh, NaN-propagating like torch.clamp: MINPS/MAXPS return their second
// operand (d) when either is NaN.
inline vf clamp1(vf d) { return vmax(vf{} - 1.0f, vmin(vf{} + 1.0f, d)); }
// The same for a d that is not NaN (x and w all finite: a difference of finite
// floats is finite or +-inf, never NaN). AVX-512DQ: one VRANGEPS (the operand of
// smaller magnitude, d or 1, with d's sign: d for |d| < 1, else +-1; -0 stays
// -0), ~1.3x faster in the input-gradient loops than MINPS + MAXPS. VRANGEPS
// returns the other operand for a NaN, hence only for finite data.
template <bool FIN>
inline vf clamp1_(vf d) {
#if defined(__AVX512DQ__)
  if (FIN && VW == 16) {
    __m512 r;
    std::memcpy(&r, &d, sizeof r);
    r = _mm512_range_ps(r, _mm512_set1_ps(1.0f), 0x02);  // imm: min |.|, sign of src1
    std::memcpy(&d, &r, sizeof d);
    return d;
  }
#endif
  return clamp1(d);
}

// Whether every value is finite (no NaN, no +-inf).
inline bool all_finite(const float* p, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, 4);
    bad |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}
inline bool all_finite(const uint16_t* p, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= uint32_t((p[i] & 0x7f80u) == 0x7f80u);
  return bad == 0;
}

// acc + t * g in the lanes of mask (bits m, or lanes of `lanes` != 0), acc
// elsewhere: those lanes get no term at all (not 0 * t, which is NaN for a NaN
// t). One masked FMA on AVX-512.
inline vf fma_lanes(vf acc, vf t, vf g, uint32_t m, vi lanes) {
#if defined(__AVX512F__)
  if (VW == 16) {
    __m512 a, b, c;
    std::memcpy(&a, &t, sizeof a);
    std::memcpy(&b, &g, sizeof b);
    std::memcpy(&c, &acc, sizeof c);
    c = _mm512_mask3_fmadd_ps(a, b, c, __mmask16(m));
    std::memcpy(&acc, &c, sizeof acc);
    return acc;
  }
#endif
  (void)m;
  return acc + (vf)((vi)(t * g) & lanes);
}
// torch.sign on CPU: -1, 0, +1, and 0 for NaN (it is (0 < d) - (d < 0)), as the
// reference kernel computes it. sign(fl(x - w)) is the exact sign of x - w (a
// float difference is 0 only when x == w).
inline vf vsign(vf d) {
#if defined(__AVX512F__)
  if (VW == 16) {  // one VFIXUPIMMPS: per class of d, NaN/zero -> +0, negative/-inf -> -1, positive/+inf/+1 -> +1
    __m512 r, in;
    std::memcpy(&in, &d, sizeof in);
    r = _mm512_fixupimm_ps(in, in, _mm512_set1_epi32(int32_t(0xA9A9A888u)), 0);
    vf v;
    std::memcpy(&v, &r, sizeof v);
    return v;
  }
#endif
  const vf pone = vf{} + 1.0f, mone = vf{} - 1.0f;
  return d > vf{} ? pone : d < vf{} ? mone : vf{};
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// A 1.0f the compiler cannot see, so `acc + v * one` stays an FMA (FMA ports)
// instead of being folded into an add (adder ports, already busy with min/max).
volatile float kOpaqueOne = 1.0f;

// ---------------------------------------------------------------- dtypes
// T = float (float32) or uint16_t (bfloat16 bits).
inline float to_f(float v) { return v; }
inline float to_f(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void from_f(float v, float* dst) { *dst = v; }
inline void from_f(float v, uint16_t* dst) {  // round to nearest even, like torch
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) { *dst = uint16_t((u >> 16) | 0x40); return; }  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  *dst = uint16_t(u >> 16);
}

// Rows [n0, n0+rows) of a [*, cols] matrix into a float buffer [rows_pad, cols_pad], zero padded.
template <typename T>
void pack_rows(const T* src, int64_t cols, int64_t n0, int64_t rows, int64_t rows_pad, int64_t cols_pad, float* dst) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    float* d = dst + r * cols_pad;
    if (r < rows) {
      const T* src_row = src + (n0 + r) * cols;
      for (int64_t c = 0; c < cols; ++c) d[c] = to_f(src_row[c]);
    }
    for (int64_t c = r < rows ? cols : 0; c < cols_pad; ++c) d[c] = 0.f;
  }
}

// Packed weights, float32, as [M, K_pad] (rows) and/or [K_pad, M_pad]
// (transposed, filters contiguous), zero padded.
struct PackedW {
  std::vector<float> rows, cols;
};

template <typename T>
PackedW pack_w(const T* w, int64_t M, int64_t K, int64_t M_pad, int64_t K_pad, bool want_rows, bool want_cols) {
  PackedW p;
  if (want_rows) p.rows.assign(size_t(M * K_pad), 0.f);
  if (want_cols) p.cols.assign(size_t(K_pad * M_pad), 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const float v = to_f(w[m * K + k]);
      if (want_rows) p.rows[size_t(m * K_pad + k)] = v;
      if (want_cols) p.cols[size_t(k * M_pad + m)] = v;
    }
  return p;
}

int threads_for(int64_t work_items, int nthreads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(nthreads, work_items)));
}

// ---------------------------------------------------------------- forward
// y = bias - acc, acc = sum_k |x - w| (each difference rounded once, summands >= 0,
// so the float32 error is at most ~K eps |acc|, whatever the offset of the data).
// Weights as panels of F = FWD_FV*VW filters: panel p is [K, F] contiguous.
// Rows are packed GEMM-style into micro-panels of FWD_R rows, [K][FWD_R]
// contiguous, so the register tile streams both operands in memory order.
struct FwdPanels {
  int64_t n_panels = 0;
  std::vector<float> wp, col_term;  // col_term[m] = bias[m] (0 without bias)
};

template <int FV, typename T>
FwdPanels fwd_panels(const T* w, const T* bias, int64_t M, int64_t K) {
  constexpr int F = FV * VW;
  FwdPanels fp;
  fp.n_panels = (M + F - 1) / F;
  const int64_t M_pad = fp.n_panels * F;
  PackedW pw = pack_w(w, M, K, M_pad, K, false, true);
  fp.wp.resize(size_t(fp.n_panels * K * F));  // [K, M_pad] -> panels [p][K][F]
  for (int64_t p = 0; p < fp.n_panels; ++p)
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(&fp.wp[size_t((p * K + k) * F)], &pw.cols[size_t(k * M_pad + p * F)], F * sizeof(float));
  fp.col_term.assign(size_t(M_pad), 0.f);
  for (int64_t m = 0; m < M; ++m) fp.col_term[size_t(m)] = bias ? to_f(bias[m]) : 0.f;
  return fp;
}

// One R x F register tile (F = FV*VW): xp is a micro-panel [K][R], wpp a
// panel [K][F]; out[r][f] = y.
template <int R, int FV>
inline void fwd_micro(const float* xp, const float* wpp, const float* col_term, int64_t K, float out[R][FV * VW]) {
  constexpr int F = FV * VW;
  const vf one = splat(kOpaqueOne);
  vf acc[R][FV];
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < FV; ++f) acc[r][f] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf wv[FV];
    for (int f = 0; f < FV; ++f) wv[f] = load(wpp + k * F + f * VW);
    for (int r = 0; r < R; ++r) {
      const vf xv = splat(xp[k * R + r]);
      for (int f = 0; f < FV; ++f) acc[r][f] = acc[r][f] + absdiff(xv, wv[f]) * one;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < FV; ++f) store(out[r] + f * VW, load(col_term + f * VW) - acc[r][f]);
}

// Rows [n0, n0+rows) of x [*, K] into micro-panels of R rows (zero padded to a multiple of R).
template <int R, typename T>
void pack_row_panels(const T* x, int64_t K, int64_t n0, int64_t rows, float* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const T* src[R];
    const int live = int(std::min<int64_t>(R, rows - r0));
    for (int j = 0; j < R; ++j) src[j] = x + (n0 + r0 + std::min(j, live - 1)) * K;
    float* d = dst + r0 * K;
    for (int64_t k = 0; k < K; ++k)  // one micro-panel row: R rows' k-th values
      for (int j = 0; j < R; ++j) d[k * R + j] = j < live ? to_f(src[j][k]) : 0.f;
  }
}

template <int R, int FV, typename T>
void forward(const T* x, const T* w, const T* bias, T* y, int64_t N, int64_t K, int64_t M, int nthreads) {
  constexpr int F = FV * VW;
  const FwdPanels fp = fwd_panels<FV>(w, bias, M, K);
  const int64_t n_panels = fp.n_panels;
  // Row blocks small enough that a block of x stays in L2 next to a panel.
  const int64_t NB = std::max<int64_t>(R, std::min<int64_t>(256, 16384 / std::max<int64_t>(K, 1)) / R * R);
  const int64_t n_blocks = (N + NB - 1) / NB;
  // Split the panels too when there are few row blocks, to feed every thread.
  const int64_t groups = std::min<int64_t>(n_panels, std::max<int64_t>(1, (4 * nthreads + n_blocks - 1) / n_blocks));
  const int64_t per_group = (n_panels + groups - 1) / groups;
  const int64_t items = n_blocks * groups;

#pragma omp parallel num_threads(threads_for(items, nthreads))
  {
    std::vector<float> xb(static_cast<size_t>(NB * K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t blk = it / groups, grp = it % groups;
      const int64_t n0 = blk * NB, rows = std::min(NB, N - n0);
      pack_row_panels<R>(x, K, n0, rows, xb.data());
      const int64_t p1 = std::min(n_panels, (grp + 1) * per_group);
      for (int64_t p = grp * per_group; p < p1; ++p) {
        const int64_t m0 = p * F, mcols = std::min<int64_t>(F, M - m0);
        for (int64_t r0 = 0; r0 < rows; r0 += R) {
          float out[R][F];
          fwd_micro<R, FV>(&xb[size_t(r0 * K)], &fp.wp[size_t(p * K * F)], &fp.col_term[size_t(m0)], K, out);
          for (int r = 0; r < R && r0 + r < rows; ++r) {
            T* yr = y + (n0 + r0 + r) * M + m0;
            if (std::is_same<T, float>::value && mcols == F)
              std::memcpy(yr, out[r], sizeof out[r]);  // whole vectors
            else
              for (int64_t c = 0; c < mcols; ++c) from_f(out[r][c], yr + c);
          }
        }
      }
    }
  }
}

inline vf load_masked(const float* p, int64_t lo, int64_t hi);  // defined with the conv kernels

// Small K (the first layer of a point network: xyz + features, K <= 16): the
// scalar packing of x into micro-panels and the stack round trip of each
// output tile cost about as much as the K min+FMA steps themselves (at K = 1
// they were ~0.23 of 0.29 ms per 32768 x 64 output on one Zen 4 core). Here
// each register tile copies its R rows (R*K consecutive values) with a few
// whole-vector moves into a stack buffer, broadcasts from it, and
// stores whole tiles straight to y, so x is read once and each output row is
// written once, in order; each thread owns a contiguous range of rows.
template <int R, int FV, typename T>
inline void fwd_direct_tile(const T* xrows, const float* wp, const float* col_term, int64_t K, int64_t n_panels,
                            int64_t M, int live, T* yrow) {
  constexpr int F = FV * VW;
  const vf one = splat(kOpaqueOne);
  // Small K: the tile's R rows are R*K consecutive values, copied (as float32)
  // into xs. Larger K (float32 only): broadcast straight from the rows of x
  // (R sequential streams; no packed copy of x at all).
  float xs[R * FWD_DIRECT_MAX_K + VW];
  const float* xr[R];
  const bool in_place = K > FWD_DIRECT_MAX_K;
  for (int r = 0; r < R; ++r)  // a tail tile repeats its last live row
    xr[r] = in_place ? reinterpret_cast<const float*>(xrows) + std::min(r, live - 1) * K : xs + r * K;
  const int64_t RK = in_place ? 0 : live * K;
  if (in_place) {
  } else if (std::is_same<T, float>::value) {
    const float* xf = reinterpret_cast<const float*>(xrows);
    int64_t i = 0;
    for (; i + VW <= RK; i += VW) store(xs + i, load(xf + i));
    if (i < RK) store(xs + i, load_masked(xf + i, 0, RK - i));
  } else {
    for (int64_t i = 0; i < RK; ++i) xs[i] = to_f(xrows[i]);
  }
  if (!in_place)
    for (int64_t i = RK; i < R * K; ++i) xs[i] = xs[i - K];  // tail tile: repeat the last live row
  for (int64_t p = 0; p < n_panels; ++p) {
    const float* wpp = wp + p * K * F;
    vf acc[R][FV];
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < FV; ++f) acc[r][f] = vf{};
    for (int64_t k = 0; k < K; ++k) {
      vf wv[FV];
      for (int f = 0; f < FV; ++f) wv[f] = load(wpp + k * F + f * VW);
      for (int r = 0; r < R; ++r) {
        const vf xv = splat(xr[r][k]);
        for (int f = 0; f < FV; ++f) acc[r][f] = acc[r][f] + absdiff(xv, wv[f]) * one;
      }
    }
    const int64_t m0 = p * F, mcols = std::min<int64_t>(F, M - m0);
    if (std::is_same<T, float>::value && live == R && mcols == F) {  // whole tile: straight to y
      for (int r = 0; r < R; ++r)
        for (int f = 0; f < FV; ++f)
          store(reinterpret_cast<float*>(yrow + r * M + m0) + f * VW, load(col_term + m0 + f * VW) - acc[r][f]);
    } else {  // edge tile or bfloat16: through a small buffer
      float out[R][F];
      for (int r = 0; r < R; ++r)
        for (int f = 0; f < FV; ++f)
          store(out[r] + f * VW, load(col_term + m0 + f * VW) - acc[r][f]);
      for (int r = 0; r < live; ++r)
        for (int64_t c = 0; c < mcols; ++c) from_f(out[r][c], yrow + r * M + m0 + c);
    }
  }
}

template <int R, int FV, typename T>
void forward_direct(const T* x, const T* w, const T* bias, T* y, int64_t N, int64_t K, int64_t M, int nthreads) {
  const FwdPanels fp = fwd_panels<FV>(w, bias, M, K);
  const int64_t tiles = (N + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(threads_for(tiles, nthreads))
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * R;
    const int live = int(std::min<int64_t>(R, N - n0));
    fwd_direct_tile<R, FV>(x + n0 * K, fp.wp.data(), fp.col_term.data(), K, fp.n_panels, M, live, y + n0 * M);
  }
}

// Wider filter panels broadcast each x value to more filters (6x4 runs the
// inner loop ~10-20% faster than 8x2 on Zen 4) but waste lanes when M is small.
template <typename T>
void forward_dispatch(const T* x, const T* w, const T* bias, T* y, int64_t N, int64_t K, int64_t M, int nthreads) {
  // float32 rows are read in place by forward_direct for any K (the packed
  // path's scalar transposition of x and its stack round trip of each output
  // tile cost ~15% at K = 64); bfloat16 rows need converting, so K > 16 packs.
  const bool direct = K <= FWD_DIRECT_MAX_K || std::is_same<T, float>::value;
  if (direct && M > FWD_FV * VW)
    forward_direct<WIDE_R, WIDE_FV>(x, w, bias, y, N, K, M, nthreads);
  else if (direct)
    forward_direct<FWD_R, FWD_FV>(x, w, bias, y, N, K, M, nthreads);
  else if (M > FWD_FV * VW)
    forward<WIDE_R, WIDE_FV>(x, w, bias, y, N, K, M, nthreads);
  else
    forward<FWD_R, FWD_FV>(x, w, bias, y, N, K, M, nthreads);
}

// ---------------------------------------------------------------- direct conv forward
// Implicit GEMM: the rows are output positions, packed per tile straight from
// the NC(D)HW input into the micro-panel layout (no im2col tensor, no
// channels-last copy); K = (channel, kd, kh, kw), the weight's own order.
// 1-D and 2-D convs come in as 3-D with leading size-1 dims.
struct ConvGeom {
  int64_t B, C, M, G;
  int64_t in[3], ker[3], st[3], pad[3], dil[3], out[3];
  int64_t Cg() const { return C / G; }
  int64_t Mg() const { return M / G; }
  int64_t kvol() const { return ker[0] * ker[1] * ker[2]; }
  int64_t Kg() const { return Cg() * kvol(); }
  int64_t P() const { return out[0] * out[1] * out[2]; }
  int64_t S() const { return in[0] * in[1] * in[2]; }
};

// v[j] = p[j] for j in [lo, hi), else 0; p[j] outside is never read.
inline vf load_masked(const float* p, int64_t lo, int64_t hi) {
#if defined(__AVX512F__)
  if (VW == 16) {  // one masked load (no fault, no store-forwarding stall)
    const __mmask16 mask = __mmask16(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    const __m512 r = _mm512_maskz_loadu_ps(mask, p);
    vf v;
    std::memcpy(&v, &r, sizeof v);
    return v;
  }
#endif
  float t[VW] = {};
  for (int64_t j = lo; j < hi; ++j) t[j] = p[j];
  return load(t);
}
inline vf load_masked(const uint16_t* p, int64_t lo, int64_t hi) {
  float t[VW] = {};
  for (int64_t j = lo; j < hi; ++j) t[j] = to_f(p[j]);
  return load(t);
}
inline vf load_full(const float* p) { return load(p); }
inline vf load_full(const uint16_t* p) {
  float t[VW];
  for (int j = 0; j < VW; ++j) t[j] = to_f(p[j]);
  return load(t);
}

// ---- packed conv forward: channel slices of the patches, vector packer
// A work item is a panel of CONV_PW consecutive output positions (b, group
// fixed). Its patches are packed a slice of CS channels at a time (KS = CS *
// kvol values per position, a [KS][CONV_PW] panel of at most ~32 KiB, in L1),
// the register tiles reduce over the slice, and their sums are carried to
// the next slice in a [Mg][CONV_PW] buffer (the sum over k stays in k order).
// Per thread that is ~40 KiB whatever K is; float32 weights are read in place
// (bfloat16 ones converted once), so the forward's extra memory is far below
// its output even for small layers (stride 2 on a 16^3 grid: a 128 KiB output).

// The positions of one vector of a panel as runs on output lines: lanes
// [lo, hi) are positions ow0 .. ow0 + hi - lo - 1 of line (od, oh).
struct PosRun {
  int lo, hi;
  int64_t od, oh, ow0;
};
constexpr int MAX_RUNS = VW;  // at most one run per lane

inline int position_runs(const ConvGeom& cg, int64_t pos, int64_t n, PosRun* runs) {
  int nr = 0;
  for (int64_t l = 0; l < n;) {
    const int64_t p = pos + l, ow = p % cg.out[2], oh = (p / cg.out[2]) % cg.out[1], od = p / (cg.out[2] * cg.out[1]);
    const int64_t len = std::min(n - l, cg.out[2] - ow);
    runs[nr++] = PosRun{int(l), int(l + len), od, oh, ow};
    l += len;
  }
  return nr;
}

// One run's reads for one kernel offset: lane l (in mask m) reads channel
// line xc[off + l * st] (xc = the channel's first value); ma/mb: the even
// elements of the two vectors at xc + off (lanes 0-7 / 8-15) for stride 2.
struct RunLoad {
  int64_t off;
  uint32_t m, ma, mb;
};

// The reads of kernel offset (kd, kh, kw) for one vector's runs, one per run
// (so the packer's loops do not depend on the data): lanes outside the input
// (padding) are left out of the masks, so they read as 0; a run whose line is
// padding gets empty masks (a masked load with an empty mask reads nothing).
inline int run_loads(const ConvGeom& cg, const PosRun* rv, int nr, int64_t kd, int64_t kh, int64_t kw, RunLoad* out) {
  const int64_t st = cg.st[2];
  for (int r = 0; r < nr; ++r) {
    RunLoad& e = out[r];
    e.off = 0;
    e.m = e.ma = e.mb = 0;
    const int64_t id = rv[r].od * cg.st[0] - cg.pad[0] + kd * cg.dil[0];
    const int64_t ih = rv[r].oh * cg.st[1] - cg.pad[1] + kh * cg.dil[1];
    if (id < 0 || id >= cg.in[0] || ih < 0 || ih >= cg.in[1]) continue;
    const int64_t base = rv[r].ow0 * st - cg.pad[2] + kw * cg.dil[2];  // input index of lane lo
    // Lanes l in [lo, hi) with 0 <= base + (l - lo) * st < in2.
    const int64_t first = base >= 0 ? 0 : (-base + st - 1) / st;
    const int64_t last = base >= cg.in[2] ? -1 : (cg.in[2] - 1 - base) / st;
    const int llo = int(std::min<int64_t>(rv[r].hi, rv[r].lo + first));
    const int lhi = int(std::min<int64_t>(rv[r].hi, rv[r].lo + last + 1));
    if (lhi <= llo) continue;
    e.off = (id * cg.in[1] + ih) * cg.in[2] + base - rv[r].lo * st;
    e.m = ((lhi >= 32 ? 0u : (1u << lhi)) - 1u) & ~((1u << llo) - 1u);
#if defined(__AVX512F__)
    e.ma = _pdep_u32(e.m & 0xFFu, 0x5555u);
    e.mb = _pdep_u32((e.m >> 8) & 0xFFu, 0x5555u);
#endif
  }
  return nr;
}

// The VW patch values of one vector for one (channel, kernel offset).
inline vf gather_runs(const float* xc, const RunLoad* e, int ne, int64_t st) {
#if defined(__AVX512F__)
  if (VW == 16 && st <= 2) {
    __m512 r = _mm512_setzero_ps();
    if (st == 1) {  // one masked load per run
      for (int i = 0; i < ne; ++i) r = _mm512_mask_loadu_ps(r, __mmask16(e[i].m), xc + e[i].off);
    } else {  // the even elements of two vectors per run, merged, then one permute
      __m512 A = _mm512_setzero_ps(), B = _mm512_setzero_ps();
      for (int i = 0; i < ne; ++i) {
        A = _mm512_mask_loadu_ps(A, __mmask16(e[i].ma), xc + e[i].off);
        B = _mm512_mask_loadu_ps(B, __mmask16(e[i].mb), xc + e[i].off + 16);
      }
      const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      r = _mm512_permutex2var_ps(A, idx, B);
    }
    vf v;
    std::memcpy(&v, &r, sizeof v);
    return v;
  }
#endif
  vf v = vf{};
  for (int i = 0; i < ne; ++i)
    for (int l = 0; l < VW; ++l)
      if (e[i].m >> l & 1u) v[l] = xc[e[i].off + l * st];
  return v;
}
inline vf gather_runs(const uint16_t* xc, const RunLoad* e, int ne, int64_t st) {
  vf v = vf{};
  for (int i = 0; i < ne; ++i)
    for (int l = 0; l < VW; ++l)
      if (e[i].m >> l & 1u) v[l] = to_f(xc[e[i].off + l * st]);
  return v;
}

// The reads that pack one panel of CONV_PW positions: per vector v and kernel
// offset q, loads[(v * kvol + q) * mr ...] (n_loads[v * kvol + q] of them, one
// per run of the vector's positions on an output line; a vector of VW
// positions spans at most mr lines). Planned once per panel, used for every
// channel (slice).
struct PanelReads {
  int64_t kv = 0, mr = 0;
  std::vector<RunLoad> loads;
  std::vector<int> n_loads;

  explicit PanelReads(const ConvGeom& cg)
      : kv(cg.kvol()), mr(std::min<int64_t>(VW, (VW - 1) / std::max<int64_t>(cg.out[2], 1) + 2)),
        loads(static_cast<size_t>(CONV_PV * kv * mr)), n_loads(static_cast<size_t>(CONV_PV * kv)) {}

  // Positions [pos0, pos0 + rows) (rows <= CONV_PW; vectors past them read zeros).
  void plan(const ConvGeom& cg, int64_t pos0, int64_t rows) {
    PosRun runs[MAX_RUNS];
    for (int v = 0; v < CONV_PV; ++v) {
      const int nr = position_runs(cg, pos0 + v * VW, std::max<int64_t>(0, std::min<int64_t>(VW, rows - v * VW)), runs);
      for (int64_t kd = 0, q = 0; kd < cg.ker[0]; ++kd)
        for (int64_t kh = 0; kh < cg.ker[1]; ++kh)
          for (int64_t kw = 0; kw < cg.ker[2]; ++kw, ++q)
            n_loads[size_t(v * kv + q)] = run_loads(cg, runs, nr, kd, kh, kw, &loads[size_t((v * kv + q) * mr)]);
    }
  }
};

// Patch values of channels [c0, c1) of a planned panel into dst [(c - c0) * kvol + q][CONV_PW].
template <typename T>
void pack_conv_slice(const T* x, const ConvGeom& cg, int64_t b, int64_t g, const PanelReads& pr, int64_t c0,
                     int64_t c1, float* dst) {
  const int64_t kv = cg.kvol(), S = cg.S();
  const T* xg = x + (b * cg.C + g * cg.Cg()) * S;
  for (int v = 0; v < CONV_PV; ++v)
    for (int64_t q = 0; q < kv; ++q) {
      const RunLoad* e = &pr.loads[size_t((v * kv + q) * pr.mr)];
      const int ne = pr.n_loads[size_t(v * kv + q)];
      float* d = dst + q * CONV_PW + v * VW;
      for (int64_t c = c0; c < c1; ++c) store(d + (c - c0) * kv * CONV_PW, gather_runs(xg + c * S, e, ne, cg.st[2]));
    }
}

// CONV_MT filters (rows wr[i], K-contiguous, offset to the slice) x the first
// PV of the CONV_PV vectors of positions over KS patch values; acc carries the
// sums in and out. A panel's last tile runs only the vectors it has positions
// in (216 outputs per sample, 6^3, fill 14 of 16 vectors, not 16).
template <int PV>
inline void conv_micro(const float* xp, const float* const* wr, int64_t KS, vf acc[CONV_MT][CONV_PV]) {
  const vf one = splat(kOpaqueOne);
  for (int64_t k = 0; k < KS; ++k) {
    vf xv[PV];
    for (int v = 0; v < PV; ++v) xv[v] = load(xp + k * CONV_PW + v * VW);
    for (int i = 0; i < CONV_MT; ++i) {
      const vf wb = splat(wr[i][k]);
      for (int v = 0; v < PV; ++v) acc[i][v] = acc[i][v] + absdiff(xv[v], wb) * one;
    }
  }
}
inline void conv_micro_dispatch(int pv, const float* xp, const float* const* wr, int64_t KS,
                                vf acc[CONV_MT][CONV_PV]) {
  static_assert(CONV_PV <= 4, "add cases below");
  switch (pv) {
    case 1: return conv_micro<1>(xp, wr, KS, acc);
    case 2: return conv_micro<2 <= CONV_PV ? 2 : CONV_PV>(xp, wr, KS, acc);
    case 3: return conv_micro<3 <= CONV_PV ? 3 : CONV_PV>(xp, wr, KS, acc);
    default: return conv_micro<CONV_PV>(xp, wr, KS, acc);
  }
}

template <typename T>
void conv_forward_packed(const T* x, const T* w, const T* bias, T* y, const ConvGeom& cg, int nthreads) {
  const int64_t K = cg.Kg(), Mg = cg.Mg(), P = cg.P(), kv = cg.kvol(), Cg = cg.Cg();
  // float32 weights are used in place; bfloat16 ones converted once to [M][K].
  std::vector<float> wconv;
  const float* wf;
  if (std::is_same<T, float>::value) {
    wf = reinterpret_cast<const float*>(w);
  } else {
    wconv.resize(size_t(cg.M * K));
    for (int64_t i = 0; i < cg.M * K; ++i) wconv[size_t(i)] = to_f(w[i]);
    wf = wconv.data();
  }
  // Channels per slice: a [CS * kvol][CONV_PW] panel of at most ~32 KiB.
  const int64_t CS = std::max<int64_t>(1, std::min<int64_t>(Cg, (8192 / CONV_PW) / std::max<int64_t>(kv, 1)));
  const int64_t n_slices = (Cg + CS - 1) / CS;
  const int64_t n_mb = (Mg + CONV_MT - 1) / CONV_MT;
  const int64_t n_tiles = (P + CONV_PW - 1) / CONV_PW;
  const int64_t items = cg.B * cg.G * n_tiles;
#pragma omp parallel num_threads(threads_for(items, nthreads))
  {
    std::vector<float> xb(static_cast<size_t>(CS * kv * CONV_PW));
    std::vector<vf> carry(static_cast<size_t>(n_slices > 1 ? n_mb * CONV_MT * CONV_PV : 0));
    PanelReads pr(cg);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t t = it % n_tiles, g = (it / n_tiles) % cg.G, b = it / (n_tiles * cg.G);
      const int64_t pos0 = t * CONV_PW, rows = std::min<int64_t>(CONV_PW, P - pos0);
      pr.plan(cg, pos0, rows);
      for (int64_t s = 0; s < n_slices; ++s) {
        const int64_t c0 = s * CS, c1 = std::min(Cg, c0 + CS), KS = (c1 - c0) * kv;
        pack_conv_slice(x, cg, b, g, pr, c0, c1, xb.data());
        for (int64_t mb = 0; mb < n_mb; ++mb) {
          const float* wr[CONV_MT];
          for (int i = 0; i < CONV_MT; ++i)  // a partial block repeats its last filter (sums dropped)
            wr[i] = wf + (g * Mg + std::min<int64_t>(mb * CONV_MT + i, Mg - 1)) * K + c0 * kv;
          vf acc[CONV_MT][CONV_PV];
          vf* cr = n_slices > 1 ? &carry[size_t(mb * CONV_MT * CONV_PV)] : nullptr;
          for (int i = 0; i < CONV_MT; ++i)
            for (int v = 0; v < CONV_PV; ++v) acc[i][v] = s == 0 ? vf{} : cr[i * CONV_PV + v];
          conv_micro_dispatch(int((rows + VW - 1) / VW), xb.data(), wr, KS, acc);
          if (s + 1 < n_slices) {
            for (int i = 0; i < CONV_MT; ++i)
              for (int v = 0; v < CONV_PV; ++v) cr[i * CONV_PV + v] = acc[i][v];
            continue;
          }
          for (int i = 0; i < CONV_MT && mb * CONV_MT + i < Mg; ++i) {
            const int64_t m = g * Mg + mb * CONV_MT + i;
            const vf col = splat(bias ? to_f(bias[m]) : 0.f);
            T* yp = y + (b * cg.M + m) * P + pos0;
            for (int v = 0; v < CONV_PV; ++v) {
              const int64_t n = std::min<int64_t>(VW, rows - v * VW);
              if (n <= 0) break;
              const vf out = col - acc[i][v];
              if (std::is_same<T, float>::value && n == VW)
                store(reinterpret_cast<float*>(yp + v * VW), out);
              else
                for (int64_t e = 0; e < n; ++e) from_f(out[e], yp + v * VW + e);
            }
          }
        }
      }
    }
  }
}


// ---------------------------------------------------------------- conv forward, row tiles
// The packed path above gathers all K = C*kvol patch values of every output
// position into a panel (~30% of its time). When the last axis has stride 1
// (the usual 3x3x3 layer), a vector of VW consecutive outputs on a line reads
// VW consecutive inputs of every input line it touches, so the register tile
// can load its x vectors straight from a copy of those lines. A work item is
// one tile of DT output planes x TH output rows (b, group fixed): the input
// lines it needs are copied once, zero padded (x = 0 outside), into
// a per-thread buffer [c][plane][row][Wp] (at most 256 KiB, and all threads'
// buffers together at most half the output), and every filter and position of
// the tile reads from it through a table of per-k offsets. Each input value is
// copied about (DT + ker0 - 1) / DT times, instead of gathered kvol times.
// Register tile: ROW_MT filters x up to ROW_PV position vectors. Measured on
// Zen 4 (bare loop, pairs/ns): 4x5 / 4x6 49.5, 6x4 47.4, 8x3 44.0, 8x2 39.5;
// fewer weight broadcasts per step pay more than fewer x loads (measured with
// the old min+FMA step; the exact sub+abs+FMA step keeps the same tile).
constexpr int ROW_MT = VW == 16 ? 4 : 2;
constexpr int ROW_PV = VW == 16 ? 6 : 4;

// ROW_MT filters x PV position vectors; base[v] is the buffer at position
// vector v, koff[k] the offset of patch element k, wb the filter block [K][ROW_MT].
template <int PV>
inline void row_micro(const float* const* base, const int32_t* koff, const float* wb, int64_t K,
                      vf acc[ROW_MT][PV]) {
  const vf one = splat(kOpaqueOne);
  for (int i = 0; i < ROW_MT; ++i)
    for (int v = 0; v < PV; ++v) acc[i][v] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const int32_t o = koff[k];
    vf xv[PV];
    for (int v = 0; v < PV; ++v) xv[v] = load(base[v] + o);
    for (int i = 0; i < ROW_MT; ++i) {
      const vf wv = splat(wb[k * ROW_MT + i]);
      for (int v = 0; v < PV; ++v) acc[i][v] = acc[i][v] + absdiff(xv[v], wv) * one;
    }
  }
}

// A tile is DT output depth planes x TH output rows (b, group fixed); its
// buffer holds DS input planes x SH input rows of every channel, Wp wide.
struct RowTiling {
  int64_t nvw = 0, Wp = 0, TH = 0, n_ht = 0, SH = 0, DT = 0, n_dt = 0, DS = 0, plane = 0, cstride = 0, buf = 0;
};

inline RowTiling row_tiling(const ConvGeom& cg, int64_t TH, int64_t DT) {
  RowTiling t;
  t.nvw = (cg.out[2] + VW - 1) / VW;
  t.Wp = t.nvw * VW + (cg.ker[2] - 1) * cg.dil[2];
  t.TH = TH;
  t.n_ht = (cg.out[1] + TH - 1) / TH;
  t.SH = (TH - 1) * cg.st[1] + (cg.ker[1] - 1) * cg.dil[1] + 1;
  t.DT = DT;
  t.n_dt = (cg.out[0] + DT - 1) / DT;
  t.DS = (DT - 1) * cg.st[0] + (cg.ker[0] - 1) * cg.dil[0] + 1;
  t.plane = t.SH * t.Wp;
  t.cstride = t.DS * t.plane;
  t.buf = cg.Cg() * t.cstride;
  return t;
}

// Floats of line buffer (+ channel sums) per thread: at most 256 KiB (L2),
// and together over the threads at most half the output, so the forward's
// peak extra memory stays within 1.5x the output it writes.
inline int64_t row_budget(const ConvGeom& cg, int nthreads) {
  return std::min<int64_t>(65536, cg.B * cg.M * cg.P() / (2 * int64_t(std::max(nthreads, 1))));
}

// Largest tile within the budget: whole planes of rows first, then as many
// depth planes as still leave >= 4 work items per thread (copies of each input
// plane fall from ker0 towards 1 as DT grows).
inline RowTiling choose_row_tiling(const ConvGeom& cg, int nthreads) {
  const int64_t budget = row_budget(cg, nthreads);
  auto size = [&](const RowTiling& t) { return t.buf + t.cstride; };
  int64_t TH = std::max<int64_t>(1, cg.out[1]);
  while (TH > 1 && size(row_tiling(cg, TH, 1)) > budget) TH = (TH + 1) / 2;
  RowTiling t = row_tiling(cg, TH, 1);
  if (TH == cg.out[1]) {
    for (int64_t DT = 2; DT <= cg.out[0]; DT *= 2) {
      const RowTiling u = row_tiling(cg, TH, DT);
      if (size(u) > budget || cg.B * cg.G * u.n_dt * u.n_ht < 4 * int64_t(std::max(nthreads, 1))) break;
      t = u;
    }
  }
  return t;
}

// Whether the row-tile kernel applies and pays: stride 1 along the line, at
// least 3/4 of the vector lanes used, a tile of one row within the budget.
inline bool row_tiles_fit(const ConvGeom& cg, int nthreads) {
  if (cg.st[2] != 1 || cg.out[0] <= 0 || cg.out[1] <= 0 || cg.out[2] <= 0) return false;
  const RowTiling t = choose_row_tiling(cg, nthreads);
  return 4 * cg.out[2] >= 3 * t.nvw * VW && t.buf + t.cstride <= row_budget(cg, nthreads);
}

// p[0..n) = v[0..n), n <= VW; nothing past p + n is written.
inline void store_first(float* p, vf v, int64_t n) {
  if (n == VW) return store(p, v);
#if defined(__AVX512F__)
  if (VW == 16) {
    __m512 r;
    std::memcpy(&r, &v, sizeof r);
    return _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1u), r);
  }
#endif
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

// The input of one tile into buf [c][dd][hh][Wp] (input plane od0*st0 - pad0 + dd,
// row oh0*st1 - pad1 + hh, column j - pad2): x, and 0 outside the input.
// Vectors along the row, masked at the borders.
template <typename T>
void fill_row_buffer(const T* x, const ConvGeom& cg, const RowTiling& t, int64_t b, int64_t g, int64_t od0,
                     int64_t oh0, float* buf) {
  const int64_t Cg = cg.Cg();
  const T* xg = x + (b * cg.C + g * Cg) * cg.S() - cg.pad[2];
  for (int64_t dd = 0; dd < t.DS; ++dd) {
    const int64_t id = od0 * cg.st[0] - cg.pad[0] + dd;
    for (int64_t hh = 0; hh < t.SH; ++hh) {
      const int64_t ih = oh0 * cg.st[1] - cg.pad[1] + hh;
      const int64_t row = dd * t.plane + hh * t.Wp;
      const bool inside = id >= 0 && id < cg.in[0] && ih >= 0 && ih < cg.in[1];
      const T* src = xg + (id * cg.in[1] + ih) * cg.in[2];  // + c * S: channel c's row, column j at src[j]
      for (int64_t j = 0; j < t.Wp; j += VW) {
        const int64_t n = std::min<int64_t>(VW, t.Wp - j);
        const int64_t lo = inside ? std::min<int64_t>(n, std::max<int64_t>(0, cg.pad[2] - j)) : 0;
        const int64_t hi = inside ? std::max<int64_t>(lo, std::min<int64_t>(n, cg.in[2] + cg.pad[2] - j)) : 0;
        for (int64_t c = 0; c < Cg; ++c) {
          const T* s = src + c * cg.S() + j;
          const vf v = lo == 0 && hi == VW ? load_full(s) : hi > lo ? load_masked(s, lo, hi) : vf{};
          store_first(buf + c * t.cstride + row + j, v, n);
        }
      }
    }
  }
}

template <int PV, typename T>
void row_tile_group(const float* buf, const int32_t* koff, const float* wblocks, const float* col_term, int64_t n_mb,
                    int64_t Mg, int64_t K, const int64_t* slot_off, const int64_t* slot_out, const int64_t* slot_n,
                    T* yg, int64_t P) {
  const float* base[PV];
  for (int v = 0; v < PV; ++v) base[v] = buf + slot_off[v];
  for (int64_t mb = 0; mb < n_mb; ++mb) {
    vf acc[ROW_MT][PV];
    row_micro<PV>(base, koff, wblocks + mb * K * ROW_MT, K, acc);
    for (int i = 0; i < ROW_MT && mb * ROW_MT + i < Mg; ++i) {
      const int64_t m = mb * ROW_MT + i;
      const vf col = splat(col_term[m]);
      for (int v = 0; v < PV; ++v) {
        T* yp = yg + m * P + slot_out[v];
        const vf out = col - acc[i][v];
        if (std::is_same<T, float>::value && slot_n[v] == VW) {
          store(reinterpret_cast<float*>(yp), out);
        } else {
          for (int64_t e = 0; e < slot_n[v]; ++e) from_f(out[e], yp + e);
        }
      }
    }
  }
}

template <typename T>
void row_tile_dispatch(int pv, const float* buf, const int32_t* koff, const float* wb, const float* ct, int64_t n_mb,
                       int64_t Mg, int64_t K, const int64_t* so, const int64_t* sout, const int64_t* sn, T* yg,
                       int64_t P) {
  static_assert(ROW_PV <= 6, "add cases below");
  switch (pv) {  // pv <= ROW_PV; larger cases are never reached on narrow vectors
    case 1: return row_tile_group<1>(buf, koff, wb, ct, n_mb, Mg, K, so, sout, sn, yg, P);
    case 2: return row_tile_group<2>(buf, koff, wb, ct, n_mb, Mg, K, so, sout, sn, yg, P);
    case 3: return row_tile_group<3>(buf, koff, wb, ct, n_mb, Mg, K, so, sout, sn, yg, P);
    case 4: return row_tile_group<4>(buf, koff, wb, ct, n_mb, Mg, K, so, sout, sn, yg, P);
    case 5: return row_tile_group<5>(buf, koff, wb, ct, n_mb, Mg, K, so, sout, sn, yg, P);
    default: return row_tile_group<6>(buf, koff, wb, ct, n_mb, Mg, K, so, sout, sn, yg, P);
  }
}

template <typename T>
void conv_forward_rows(const T* x, const T* w, const T* bias, T* y, const ConvGeom& cg, int nthreads) {
  const int64_t Cg = cg.Cg(), Mg = cg.Mg(), kv = cg.kvol(), K = cg.Kg(), P = cg.P();
  const RowTiling t = choose_row_tiling(cg, nthreads);
  std::vector<int32_t> koff(static_cast<size_t>(K)), qoff(static_cast<size_t>(kv));
  for (int64_t kd = 0, q = 0; kd < cg.ker[0]; ++kd)
    for (int64_t kh = 0; kh < cg.ker[1]; ++kh)
      for (int64_t kw = 0; kw < cg.ker[2]; ++kw, ++q)
        qoff[size_t(q)] = int32_t(kd * cg.dil[0] * t.plane + kh * cg.dil[1] * t.Wp + kw * cg.dil[2]);
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t q = 0; q < kv; ++q) koff[size_t(c * kv + q)] = int32_t(c * t.cstride) + qoff[size_t(q)];
  // Weights as blocks [group][block][K][ROW_MT] (zero padded).
  const int64_t n_mb = (Mg + ROW_MT - 1) / ROW_MT;
  std::vector<float> wb(size_t(cg.G * n_mb * K * ROW_MT), 0.f), col_term(size_t(cg.M), 0.f);
  const int64_t n_tiles = t.n_dt * t.n_ht;
  const int64_t items = cg.B * cg.G * n_tiles;
  const int nt = threads_for(std::max(items, cg.M), nthreads);
#pragma omp parallel num_threads(nt)
  {
    // The weight preparation is split over the threads too (serial, it was ~3%).
#pragma omp for schedule(static)
    for (int64_t gm = 0; gm < cg.M; ++gm) {
      const int64_t g = gm / Mg, m = gm % Mg;
      float* blk = &wb[size_t((g * n_mb + m / ROW_MT) * K * ROW_MT + m % ROW_MT)];
      for (int64_t k = 0; k < K; ++k) blk[k * ROW_MT] = to_f(w[gm * K + k]);
      col_term[size_t(gm)] = bias ? to_f(bias[gm]) : 0.f;
    }  // implied barrier
    std::vector<float> buf(static_cast<size_t>(t.buf));
    const size_t max_slots = size_t(t.DT * t.TH * t.nvw);
    std::vector<int64_t> slot_off(max_slots), slot_out(max_slots), slot_n(max_slots);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t ht = it % t.n_ht, dt = (it / t.n_ht) % t.n_dt;
      const int64_t g = (it / n_tiles) % cg.G, b = it / (n_tiles * cg.G);
      const int64_t oh0 = ht * t.TH, rows = std::min(t.TH, cg.out[1] - oh0);
      const int64_t od0 = dt * t.DT, planes = std::min(t.DT, cg.out[0] - od0);
      fill_row_buffer(x, cg, t, b, g, od0, oh0, buf.data());
      // Slots: vectors of VW outputs on a line, with their buffer and output offsets.
      int64_t n_slots = 0;
      for (int64_t p = 0; p < planes; ++p)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t v = 0; v < t.nvw; ++v, ++n_slots) {
            slot_off[size_t(n_slots)] = p * cg.st[0] * t.plane + r * cg.st[1] * t.Wp + v * VW;
            slot_out[size_t(n_slots)] = ((od0 + p) * cg.out[1] + oh0 + r) * cg.out[2] + v * VW;
            slot_n[size_t(n_slots)] = std::min<int64_t>(VW, cg.out[2] - v * VW);
          }
      T* yg = y + (b * cg.M + g * Mg) * P;
      const float* wg = &wb[size_t(g * n_mb * K * ROW_MT)];
      const float* ct = &col_term[size_t(g * Mg)];
      // Groups of up to ROW_PV position vectors, sizes spread evenly (16 -> 6, 5, 5).
      const int64_t n_groups = (n_slots + ROW_PV - 1) / ROW_PV;
      for (int64_t gi = 0, s = 0; gi < n_groups; ++gi) {
        const int64_t pv = (n_slots - s) / (n_groups - gi) + ((n_slots - s) % (n_groups - gi) != 0);
        row_tile_dispatch(int(pv), buf.data(), koff.data(), wg, ct, n_mb, Mg, K, &slot_off[size_t(s)],
                          &slot_out[size_t(s)], &slot_n[size_t(s)], yg, P);
        s += pv;
      }
    }
  }
}

// ---------------------------------------------------------------- pointwise conv forward
// Kernel size 1, stride 1, no padding (PointNet's shared MLPs, 1x1x1 layers):
// per (sample, group), y[m, s] = bias[m] - sum_c |x[c, s] - w[m, c]| with x a
// [Cg, S] matrix whose positions are contiguous, so no patch needs gathering
// and no line buffer covering whole lines is needed (the row-tile path's
// buffer of all channels x the whole line does not fit its budget from 64
// channels of 1024 points on, and the packed path with its 4x4 tile was ~10%
// slower on 368 -> 128).
// A work item is a panel of PW_PV vectors of positions: channel rows of x are
// copied into a contiguous [Cg][PW_PV * VW] panel (reading x in place would
// stride by S floats per channel, 4 KiB for 1024 points, which maps every
// channel to the same L1/L2 sets), then every block of PW_MT filters runs the
// register tile over it. Tiles: 4 filters x 5 vectors (20 accumulators, 5 x
// vectors, the broadcast, the difference, the sign mask and the 1.0f: 29 of
// the 32 registers), or 6 x 4 where it pads clearly fewer filters (6, 12, 18,
// ...). Zen 4, one thread, 8 x 1024 points: 4 x 5 is 5-20% faster than 6 x 4
// (which needs all 32 registers) on 32 -> 64, 64 -> 128, 128 -> 64, 368 -> 128.
template <int MT, int PV>
struct PwTile {
  static constexpr int mt = MT, pv = PV, width = PV * VW;  // filters, vectors, positions per panel
};
using PwWide = PwTile<VW == 16 ? 6 : 3, VW == 16 ? 4 : 3>;
using PwNarrow = PwTile<VW == 16 ? 4 : 3, VW == 16 ? 5 : 3>;

// MT filters x PV vectors of positions over a [K][PV * VW] panel xp, wb the
// filter block [K][MT]. Both operands are walked by pointer increments: with
// the row-tile kernel's per-k offset table GCC 12 spills a few of the
// 4 x 5 tile's vectors per step (~8% slower).
template <int MT, int PV>
inline void panel_micro(const float* xp, const float* wb, int64_t K, vf acc[MT][PV]) {
  const vf one = splat(kOpaqueOne);
  for (int i = 0; i < MT; ++i)
    for (int v = 0; v < PV; ++v) acc[i][v] = vf{};
  for (int64_t k = 0; k < K; ++k, xp += PV * VW, wb += MT) {
    vf xv[PV];
    for (int v = 0; v < PV; ++v) xv[v] = load(xp + v * VW);
    for (int i = 0; i < MT; ++i) {
      const vf wv = splat(wb[i]);
      for (int v = 0; v < PV; ++v) acc[i][v] = acc[i][v] + absdiff(xv[v], wv) * one;
    }
  }
}

inline bool pointwise_conv(const ConvGeom& cg) {
  for (int a = 0; a < 3; ++a)
    if (cg.ker[a] != 1 || cg.st[a] != 1 || cg.pad[a] != 0) return false;
  return true;
}

// Filters of every group as blocks [group][block][K][MT] (zero padded) and the bias per filter.
template <int MT, typename T>
void filter_blocks(const T* w, const T* bias, int64_t M, int64_t Mg, int64_t K, float* wb, float* col_term) {
  const int64_t n_mb = (Mg + MT - 1) / MT;
  for (int64_t gm = 0; gm < M; ++gm) {
    const int64_t g = gm / Mg, m = gm % Mg;
    float* blk = wb + (g * n_mb + m / MT) * K * MT + m % MT;
    for (int64_t k = 0; k < K; ++k) blk[k * MT] = to_f(w[gm * K + k]);
    col_term[gm] = bias ? to_f(bias[gm]) : 0.f;
  }
}

// What the fused forward (l1fx_conv_forward_fused, onnxruntime's l1fx.L1FusedConv) does around the
// sums: out = act(scale * (col - acc) + shift), col the bias [M] or per sample [B, M] (the bias less
// the sums of input channels that are constant along the positions, computed once per sample), the
// affine (a folded inference batch norm) and the ReLU optional. The plain forward is col = bias only.
struct Epilogue {
  const float* col = nullptr;    // [B, M] replacing the bias, or null
  const float* scale = nullptr;  // [M] with shift, or null
  const float* shift = nullptr;
  bool relu = false;
  // ReLU with NaN kept (torch.relu): MAXPS returns its second operand when either is NaN.
  inline vf apply(vf out, int64_t m) const {
    if (scale) out = out * splat(scale[m]) + splat(shift[m]);
    return relu ? vmax(vf{}, out) : out;
  }
  inline float apply(float out, int64_t m) const {
    if (scale) out = out * scale[m] + shift[m];
    return relu ? (out > 0.f || out != out ? out : 0.f) : out;
  }
};

// Channel rows of the input: row c of sample b is rows[c] + b * bstride[c] (S positions, contiguous),
// for one tensor [B, C, S] or several [B, C_i, S] read as their concatenation along channels.
template <typename T>
struct ChannelRows {
  std::vector<const T*> rows;
  std::vector<int64_t> bstride;
  ChannelRows(int n, const T* const* xs, const int64_t* channels, int64_t S) {
    for (int i = 0; i < n; ++i)
      for (int64_t c = 0; c < channels[i]; ++c) {
        rows.push_back(xs[i] + c * S);
        bstride.push_back(channels[i] * S);
      }
  }
  const T* row(int64_t b, int64_t c) const { return rows[size_t(c)] + b * bstride[size_t(c)]; }
};

template <typename Tile, typename T>
void conv_forward_pointwise(const ChannelRows<T>& x, const T* w, const T* bias, T* y, const ConvGeom& cg,
                            int nthreads, const Epilogue& ep) {
  constexpr int PW_MT = Tile::mt, PW_PV = Tile::pv, PW_W = Tile::width;
  const int64_t K = cg.Cg(), Mg = cg.Mg(), S = cg.S();
  const int64_t n_mb = (Mg + PW_MT - 1) / PW_MT, n_pt = (S + PW_W - 1) / PW_W;
  std::vector<float> wb(size_t(cg.G * n_mb * K * PW_MT), 0.f), col_term(size_t(cg.M), 0.f);
  // Serial: M * K values against B * S * M * K steps of the tile; no barrier inside the parallel
  // region, and items are handed out one by one, so a thread that the OS parks on a busy machine
  // delays the call by at most the item it holds.
  filter_blocks<PW_MT>(w, bias, cg.M, Mg, K, wb.data(), col_term.data());
  const int64_t items = cg.B * cg.G * n_pt;
#pragma omp parallel num_threads(threads_for(items, nthreads))
  {
    std::vector<float> xp(static_cast<size_t>(K * PW_W));
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t pt = it % n_pt, g = (it / n_pt) % cg.G, b = it / (n_pt * cg.G);
      const int64_t s0 = pt * PW_W, n = std::min<int64_t>(PW_W, S - s0);
      for (int64_t c = 0; c < K; ++c) {
        const T* xs = x.row(b, g * K + c) + s0;
        for (int v = 0; v < PW_PV; ++v) {
          const int64_t lanes = std::max<int64_t>(0, std::min<int64_t>(VW, n - v * VW));
          const T* src = xs + v * VW;
          store(&xp[size_t(c * PW_W + v * VW)], lanes == VW ? load_full(src) : lanes ? load_masked(src, 0, lanes) : vf{});
        }
      }
      const float* wg = &wb[size_t(g * n_mb * K * PW_MT)];
      const float* cols = ep.col ? ep.col + b * cg.M : col_term.data();
      T* yg = y + (b * cg.M + g * Mg) * S + s0;
      for (int64_t mb = 0; mb < n_mb; ++mb) {
        vf acc[PW_MT][PW_PV];
        panel_micro<PW_MT, PW_PV>(xp.data(), wg + mb * K * PW_MT, K, acc);
        for (int i = 0; i < PW_MT && mb * PW_MT + i < Mg; ++i) {
          const int64_t m = mb * PW_MT + i, gm = g * Mg + m;
          const vf col = splat(cols[size_t(gm)]);
          for (int v = 0; v < PW_PV && v * VW < n; ++v) {
            const vf out = ep.apply(col - acc[i][v], gm);
            const int64_t lanes = std::min<int64_t>(VW, n - v * VW);
            T* yp = yg + m * S + v * VW;
            if (std::is_same<T, float>::value)
              store_first(reinterpret_cast<float*>(yp), out, lanes);
            else
              for (int64_t e = 0; e < lanes; ++e) from_f(out[e], yp + e);
          }
        }
      }
    }
  }
}

// 4 x 5 unless it does over 3% more padded work (filter blocks x position panels) than 6 x 4.
template <typename Tile>
int64_t pointwise_work(const ConvGeom& cg) {
  return round_up(cg.Mg(), Tile::mt) * round_up(cg.S(), Tile::width);
}
template <typename T>
void conv_forward_pointwise(const ChannelRows<T>& x, const T* w, const T* bias, T* y, const ConvGeom& cg,
                            int nthreads, const Epilogue& ep = Epilogue{}) {
  if (100 * pointwise_work<PwNarrow>(cg) <= 103 * pointwise_work<PwWide>(cg))
    conv_forward_pointwise<PwNarrow>(x, w, bias, y, cg, nthreads, ep);
  else
    conv_forward_pointwise<PwWide>(x, w, bias, y, cg, nthreads, ep);
}

// Which conv forward kernel runs: 2 = pointwise, 1 = row tiles, 0 = packed patch panels.
inline int conv_forward_kind(const ConvGeom& cg, int nthreads) {
  if (pointwise_conv(cg)) return 2;
  return row_tiles_fit(cg, nthreads) ? 1 : 0;
}

template <typename T>
void conv_forward(const T* x, const T* w, const T* bias, T* y, const ConvGeom& cg, int nthreads) {
  switch (conv_forward_kind(cg, nthreads)) {
    case 2: {
      const int64_t C = cg.C;
      return conv_forward_pointwise(ChannelRows<T>(1, &x, &C, cg.S()), w, bias, y, cg, nthreads);
    }
    case 1: return conv_forward_rows(x, w, bias, y, cg, nthreads);
    default: return conv_forward_packed(x, w, bias, y, cg, nthreads);
  }
}

// ---------------------------------------------------------------- direct conv input gradient
// Input position i receives from output o = (i + pad - koff * dil) / stride
// when that is a whole number inside the output, so
//   gx[b, c, i] = sum_{m, koff} g[b, m, o] * phi(w[m, c, koff] - x[b, c, i])
// (phi as in input_grad_block; an o that does not exist contributes no term).
// Stride st > 1 along the line: the line is split into its st phases (inputs
// p, p + st, p + 2 st, ...); within a phase, a kernel offset either reaches no
// output or consecutive outputs, so every lane does useful work (no
// zero-stuffing, no masked-off half vectors); along the outer axes, kernel
// offsets without an output line are skipped.
// One work item is one input line (b, group, id, ih): the output-gradient
// lines it needs are copied once into zero-padded buffers, then register tiles
// of CONV_CT channels x VW positions along the line reduce over (koff, m)
// with the weights broadcast. No im2col, no col2im, no atomics: each item
// owns its input line.
constexpr int CONV_CT = VW == 16 ? 8 : 4;  // AVX2 has 16 registers

template <int MODE, bool FIN, typename T>
void conv_input_grad(const T* g, const T* x, const T* w, T* gx, const ConvGeom& cg, float a, float b,
                     int nthreads) {
  const int64_t Cg = cg.Cg(), Mg = cg.Mg(), kv = cg.kvol(), P = cg.P(), S = cg.S();
  const int64_t Cg_pad = round_up(Cg, CONV_CT);
  const int64_t in2_pad = round_up(cg.in[2], VW);
  const int64_t off = std::max<int64_t>(0, (cg.ker[2] - 1) * cg.dil[2] - cg.pad[2]);
  const int64_t L = off + in2_pad + cg.pad[2] + VW + 1;  // padded g line: index o + off
  // Weights per group as [koff][m][c_pad], raw (the differences are formed exactly).
  std::vector<float> wt(size_t(cg.G * kv * Mg * Cg_pad), 0.f);
  for (int64_t gr = 0; gr < cg.G; ++gr)
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t m = 0; m < Mg; ++m)
        for (int64_t q = 0; q < kv; ++q)
          wt[size_t(((gr * kv + q) * Mg + m) * Cg_pad + c)] = to_f(w[((gr * Mg + m) * Cg + c) * kv + q]);
  const int64_t kdh = cg.ker[0] * cg.ker[1];
  const int64_t items = cg.B * cg.G * cg.in[0] * cg.in[1];
  vi lane;
  for (int i = 0; i < VW; ++i) lane[i] = i;

#pragma omp parallel num_threads(threads_for(items, nthreads))
  {
    std::vector<float> gl(static_cast<size_t>(kdh * Mg * L)), xl(static_cast<size_t>(CONV_CT * in2_pad));
    std::vector<int64_t> valid(static_cast<size_t>(kdh));  // (kd, kh) index of each usable output line
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t ih = it % cg.in[1], id = (it / cg.in[1]) % cg.in[0];
      const int64_t gr = (it / (cg.in[1] * cg.in[0])) % cg.G, bb = it / (cg.in[1] * cg.in[0] * cg.G);
      int64_t nv = 0;
      for (int64_t kd = 0; kd < cg.ker[0]; ++kd)
        for (int64_t kh = 0; kh < cg.ker[1]; ++kh) {
          // Output plane/row this kernel offset reaches from here, if any (stride st: only multiples).
          const int64_t td = id + cg.pad[0] - kd * cg.dil[0], th = ih + cg.pad[1] - kh * cg.dil[1];
          if (td < 0 || th < 0 || td % cg.st[0] != 0 || th % cg.st[1] != 0) continue;
          const int64_t od = td / cg.st[0], oh = th / cg.st[1];
          if (od >= cg.out[0] || oh >= cg.out[1]) continue;
          for (int64_t m = 0; m < Mg; ++m) {  // the g line between zeros: dl[off + o] = g[o]
            float* dl = &gl[size_t((nv * Mg + m) * L)];
            const T* src = g + ((bb * cg.M + gr * Mg + m) * P) + (od * cg.out[1] + oh) * cg.out[2];
            // Short lines: whole-vector moves in place (a libc memcpy/memset call
            // per line cost ~10% of the kernel).
            const int64_t n = std::min<int64_t>(cg.out[2], L - off);
            for (int64_t i = 0; i < L; i += VW) store_first(dl + i, vf{}, std::min<int64_t>(VW, L - i));
            for (int64_t o = 0; o < n; o += VW) {
              const int64_t e = std::min<int64_t>(VW, n - o);
              store_first(dl + off + o, e == VW ? load_full(src + o) : load_masked(src + o, 0, e), e);
            }
          }
          valid[size_t(nv++)] = kd * cg.ker[1] + kh;
        }
      T* gx_line = gx + ((bb * cg.C + gr * Cg) * cg.in[0] + id) * cg.in[1] * cg.in[2] + ih * cg.in[2];
      const T* x_line = x + ((bb * cg.C + gr * Cg) * cg.in[0] + id) * cg.in[1] * cg.in[2] + ih * cg.in[2];
      const int64_t st2 = cg.st[2];
      for (int64_t ph = 0; ph < std::min(st2, cg.in[2]); ++ph) {  // inputs ph + st2 * jj, jj < n_ph
        const int64_t n_ph = (cg.in[2] - ph + st2 - 1) / st2;
        for (int64_t c0 = 0; c0 < Cg_pad; c0 += CONV_CT) {
          for (int c = 0; c < CONV_CT; ++c) {  // this tile's x lines (this phase), zero padded
            float* d = &xl[size_t(c * in2_pad)];
            for (int64_t i = 0; i < in2_pad; ++i)
              d[i] = c0 + c < Cg && i < n_ph ? to_f(x_line[(c0 + c) * S + ph + st2 * i]) : 0.f;
          }
          for (int64_t j0 = 0; j0 < n_ph; j0 += VW) {
            vf acc[CONV_CT], xv[CONV_CT];
            for (int c = 0; c < CONV_CT; ++c) {
              acc[c] = vf{};
              xv[c] = load(&xl[size_t(c * in2_pad + j0)]);
            }
            for (int64_t j = 0; j < nv; ++j)
              for (int64_t kw = 0; kw < cg.ker[2]; ++kw) {
                // Input ph + st2 * (j0 + l) reaches output o = (ph + pad - kw * dil) / st2 + j0 + l
                // when st2 divides ph + pad - kw * dil (else no output at all for this kw);
                // lanes whose o falls outside the output get no term at all (not
                // 0 * phi, which is NaN for a NaN weight), as in im2col.
                const int64_t t0 = ph + cg.pad[2] - kw * cg.dil[2];
                if ((t0 % st2 + st2) % st2 != 0) continue;
                const int64_t o0 = t0 / st2 + j0;
                const int64_t lo = std::max<int64_t>(0, -o0), hi = std::min<int64_t>(VW, cg.out[2] - o0);
                if (hi <= lo) continue;
                const vi live = (lane >= int32_t(lo)) & (lane < int32_t(hi));
                const uint32_t live_m = ((hi >= 32 ? 0u : (1u << hi)) - 1u) & ~((1u << lo) - 1u);
                const int64_t q = valid[size_t(j)] * cg.ker[2] + kw;
                const float* gq = &gl[size_t(j * Mg * L + o0 + off)];
                const float* wq = &wt[size_t(((gr * kv + q) * Mg) * Cg_pad + c0)];
                // Two copies of the loop, so the interior (every lane live) has no mask.
                auto reduce = [&](auto full) {
                  for (int64_t m = 0; m < Mg; ++m) {
                    const vf gv = load(gq + m * L);
                    const vf ga = MODE == 2 ? gv * splat(a) : gv, gb = gv * splat(b);
                    const float* wm = wq + m * Cg_pad;
                    for (int c = 0; c < CONV_CT; ++c) {
                      const vf d = splat(wm[c]) - xv[c];
                      if (decltype(full)::value) {
                        acc[c] += (MODE == 0 ? vsign(d) : clamp1_<FIN>(d)) * ga;
                        if (MODE == 2) acc[c] += vsign(d) * gb;
                      } else {
                        acc[c] = fma_lanes(acc[c], MODE == 0 ? vsign(d) : clamp1_<FIN>(d), ga, live_m, live);
                        if (MODE == 2) acc[c] = fma_lanes(acc[c], vsign(d), gb, live_m, live);
                      }
                    }
                  }
                };
                if (lo == 0 && hi == VW)
                  reduce(std::true_type{});
                else
                  reduce(std::false_type{});
              }
            const int64_t n = std::min<int64_t>(VW, n_ph - j0);
            for (int c = 0; c < CONV_CT && c0 + c < Cg; ++c) {
              float out[VW];
              store(out, acc[c]);
              T* dst = gx_line + (c0 + c) * S + ph + st2 * j0;
              for (int64_t i = 0; i < n; ++i) from_f(out[i], dst + st2 * i);
            }
          }
        }
      }
    }
  }
}

template <typename T>
void conv_input_grad_dispatch(const T* g, const T* x, const T* w, T* gx, const ConvGeom& cg, float mix,
                              int nthreads) {
  // Finite x and w (the usual case, checked in one pass) take the faster clamp.
  const bool fin = mix != 0.0f && all_finite(x, cg.B * cg.C * cg.S()) && all_finite(w, cg.M * cg.Kg());
  if (mix == 1.0f && fin)
    conv_input_grad<1, true>(g, x, w, gx, cg, 1.f, 0.f, nthreads);
  else if (mix == 1.0f)
    conv_input_grad<1, false>(g, x, w, gx, cg, 1.f, 0.f, nthreads);
  else if (mix == 0.0f)
    conv_input_grad<0, false>(g, x, w, gx, cg, 0.f, 1.f, nthreads);
  else if (fin)
    conv_input_grad<2, true>(g, x, w, gx, cg, mix, 1.f - mix, nthreads);
  else
    conv_input_grad<2, false>(g, x, w, gx, cg, mix, 1.f - mix, nthreads);
}

// ---------------------------------------------------------------- backward
// Every summand is formed from the exact difference d = fl(x - w) (one
// rounding; its sign, zero-ness and NaN-ness are those of x - w), so each
// gradient is a float32 sum of terms each within ~2 eps of the true term:
// error <= ~(T + 2) eps sum_t |term_t| for T terms, whatever the offset or
// spread of the data. The MODE selects the blend statically:
//   MODE 1 (mix 1): phi_x = clamp(d, -1, 1),           phi_w = d
//   MODE 0 (mix 0): phi_x = sign(d),                   phi_w = sign(d)
//   MODE 2 (blend): phi_x = a clamp(d) + b sign(d),    phi_w = a d + b sign(d)
// (d = w - x for the input gradient, x - w for the weight gradient).

// Input gradient of one packed row block, vectorised over k (so the sum over
// filters is a plain vertical add): xp [rows_pad, K_pad], gp [rows_pad, M],
// wr [M, K_pad]; gx[n, k] = sum_m g[n, m] phi_x(w[m, k] - x[n, k]).
template <int MODE, bool FIN, int R, int KV, typename T>
void input_grad_block(const float* xp, const float* gp, const float* wr, int64_t rows, int64_t rows_pad, int64_t K,
                      int64_t K_pad, int64_t M, float a, float b, T* gx, int64_t n0) {
  for (int64_t r0 = 0; r0 < rows_pad; r0 += R) {
    for (int64_t k0 = 0; k0 < K_pad; k0 += KV * VW) {
      vf acc[R][KV], xv[R][KV];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < KV; ++j) {
          acc[r][j] = vf{};
          xv[r][j] = load(xp + (r0 + r) * K_pad + k0 + j * VW);
        }
      for (int64_t m = 0; m < M; ++m) {
        vf wv[KV];
        for (int j = 0; j < KV; ++j) wv[j] = load(wr + m * K_pad + k0 + j * VW);
        for (int r = 0; r < R; ++r) {
          const float gs = gp[(r0 + r) * M + m];
          const vf ga = splat(MODE == 2 ? gs * a : gs), gb = splat(gs * b);
          for (int j = 0; j < KV; ++j) {
            const vf d = wv[j] - xv[r][j];
            if (MODE != 0) acc[r][j] += clamp1_<FIN>(d) * ga;
            if (MODE == 0) acc[r][j] += vsign(d) * ga;
            if (MODE == 2) acc[r][j] += vsign(d) * gb;
          }
        }
      }
      for (int r = 0; r < R && r0 + r < rows; ++r)
        for (int j = 0; j < KV; ++j) {
          float out[VW];
          store(out, acc[r][j]);
          for (int i = 0; i < VW && k0 + j * VW + i < K; ++i) from_f(out[i], gx + (n0 + r0 + r) * K + k0 + j * VW + i);
        }
    }
  }
}

// S[k, m] += sum over the block's rows of g[n, m] phi_w(x[n, k] - w[m, k]),
// vectorised over filters: x[n, k] = xp[n * xs_n + k * xs_k] (row-major packed
// rows, or the conv's [k][position] panels), gp [rows, M_pad], wt [K_pad, M_pad].
// The rows (the reduced dimension) are the innermost loop, read in memory order;
// the accumulators and weights stay in registers. The blend keeps the d and the
// sign sums apart (one FMA each) and combines them once per block.
template <int MODE>
void weight_grad_block(const float* xp, int64_t xs_n, int64_t xs_k, const float* gp, const float* wt, int64_t rows,
                       int64_t K_pad, int64_t M_pad, float a, float b, float* S) {
  constexpr int F = GW_FV * VW;
  const vf av = splat(a), bv = splat(b);
  for (int64_t m0 = 0; m0 < M_pad; m0 += F) {
    for (int64_t k0 = 0; k0 < K_pad; k0 += GW_KB) {
      vf lin[GW_KB][GW_FV], sgn[GW_KB][GW_FV], wv[GW_KB][GW_FV];
      for (int j = 0; j < GW_KB; ++j)
        for (int f = 0; f < GW_FV; ++f) {
          lin[j][f] = sgn[j][f] = vf{};
          wv[j][f] = load(wt + (k0 + j) * M_pad + m0 + f * VW);
        }
      for (int64_t n = 0; n < rows; ++n) {
        vf gv[GW_FV];
        for (int f = 0; f < GW_FV; ++f) gv[f] = load(gp + n * M_pad + m0 + f * VW);
        for (int j = 0; j < GW_KB; ++j) {
          const vf xv = splat(xp[n * xs_n + (k0 + j) * xs_k]);
          for (int f = 0; f < GW_FV; ++f) {
            const vf d = xv - wv[j][f];
            if (MODE != 0) lin[j][f] += d * gv[f];
            if (MODE != 1) sgn[j][f] += vsign(d) * gv[f];
          }
        }
      }
      for (int j = 0; j < GW_KB; ++j)
        for (int f = 0; f < GW_FV; ++f) {
          float* s = S + (k0 + j) * M_pad + m0 + f * VW;
          const vf v = MODE == 1 ? lin[j][f] : MODE == 0 ? sgn[j][f] : av * lin[j][f] + bv * sgn[j][f];
          store(s, load(s) + v);
        }
    }
  }
}

// One pass over row blocks computing gx (if gx != nullptr) and the weight
// gradient (if s_out != nullptr, float32 [M, K]), sharing the packed row blocks.
template <int MODE, bool FIN, typename T>
void backward(const T* g, const T* x, const T* w, T* gx, float* s_out, float a, float b, int64_t N, int64_t K,
              int64_t M, int nthreads) {
  constexpr int R = MODE == 1 ? GX1_R : MODE == 0 ? GXS_R : GXB_R;
  constexpr int KV = MODE == 1 ? GX1_KV : MODE == 0 ? GXS_KV : GXB_KV;
  constexpr int KQ = KV * VW > GW_KB ? KV * VW : GW_KB;
  constexpr int RQ = R > 1 ? R : 1;
  const int64_t K_pad = round_up(std::max<int64_t>(K, 1), KQ);
  const int64_t M_pad = round_up(std::max<int64_t>(M, 1), GW_FV * VW);
  const PackedW pw = pack_w(w, M, K, M_pad, K_pad, gx != nullptr, s_out != nullptr);
  const int64_t NB = std::max<int64_t>(RQ, std::min<int64_t>(256, (256 * 1024 / 4) / (K_pad + M_pad)) / RQ * RQ);
  const int64_t n_blocks = (N + NB - 1) / NB;
  const int nt = threads_for(n_blocks, nthreads);
  // One private S per thread, summed at the end (bounded: nt * M * K floats).
  std::vector<float> s_priv(s_out ? size_t(nt * K_pad * M_pad) : 0, 0.f);

#pragma omp parallel num_threads(nt)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    std::vector<float> xp(static_cast<size_t>(NB * K_pad)), gp(static_cast<size_t>(NB * M_pad));
    float* S = s_out ? &s_priv[size_t(tid * K_pad * M_pad)] : nullptr;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t n0 = blk * NB, rows = std::min(NB, N - n0), rows_pad = round_up(rows, RQ);
      pack_rows(x, K, n0, rows, rows_pad, K_pad, xp.data());
      if (gx) {
        pack_rows(g, M, n0, rows, rows_pad, M, gp.data());
        input_grad_block<MODE, FIN, R, KV>(xp.data(), gp.data(), pw.rows.data(), rows, rows_pad, K, K_pad, M, a, b, gx,
                                      n0);
      }
      if (S) {
        pack_rows(g, M, n0, rows, rows, M_pad, gp.data());
        weight_grad_block<MODE>(xp.data(), K_pad, 1, gp.data(), pw.cols.data(), rows, K_pad, M_pad, a, b, S);
      }
    }
#pragma omp barrier
    if (s_out) {
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          float s = 0.f;
          for (int t = 0; t < nt; ++t) s += s_priv[size_t((t * K_pad + k) * M_pad + m)];
          s_out[m * K + k] = s;
        }
    }
  }
}

template <typename T>
void backward_dispatch(const T* g, const T* x, const T* w, T* gx, float* s, float mix, int64_t N, int64_t K,
                       int64_t M, int nthreads) {
  // Finite x and w (checked in one pass; only the input gradient clamps) take the faster clamp.
  const bool fin = gx != nullptr && mix != 0.0f && all_finite(x, N * K) && all_finite(w, M * K);
  if (mix == 1.0f && fin)
    backward<1, true>(g, x, w, gx, s, 1.f, 0.f, N, K, M, nthreads);
  else if (mix == 1.0f)
    backward<1, false>(g, x, w, gx, s, 1.f, 0.f, N, K, M, nthreads);
  else if (mix == 0.0f)
    backward<0, false>(g, x, w, gx, s, 0.f, 1.f, N, K, M, nthreads);
  else if (fin)
    backward<2, true>(g, x, w, gx, s, mix, 1.f - mix, N, K, M, nthreads);
  else
    backward<2, false>(g, x, w, gx, s, mix, 1.f - mix, N, K, M, nthreads);
}

// ---------------------------------------------------------------- direct conv weight gradient
//   gw[m, k] = sum_{b, o} g[b, m, o] * phi_w(patch[b, o, k] - w[m, k])
// (phi_w as in weight_grad_block, both halves of the MGS blend, exact.)
// One work item is a tile of output positions of one (sample, group): its
// patches are packed by the forward's panel packer (vector loads along lines,
// padding reads as x = 0) and its output gradients transposed to [rows][M_pad],
// both in per-thread buffers of ~256 KiB, and weight_grad_block reduces over the
// tile's positions panel by panel with the accumulators in registers into a
// per-thread [K_pad][M_pad] sum. No im2col tensor: the extra memory is those
// buffers and one weight-sized sum per thread.
template <int MODE, typename T>
void conv_weight_grad(const T* g, const T* x, const T* w, float* gw, const ConvGeom& cg, float a, float b,
                      int nthreads) {
  const int64_t K = cg.Kg(), Mg = cg.Mg(), P = cg.P();
  const int64_t K_pad = round_up(std::max<int64_t>(K, 1), GW_KB);
  const int64_t M_pad = round_up(std::max<int64_t>(Mg, 1), GW_FV * VW);
  // Weights per group, transposed and zero padded: [G][K_pad][M_pad].
  std::vector<float> wt(size_t(cg.G * K_pad * M_pad), 0.f);
  for (int64_t gr = 0; gr < cg.G; ++gr)
    for (int64_t m = 0; m < Mg; ++m)
      for (int64_t k = 0; k < K; ++k) wt[size_t((gr * K_pad + k) * M_pad + m)] = to_f(w[(gr * Mg + m) * K + k]);
  const int64_t RT = std::max<int64_t>(1, std::min<int64_t>(512, (256 * 1024 / 4) / (K_pad + M_pad)) / CONV_PW) * CONV_PW;
  const int64_t n_tiles = (P + RT - 1) / RT;
  const int64_t items = cg.B * cg.G * n_tiles;
  const int nt = threads_for(items, nthreads);
  // Sums per slot, a fixed run of items summed in item order, the slots then added in slot order: the
  // result does not depend on which thread ran what (it did with one sum per thread over items handed
  // out dynamically: a busy machine changed the weight gradient's last bits, and the training run).
  // Twice as many slots as threads, handed out dynamically, so a parked thread delays little; one
  // thread keeps one sum in item order (the same bits as before slots, so earlier runs reproduce).
  const int64_t n_slots = nt == 1 ? 1 : std::min<int64_t>(items, 2 * nt);
  std::vector<float> s_priv(size_t(n_slots * cg.G * K_pad * M_pad), 0.f);
#pragma omp parallel num_threads(nt)
  {
    // Panels [RT / CONV_PW][K][CONV_PW], plus one panel's worth of zeros: the k
    // blocks of weight_grad_block may run up to K_pad > K (those sums are dropped).
    std::vector<float> xp(static_cast<size_t>((RT + CONV_PW) * K_pad), 0.f), gp(static_cast<size_t>(RT * M_pad), 0.f);
    PanelReads pr(cg);
#pragma omp for schedule(dynamic, 1)
    for (int64_t slot = 0; slot < n_slots; ++slot) {
      float* S = &s_priv[size_t(slot * cg.G * K_pad * M_pad)];
      for (int64_t it = items * slot / n_slots; it < items * (slot + 1) / n_slots; ++it) {
        const int64_t t = it % n_tiles, gr = (it / n_tiles) % cg.G, bb = it / (n_tiles * cg.G);
        const int64_t pos0 = t * RT, rows = std::min(RT, P - pos0);
        for (int64_t r0 = 0; r0 < rows; r0 += CONV_PW) {  // panels of CONV_PW positions, the forward's vector packer
          pr.plan(cg, pos0 + r0, std::min<int64_t>(CONV_PW, rows - r0));
          pack_conv_slice(x, cg, bb, gr, pr, 0, cg.Cg(), &xp[size_t(r0 * K)]);
        }
        for (int64_t m = 0; m < Mg; ++m) {  // g[b, m, pos0 + r] -> gp[r][m]
          const T* src = g + (bb * cg.M + gr * Mg + m) * P + pos0;
          for (int64_t r = 0; r < rows; ++r) gp[size_t(r * M_pad + m)] = to_f(src[r]);
        }
        for (int64_t r0 = 0; r0 < rows; r0 += CONV_PW)
          weight_grad_block<MODE>(&xp[size_t(r0 * K)], 1, CONV_PW, &gp[size_t(r0 * M_pad)],
                                  &wt[size_t(gr * K_pad * M_pad)], std::min<int64_t>(CONV_PW, rows - r0), K_pad, M_pad, a,
                                  b, S + gr * K_pad * M_pad);
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t gm = 0; gm < cg.M; ++gm) {
      const int64_t gr = gm / Mg, m = gm % Mg;
      for (int64_t k = 0; k < K; ++k) {
        float s = 0.f;
        for (int64_t sl = 0; sl < n_slots; ++sl) s += s_priv[size_t(((sl * cg.G + gr) * K_pad + k) * M_pad + m)];
        gw[gm * K + k] = s;
      }
    }
  }
}

template <typename T>
void conv_weight_grad_dispatch(const T* g, const T* x, const T* w, float* gw, const ConvGeom& cg, float mix,
                               int nthreads) {
  if (mix == 1.0f)
    conv_weight_grad<1>(g, x, w, gw, cg, 1.f, 0.f, nthreads);
  else if (mix == 0.0f)
    conv_weight_grad<0>(g, x, w, gw, cg, 0.f, 1.f, nthreads);
  else
    conv_weight_grad<2>(g, x, w, gw, cg, mix, 1.f - mix, nthreads);
}

ConvGeom make_geom(int64_t B, int64_t C, int64_t M, int64_t G, const int64_t* geom) {
  ConvGeom cg{B, C, M, G, {}, {}, {}, {}, {}, {}};
  for (int i = 0; i < 3; ++i) {
    cg.in[i] = geom[i]; cg.ker[i] = geom[3 + i]; cg.st[i] = geom[6 + i];
    cg.pad[i] = geom[9 + i]; cg.dil[i] = geom[12 + i]; cg.out[i] = geom[15 + i];
  }
  return cg;
}

}  // namespace

// ---------------------------------------------------------------- C ABI
// dtype: 0 = float32, 1 = bfloat16. All matrices row-major and contiguous.
extern "C" {

int l1fx_vector_width() { return VW; }

int l1fx_forward(int dtype, const void* x, const void* w, const void* bias, void* y, int64_t N, int64_t K,
                 int64_t M, int nthreads) {
  if (dtype == 0)
    forward_dispatch((const float*)x, (const float*)w, (const float*)bias, (float*)y, N, K, M, nthreads);
  else if (dtype == 1)
    forward_dispatch((const uint16_t*)x, (const uint16_t*)w, (const uint16_t*)bias, (uint16_t*)y, N, K, M, nthreads);
  else
    return 1;
  return 0;
}

// gx (may be null): input gradient, dtype of x. sign_w (may be null): float32
// [M, K] sum_n g * sign(x - w), the sign half of the weight gradient.
int l1fx_backward(int dtype, const void* g, const void* x, const void* w, void* gx, float* sign_w, float mix,
                  int64_t N, int64_t K, int64_t M, int nthreads) {
  if (dtype == 0)
    backward_dispatch((const float*)g, (const float*)x, (const float*)w, (float*)gx, sign_w, mix, N, K, M, nthreads);
  else if (dtype == 1)
    backward_dispatch((const uint16_t*)g, (const uint16_t*)x, (const uint16_t*)w, (uint16_t*)gx, sign_w, mix, N, K,
                      M, nthreads);
  else
    return 1;
  return 0;
}

// Direct conv forward. x [B, C, in0, in1, in2], w [M, C/G, k0, k1, k2], y [B, M, out0, out1, out2];
// geom = {in[3], ker[3], stride[3], pad[3], dil[3], out[3]}.
int l1fx_conv_forward(int dtype, const void* x, const void* w, const void* bias, void* y, int64_t B, int64_t C,
                      int64_t M, int64_t G, const int64_t* geom, int nthreads) {
  const ConvGeom cg = make_geom(B, C, M, G, geom);
  if (dtype == 0)
    conv_forward((const float*)x, (const float*)w, (const float*)bias, (float*)y, cg, nthreads);
  else if (dtype == 1)
    conv_forward((const uint16_t*)x, (const uint16_t*)w, (const uint16_t*)bias, (uint16_t*)y, cg, nthreads);
  else
    return 1;
  return 0;
}

// Which conv forward kernel l1fx_conv_forward runs for this geometry and
// thread count: 2 = pointwise (kernel 1, stride 1, no padding), 1 = row tiles
// (line buffers), 0 = packed patch panels.
int l1fx_conv_forward_uses_rows(int64_t B, int64_t C, int64_t M, int64_t G, const int64_t* geom, int nthreads) {
  return conv_forward_kind(make_geom(B, C, M, G, geom), nthreads);
}

// The fused forward of onnxruntime's l1fx.L1FusedConv (kernels/csrc/ort_ops.cpp), float32:
//   y = act(scale * (col - sum |x - w|) + shift)
// x: n_x tensors xs[i] [B, x_channels[i], in...] read as one tensor concatenated along channels (no
// copy); col: [M] (col_per_sample = 0: the bias) or [B, M]; scale and shift [M] or both null; relu 0/1.
// The pointwise kernel applies all of it in registers; the other kernels (one input tensor only)
// compute -sum |x - w| and the epilogue runs over their output once, in place, with the same rounding
// (col + (-acc) is col - acc). Returns 2 for several input tensors with a non-pointwise geometry.
int l1fx_conv_forward_fused(int n_x, const float* const* xs, const int64_t* x_channels, const float* w,
                            const float* col, int col_per_sample, const float* scale, const float* shift, int relu,
                            float* y, int64_t B, int64_t C, int64_t M, int64_t G, const int64_t* geom, int nthreads) {
  const ConvGeom cg = make_geom(B, C, M, G, geom);
  int64_t channels = 0;
  for (int i = 0; i < n_x; ++i) channels += x_channels[i];
  if (n_x < 1 || channels != C || (scale == nullptr) != (shift == nullptr)) return 1;
  Epilogue ep;
  ep.col = col_per_sample ? col : nullptr;
  ep.scale = scale;
  ep.shift = shift;
  ep.relu = relu != 0;
  if (conv_forward_kind(cg, nthreads) == 2) {
    conv_forward_pointwise(ChannelRows<float>(n_x, xs, x_channels, cg.S()), w, col_per_sample ? nullptr : col, y, cg,
                           nthreads, ep);
    return 0;
  }
  if (n_x != 1) return 2;
  conv_forward(xs[0], w, static_cast<const float*>(nullptr), y, cg, nthreads);
  const int64_t P = cg.P();
#pragma omp parallel for num_threads(threads_for(B * M, nthreads)) schedule(static)
  for (int64_t bm = 0; bm < B * M; ++bm) {
    const int64_t m = bm % M;
    const float c = col_per_sample ? col[bm] : col[m];
    float* yp = y + bm * P;
    const vf cv = splat(c);
    int64_t p = 0;
    for (; p + VW <= P; p += VW) store(yp + p, ep.apply(cv + load(yp + p), m));
    for (; p < P; ++p) yp[p] = ep.apply(c + yp[p], m);
  }
  return 0;
}

// Direct conv input gradient (any geometry): g [B, M, out...], gx like x.
int l1fx_conv_input_grad(int dtype, const void* g, const void* x, const void* w, void* gx, float mix, int64_t B,
                         int64_t C, int64_t M, int64_t G, const int64_t* geom, int nthreads) {
  ConvGeom cg = make_geom(B, C, M, G, geom);
  if (dtype == 0)
    conv_input_grad_dispatch((const float*)g, (const float*)x, (const float*)w, (float*)gx, cg, mix, nthreads);
  else if (dtype == 1)
    conv_input_grad_dispatch((const uint16_t*)g, (const uint16_t*)x, (const uint16_t*)w, (uint16_t*)gx, cg, mix,
                             nthreads);
  else
    return 1;
  return 0;
}

// Direct conv weight gradient (any geometry): g [B, M, out...], gw float32 [M, C/G, k...].
int l1fx_conv_weight_grad(int dtype, const void* g, const void* x, const void* w, float* gw, float mix, int64_t B,
                          int64_t C, int64_t M, int64_t G, const int64_t* geom, int nthreads) {
  const ConvGeom cg = make_geom(B, C, M, G, geom);
  if (dtype == 0)
    conv_weight_grad_dispatch((const float*)g, (const float*)x, (const float*)w, gw, cg, mix, nthreads);
  else if (dtype == 1)
    conv_weight_grad_dispatch((const uint16_t*)g, (const uint16_t*)x, (const uint16_t*)w, gw, cg, mix, nthreads);
  else
    return 1;
  return 0;
}

}  // extern "C"
