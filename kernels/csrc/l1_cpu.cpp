// l1fx CPU kernels: the l1 ("adder") linear core and its MGS backward.
//
//   forward   y[n,m]  = bias[m] - sum_k |x[n,k] - w[m,k]|
//   input     gx[n,k] = sum_m g[n,m] * (a*clamp(w-x,-1,1) + b*sign(w-x))
//   weight    S[m,k]  = sum_n g[n,m] * sign(x[n,k] - w[m,k])
//             (the sign half of the weight gradient; the a*(x-w) half is a
//             matmul, g^T x - w * colsum(g), which the Python side hands to BLAS)
//
// with a = mix, b = 1 - mix.
//
// Written like a GEMM: weights are repacked once, a register tile of rows x
// filters (or rows x k) is accumulated with the reduced dimension innermost,
// and rows are processed in blocks copied (and converted from bfloat16) into
// small per-thread float buffers. No N x M x K tensor exists; the extra memory
// is the packed weights plus a few row blocks per thread (plus, for S, one
// M x K accumulator per thread). Accumulation is float32 for both dtypes.
//
// Fewer vector ops per (row, filter, k) triple is what makes the l1 layer cost
// about what a matmul costs (a matmul needs one FMA per triple):
// * forward: |x - w| = x + w - 2 min(x, w), so the inner loop is one min and
//   one FMA (acc += min * 1 keeps the add on the FMA ports, min uses the
//   adder ports) instead of sub + abs + add. sum_k x and sum_k w are added
//   back per row / filter. To keep that cancellation harmless for data far
//   from zero, x and w are first shifted by the same per-column centre c_k
//   (the mean of w[:, k]); |x - w| does not change.
// * input gradient, mix = 1: clamp(w - x, -1, 1) = clamp(w, x - 1, x + 1) - x,
//   so the inner loop is min, max, FMA and x * sum_m g is subtracted once.
// * sign terms compare the raw (unshifted) values, so ties x == w give
//   exactly 0 like torch.sign, using masked adds.
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

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register (32 registers)
constexpr int FWD_R = 8, FWD_FV = 2;  // forward tile: 8 rows x 2 vectors of filters
constexpr int GX1_R = 4, GX1_KV = 2;  // input grad, mix 1: 4 rows x 2 vectors of k
constexpr int GXS_R = 4, GXS_KV = 2;  // input grad, mix 0
constexpr int GXB_R = 2, GXB_KV = 2;  // input grad, blended mix
constexpr int GW_KB = 4, GW_FV = 2;   // sign sum: 4 k x 2 vectors of filters
#else
constexpr int VW = 8;  // AVX2 / NEON-pairs: 16 registers
constexpr int FWD_R = 4, FWD_FV = 2;
constexpr int GX1_R = 2, GX1_KV = 1;
constexpr int GXS_R = 2, GXS_KV = 2;
constexpr int GXB_R = 1, GXB_KV = 2;
constexpr int GW_KB = 2, GW_FV = 1;
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

// a - 0.0f folds away (a + 0.0f would not: -0.0f + 0.0f == +0.0f), leaving one broadcast.
inline vf splat(float a) { return a - vf{}; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
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

// Rows [n0, n0+rows) of a [*, cols] matrix minus the column centres (may be
// null) into a float buffer [rows_pad, cols_pad], zero padded; row sums of
// the stored values into rsum (may be null).
template <typename T>
void pack_rows(const T* src, int64_t cols, int64_t n0, int64_t rows, int64_t rows_pad, int64_t cols_pad,
               const float* centre, float* dst, float* rsum) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    float* d = dst + r * cols_pad;
    double s = 0.0;
    if (r < rows) {
      const T* src_row = src + (n0 + r) * cols;
      for (int64_t c = 0; c < cols; ++c) {
        d[c] = centre ? to_f(src_row[c]) - centre[c] : to_f(src_row[c]);
        s += d[c];
      }
    }
    for (int64_t c = r < rows ? cols : 0; c < cols_pad; ++c) d[c] = 0.f;
    if (rsum) rsum[r] = float(s);
  }
}

// Packed weights, float32: wc = w - centre as [M, K_pad] (rows) and/or
// [K_pad, M_pad] (transposed, filters contiguous), zero padded.
struct PackedW {
  std::vector<float> centre, rows, cols, sums;  // sums[m] = sum_k wc[m, k]
};

template <typename T>
PackedW pack_w(const T* w, int64_t M, int64_t K, int64_t M_pad, int64_t K_pad, bool centred, bool want_rows,
               bool want_cols) {
  PackedW p;
  p.centre.assign(size_t(K), 0.f);
  if (centred && M > 0) {
    std::vector<double> c(size_t(K), 0.0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) c[size_t(k)] += to_f(w[m * K + k]);
    for (int64_t k = 0; k < K; ++k) p.centre[size_t(k)] = float(c[size_t(k)] / double(M));
  }
  if (want_rows) p.rows.assign(size_t(M * K_pad), 0.f);
  if (want_cols) p.cols.assign(size_t(K_pad * M_pad), 0.f);
  p.sums.assign(size_t(M_pad), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const float v = to_f(w[m * K + k]) - p.centre[size_t(k)];
      s += v;
      if (want_rows) p.rows[size_t(m * K_pad + k)] = v;
      if (want_cols) p.cols[size_t(k * M_pad + m)] = v;
    }
    p.sums[size_t(m)] = float(s);
  }
  return p;
}

int threads_for(int64_t work_items, int nthreads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(nthreads, work_items)));
}

// ---------------------------------------------------------------- forward
// Weights as panels of F = FWD_FV*VW filters: panel p is [K, F] contiguous.
template <typename T>
void forward(const T* x, const T* w, const T* bias, T* y, int64_t N, int64_t K, int64_t M, int nthreads) {
  constexpr int F = FWD_FV * VW;
  const int64_t n_panels = (M + F - 1) / F;
  const int64_t M_pad = n_panels * F;
  const PackedW pw = pack_w(w, M, K, M_pad, K, /*centred=*/true, false, true);
  std::vector<float> wp(size_t(n_panels * K * F));  // [K, M_pad] -> panels [p][K][F]
  for (int64_t p = 0; p < n_panels; ++p)
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(&wp[size_t((p * K + k) * F)], &pw.cols[size_t(k * M_pad + p * F)], F * sizeof(float));
  // y = 2 acc + (bias - sum_k wc) - sum_k xc, acc = sum_k min(xc, wc).
  std::vector<float> col_term(size_t(M_pad), 0.f);
  for (int64_t m = 0; m < M; ++m) col_term[size_t(m)] = (bias ? to_f(bias[m]) : 0.f) - pw.sums[size_t(m)];

  // Row blocks small enough that a block of x stays in L2 next to a panel.
  const int64_t NB = std::max<int64_t>(FWD_R, std::min<int64_t>(256, 16384 / std::max<int64_t>(K, 1)) / FWD_R * FWD_R);
  const int64_t n_blocks = (N + NB - 1) / NB;
  // Split the panels too when there are few row blocks, to feed every thread.
  const int64_t groups = std::min<int64_t>(n_panels, std::max<int64_t>(1, (4 * nthreads + n_blocks - 1) / n_blocks));
  const int64_t per_group = (n_panels + groups - 1) / groups;
  const int64_t items = n_blocks * groups;

#pragma omp parallel num_threads(threads_for(items, nthreads))
  {
    std::vector<float> xb(static_cast<size_t>(NB * K)), xsum(static_cast<size_t>(NB));
    const vf one = splat(kOpaqueOne), two = splat(2.0f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t blk = it / groups, grp = it % groups;
      const int64_t n0 = blk * NB, rows = std::min(NB, N - n0);
      const int64_t rows_pad = round_up(rows, FWD_R);
      pack_rows(x, K, n0, rows, rows_pad, K, pw.centre.data(), xb.data(), xsum.data());
      const int64_t p1 = std::min(n_panels, (grp + 1) * per_group);
      for (int64_t p = grp * per_group; p < p1; ++p) {
        const float* wpp = &wp[size_t(p * K * F)];
        const int64_t m0 = p * F, mcols = std::min<int64_t>(F, M - m0);
        for (int64_t r0 = 0; r0 < rows_pad; r0 += FWD_R) {
          vf acc[FWD_R][FWD_FV];
          for (int r = 0; r < FWD_R; ++r)
            for (int f = 0; f < FWD_FV; ++f) acc[r][f] = vf{};
          const float* xr = &xb[size_t(r0 * K)];
          for (int64_t k = 0; k < K; ++k) {
            vf wv[FWD_FV];
            for (int f = 0; f < FWD_FV; ++f) wv[f] = load(wpp + k * F + f * VW);
            for (int r = 0; r < FWD_R; ++r) {
              const vf xv = splat(xr[r * K + k]);
              for (int f = 0; f < FWD_FV; ++f) acc[r][f] = acc[r][f] + vmin(xv, wv[f]) * one;
            }
          }
          for (int r = 0; r < FWD_R && r0 + r < rows; ++r) {
            T* yr = y + (n0 + r0 + r) * M + m0;
            const vf row_term = splat(xsum[size_t(r0 + r)]);
            float out[F];
            for (int f = 0; f < FWD_FV; ++f)
              store(out + f * VW, two * acc[r][f] + (load(&col_term[size_t(m0 + f * VW)]) - row_term));
            if (std::is_same<T, float>::value && mcols == F)
              std::memcpy(yr, out, sizeof out);  // one vector store per register
            else
              for (int64_t c = 0; c < mcols; ++c) from_f(out[c], yr + c);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- backward
// Input gradient of one packed row block, vectorised over k (so the sum over
// filters is a plain vertical add): xp [rows_pad, K_pad], gp [rows_pad, M],
// wr [M, K_pad]; gsum[r] = sum_m g[r, m].
//   MODE 1 (mix 1): xp, wr centred; acc = sum_m g * clamp(w, x-1, x+1); gx = acc - x * gsum
//   MODE 0 (mix 0): raw; acc = sum_{w>x} g - sum_{w<x} g
//   MODE 2 (blend): raw; d = w - x; acc = sum_m a*g*clamp(d) + b*g*sign(d)
template <int MODE, int R, int KV, typename T>
void input_grad_block(const float* xp, const float* gp, const float* gsum, const float* wr, int64_t rows,
                      int64_t rows_pad, int64_t K, int64_t K_pad, int64_t M, float a, float b, T* gx,
                      int64_t n0) {
  const vf pone = splat(1.0f), mone = splat(-1.0f);
  const vf av = splat(a), bv = splat(b);
  for (int64_t r0 = 0; r0 < rows_pad; r0 += R) {
    for (int64_t k0 = 0; k0 < K_pad; k0 += KV * VW) {
      vf acc[R][KV], neg[R][KV], xv[R][KV], lo[R][KV], hi[R][KV];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < KV; ++j) {
          acc[r][j] = neg[r][j] = vf{};
          xv[r][j] = load(xp + (r0 + r) * K_pad + k0 + j * VW);
          if (MODE == 1) { lo[r][j] = xv[r][j] - pone; hi[r][j] = xv[r][j] + pone; }
        }
      for (int64_t m = 0; m < M; ++m) {
        vf wv[KV];
        for (int j = 0; j < KV; ++j) wv[j] = load(wr + m * K_pad + k0 + j * VW);
        for (int r = 0; r < R; ++r) {
          const float gs = gp[(r0 + r) * M + m];
          const vf gv = splat(gs);
          for (int j = 0; j < KV; ++j) {
            if (MODE == 1) {
              acc[r][j] = acc[r][j] + vmin(vmax(wv[j], lo[r][j]), hi[r][j]) * gv;
            } else if (MODE == 0) {
              acc[r][j] = wv[j] > xv[r][j] ? acc[r][j] + gv : acc[r][j];
              neg[r][j] = wv[j] < xv[r][j] ? neg[r][j] + gv : neg[r][j];
            } else {
              const vf d = wv[j] - xv[r][j];
              const vf gb = gv * bv;
              acc[r][j] = acc[r][j] + vmin(vmax(d, mone), pone) * (gv * av);
              acc[r][j] = d > vf{} ? acc[r][j] + gb : acc[r][j];
              neg[r][j] = d < vf{} ? neg[r][j] + gb : neg[r][j];
            }
          }
        }
      }
      for (int r = 0; r < R && r0 + r < rows; ++r) {
        const vf x_term = splat(MODE == 1 ? gsum[r0 + r] : 0.f);
        for (int j = 0; j < KV; ++j) {
          float out[VW];
          vf v = acc[r][j] - neg[r][j];
          if (MODE == 1) v -= xv[r][j] * x_term;
          store(out, v);
          for (int i = 0; i < VW && k0 + j * VW + i < K; ++i) from_f(out[i], gx + (n0 + r0 + r) * K + k0 + j * VW + i);
        }
      }
    }
  }
}

// S[k, m] += sum over the block's rows of g[n,m] * sign(x[n,k] - w[m,k]), raw
// values, vectorised over filters: xp [rows, K_pad], gp [rows, M_pad],
// wt [K_pad, M_pad]. The rows (the reduced dimension) are the innermost loop,
// read in memory order; the accumulators and weights stay in registers.
inline void sign_grad_block(const float* xp, const float* gp, const float* wt, int64_t rows, int64_t K_pad,
                            int64_t M_pad, float* S) {
  constexpr int F = GW_FV * VW;
  for (int64_t m0 = 0; m0 < M_pad; m0 += F) {
    for (int64_t k0 = 0; k0 < K_pad; k0 += GW_KB) {
      vf pos[GW_KB][GW_FV], neg[GW_KB][GW_FV], wv[GW_KB][GW_FV];
      for (int j = 0; j < GW_KB; ++j)
        for (int f = 0; f < GW_FV; ++f) {
          pos[j][f] = neg[j][f] = vf{};
          wv[j][f] = load(wt + (k0 + j) * M_pad + m0 + f * VW);
        }
      for (int64_t n = 0; n < rows; ++n) {
        vf gv[GW_FV];
        for (int f = 0; f < GW_FV; ++f) gv[f] = load(gp + n * M_pad + m0 + f * VW);
        for (int j = 0; j < GW_KB; ++j) {
          const vf xv = splat(xp[n * K_pad + k0 + j]);
          for (int f = 0; f < GW_FV; ++f) {
            pos[j][f] = xv > wv[j][f] ? pos[j][f] + gv[f] : pos[j][f];
            neg[j][f] = xv < wv[j][f] ? neg[j][f] + gv[f] : neg[j][f];
          }
        }
      }
      for (int j = 0; j < GW_KB; ++j)
        for (int f = 0; f < GW_FV; ++f) {
          float* s = S + (k0 + j) * M_pad + m0 + f * VW;
          store(s, load(s) + (pos[j][f] - neg[j][f]));
        }
    }
  }
}

// One pass over row blocks computing gx (if gx != nullptr) and the sign sum
// (if s_out != nullptr, float32 [M, K]), sharing the packed row blocks.
template <int MODE, typename T>
void backward(const T* g, const T* x, const T* w, T* gx, float* s_out, float a, float b, int64_t N, int64_t K,
              int64_t M, int nthreads) {
  constexpr int R = MODE == 1 ? GX1_R : MODE == 0 ? GXS_R : GXB_R;
  constexpr int KV = MODE == 1 ? GX1_KV : MODE == 0 ? GXS_KV : GXB_KV;
  constexpr int KQ = KV * VW > GW_KB ? KV * VW : GW_KB;
  constexpr int RQ = R > 1 ? R : 1;
  const int64_t K_pad = round_up(std::max<int64_t>(K, 1), KQ);
  const int64_t M_pad = round_up(std::max<int64_t>(M, 1), GW_FV * VW);
  const bool centred = MODE == 1;  // sign terms need the raw values (exact ties)
  const PackedW pw = pack_w(w, M, K, M_pad, K_pad, centred, gx != nullptr, s_out != nullptr);
  const float* centre = centred ? pw.centre.data() : nullptr;
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
    std::vector<float> xp(static_cast<size_t>(NB * K_pad)), gp(static_cast<size_t>(NB * M_pad)),
        gsum(static_cast<size_t>(NB));
    float* S = s_out ? &s_priv[size_t(tid * K_pad * M_pad)] : nullptr;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t n0 = blk * NB, rows = std::min(NB, N - n0), rows_pad = round_up(rows, RQ);
      pack_rows(x, K, n0, rows, rows_pad, K_pad, centre, xp.data(), nullptr);
      if (gx) {
        pack_rows(g, M, n0, rows, rows_pad, M, nullptr, gp.data(), gsum.data());
        input_grad_block<MODE, R, KV>(xp.data(), gp.data(), gsum.data(), pw.rows.data(), rows, rows_pad, K, K_pad, M,
                                      a, b, gx, n0);
      }
      if (S) {
        pack_rows(g, M, n0, rows, rows, M_pad, nullptr, gp.data(), nullptr);
        sign_grad_block(xp.data(), gp.data(), pw.cols.data(), rows, K_pad, M_pad, S);
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
  if (gx && s && mix != 0.0f) {  // the blend's gx is a different pass from the sign sum
    backward<2>(g, x, w, gx, nullptr, mix, 1.f - mix, N, K, M, nthreads);
    backward<0>(g, x, w, (T*)nullptr, s, 0.f, 1.f, N, K, M, nthreads);
  } else if (gx && mix == 1.0f) {
    backward<1>(g, x, w, gx, s, 1.f, 0.f, N, K, M, nthreads);
  } else if (!gx || mix == 0.0f) {
    backward<0>(g, x, w, gx, s, 0.f, 1.f, N, K, M, nthreads);
  } else {
    backward<2>(g, x, w, gx, s, mix, 1.f - mix, N, K, M, nthreads);
  }
}

}  // namespace

// ---------------------------------------------------------------- C ABI
// dtype: 0 = float32, 1 = bfloat16. All matrices row-major and contiguous.
extern "C" {

int l1fx_vector_width() { return VW; }

int l1fx_forward(int dtype, const void* x, const void* w, const void* bias, void* y, int64_t N, int64_t K,
                 int64_t M, int nthreads) {
  if (dtype == 0)
    forward((const float*)x, (const float*)w, (const float*)bias, (float*)y, N, K, M, nthreads);
  else if (dtype == 1)
    forward((const uint16_t*)x, (const uint16_t*)w, (const uint16_t*)bias, (uint16_t*)y, N, K, M, nthreads);
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

}  // extern "C"
