// l1fx int8 kernels: the quantised l1 core on the CPU's sum-of-absolute-differences instruction.
//
//   acc[n,m] = sum_k |qx[n,k] - qw[m,k]|          (uint8 codes, exact, 64-bit lanes)
//   y[n,m]   = bias[m] + -(scale * float(acc))    (out_kind 0; or acc as int32 / int64)
//
// Input and weight share one scale and zero point (they are subtracted), so the
// zero point cancels inside |qx - qw| and never enters the sum.
//
// Weight layout (packed once, in Python, at quantisation time): blocks of 8
// filters x 8 k, [ceil(M/8)][ceil(K/8)][8 filters][8 bytes], zero padded. One
// 64-byte block is one AVX-512 register: qword lane j holds 8 consecutive k of
// filter j. Broadcasting 8 bytes of an input row to all 8 lanes and issuing one
// VPSADBW gives, in lane j, sum_{8 k} |x - w_j|: eight outputs advance by 8
// terms per instruction with no horizontal reduction (the accumulators are the
// outputs). AVX2 does the same on 4-filter halves (VPSADBW ymm); the portable
// path is the scalar loop over the same layout. Zero padding of K in both x and
// w adds |0 - 0| = 0.
//
// Overflow: a SAD lane adds at most 8 * 255 per step into a uint64 lane, so the
// accumulator cannot overflow for any K below 2^53; the int32 output is
// requested only when 255 * K < 2^31 (K <= 8,421,504), int64 otherwise.
//
// in_kind 0 quantises float32 rows here (q = clamp(nearbyint(x / scale) + zp,
// 0, 255), the same float operations as the torch reference and as ONNX
// QuantizeLinear, so an exported model gives the same codes) into a
// per-thread panel, so no uint8 copy of x is made; a row holding NaN gives NaN
// outputs (the float formula's answer). in_kind 1 reads uint8 codes.
//
// isa: 2 = AVX-512BW, 1 = AVX2, 0 = portable; capped by what was compiled in
// (l1fx_i8_isa), so the tests run every path on one machine.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t PANEL = 48;  // rows quantised/copied per thread step (a multiple of every R)

inline uint8_t quant1(float v, float scale, float zp) {
  float q = std::nearbyint(v / scale) + zp;  // nearbyint: round half to even, as torch.round and ONNX
  q = std::min(std::max(q, 0.0f), 255.0f);
  return static_cast<uint8_t>(q);
}

// Quantise (or copy) `rows` rows into panel[r * k8 ...], zero padding k..k8; nan[r] = row holds NaN.
// The panel needs PANEL_SLACK bytes past its last row: the AVX-512 path stores 16 codes at a time.
constexpr int64_t PANEL_SLACK = 16;
void fill_panel(int in_kind, const void* x, int64_t n0, int64_t rows, int64_t k, int64_t k8, float qscale, float zp,
                uint8_t* panel, uint8_t* nan) {
#if defined(__AVX512BW__)
  if (in_kind == 0) {
    // The same operations as quant1, 16 at a time (roundscale to nearest even = nearbyint). A row's last
    // vector is a masked load whose dead lanes are stored as 0: that store also writes the zero padding
    // k..k8 (k8 <= the end of that vector), so there is no scalar tail and no memset per row (at K = 64
    // those cost as much as the quantisation itself).
    const __m512 vscale = _mm512_set1_ps(qscale), vzp = _mm512_set1_ps(zp), lo = _mm512_setzero_ps(),
                 hi = _mm512_set1_ps(255.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = static_cast<const float*>(x) + (n0 + r) * k;
      uint8_t* dst = panel + r * k8;
      __mmask16 nanmask = 0;
      for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 live = static_cast<__mmask16>(k - i >= 16 ? 0xffff : (1u << (k - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(live, src + i);
        nanmask |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        __m512 q = _mm512_add_ps(
            _mm512_roundscale_ps(_mm512_div_ps(v, vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vzp);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_maskz_cvtusepi32_epi8(live, _mm512_cvttps_epi32(q)));
      }
      nan[r] = nanmask != 0;
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = panel + r * k8;
    nan[r] = 0;
    if (in_kind == 1) {
      std::memcpy(dst, static_cast<const uint8_t*>(x) + (n0 + r) * k, k);
    } else {
      const float* src = static_cast<const float*>(x) + (n0 + r) * k;
      bool bad = false;
      for (int64_t i = 0; i < k; ++i) {
        bad |= std::isnan(src[i]);
        dst[i] = quant1(src[i], qscale, zp);
      }
      nan[r] = bad;
    }
    std::memset(dst + k, 0, k8 - k);
  }
}

// The dequantisation is bias + -(scale * float(acc)) with two roundings, as the torch reference computes it:
// contraction into one fused multiply-add (which GCC does by default, even in ISO C++ mode) is switched off.
#if defined(__clang__)
#define L1FX_NO_CONTRACT
#elif defined(__GNUC__)
#define L1FX_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define L1FX_NO_CONTRACT
#endif

L1FX_NO_CONTRACT void write_float(float* out, const uint64_t* a, const float* bias, int64_t m0, int64_t m1,
                                  float scale) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t j = m0; j < m1; ++j) {
    const float v = -(scale * static_cast<float>(static_cast<int64_t>(a[j - m0])));
    out[j] = bias ? bias[j] + v : v;
  }
}

// ---------------------------------------------------------------- tiles: out[r][c*8 + j] for R rows x C blocks

template <int R, int C>
void tile_scalar(const uint8_t* xs, int64_t k8, const uint8_t* wp, int64_t kb, uint64_t* out) {
  uint64_t acc[R][C * 8] = {};
  for (int64_t j = 0; j < kb; ++j)
    for (int r = 0; r < R; ++r) {
      const uint8_t* xv = xs + r * k8 + j * 8;
      for (int c = 0; c < C; ++c) {
        const uint8_t* wv = wp + (c * kb + j) * 64;
        for (int l = 0; l < 8; ++l) {
          uint32_t s = 0;
          for (int b = 0; b < 8; ++b) s += static_cast<uint32_t>(std::abs(int(xv[b]) - int(wv[l * 8 + b])));
          acc[r][c * 8 + l] += s;
        }
      }
    }
  std::memcpy(out, acc, sizeof(acc));
}

#if defined(__AVX2__)
template <int R, int C>
void tile_avx2(const uint8_t* xs, int64_t k8, const uint8_t* wp, int64_t kb, uint64_t* out) {
  __m256i acc[R][2 * C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * C; ++c) acc[r][c] = _mm256_setzero_si256();
  for (int64_t j = 0; j < kb; ++j) {
    __m256i w[2 * C];
    for (int c = 0; c < C; ++c) {
      const uint8_t* p = wp + (c * kb + j) * 64;
      w[2 * c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      w[2 * c + 1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    }
    for (int r = 0; r < R; ++r) {
      int64_t v;
      std::memcpy(&v, xs + r * k8 + j * 8, 8);
      const __m256i xv = _mm256_set1_epi64x(v);
      for (int c = 0; c < 2 * C; ++c) acc[r][c] = _mm256_add_epi64(acc[r][c], _mm256_sad_epu8(xv, w[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * C; ++c) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * C * 8 + c * 4), acc[r][c]);
}
#endif

#if defined(__AVX512BW__)
// What a tile writes: rows [R] of y (float, int32 or int64 per out_kind), filters m0 .. m1 of them.
struct Epilogue {
  int out_kind;
  void* y;
  int64_t ld, row0, m0, m1;
  float scale;
  const float* bias;
  const uint8_t* nan;  // per tile row, or null
  bool sums_fit_int32;  // 255 * K < 2^31
  const float* row_bias = nullptr;  // bias per output row (channels-first mode), indexed by row0 + r
  const uint8_t* col_nan = nullptr;  // NaN flag per output column (channels-first mode), indexed by j - cbase
  int64_t cbase = 0;
};

// The accumulators are written straight from registers: VCVTUQQ2PS rounds to nearest like the scalar cast,
// then bias + -(scale * t) with two roundings (no contraction: see write_float).
template <int R, int C>
L1FX_NO_CONTRACT void tile_avx512(const uint8_t* xs, int64_t k8, const uint8_t* wp, int64_t kb, const Epilogue& e) {
  __m512i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t j = 0; j < kb; ++j) {
    __m512i w[C];
    for (int c = 0; c < C; ++c) w[c] = _mm512_loadu_si512(wp + (c * kb + j) * 64);
    for (int r = 0; r < R; ++r) {
      int64_t v;
      std::memcpy(&v, xs + r * k8 + j * 8, 8);
      const __m512i xv = _mm512_set1_epi64(v);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_add_epi64(acc[r][c], _mm512_sad_epu8(xv, w[c]));
    }
  }
  const __m256 vscale = _mm256_set1_ps(e.scale), sign = _mm256_set1_ps(-0.0f), nanv = _mm256_set1_ps(NAN);
  int c0 = 0;
  if (e.out_kind == 0 && e.sums_fit_int32) {
    // Two blocks at once: their 16 sums (< 2^31) as int32, VCVTDQ2PS (exact as the int64 conversion of the same
    // integer), one multiply, subtract and store for 16 outputs. The last odd block goes the 8-wide way below.
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512 vscale16 = _mm512_set1_ps(e.scale), sign16 = _mm512_set1_ps(-0.0f), nan16 = _mm512_set1_ps(NAN);
    for (; c0 + 1 < C; c0 += 2) {
      const int64_t j0 = e.m0 + c0 * 8;
      if (j0 >= e.m1) break;
      const int64_t left = e.m1 - j0;
      const __mmask16 mask = static_cast<__mmask16>(left >= 16 ? 0xffff : (1u << left) - 1);
      const __m512 b = e.bias ? _mm512_maskz_loadu_ps(mask, e.bias + j0) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) {
        const __m512i sums = _mm512_permutex2var_epi32(acc[r][c0], even, acc[r][c0 + 1]);
        const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), vscale16);
        __m512 v = e.row_bias ? _mm512_sub_ps(_mm512_set1_ps(e.row_bias[e.row0 + r]), p)
                   : e.bias   ? _mm512_sub_ps(b, p)
                              : _mm512_xor_ps(p, sign16);
        if (e.nan && e.nan[r]) v = nan16;
        if (e.col_nan) {
          const __m128i f = _mm_maskz_loadu_epi8(mask, e.col_nan + (j0 - e.cbase));
          v = _mm512_mask_mov_ps(v, _mm_mask_cmpneq_epi8_mask(mask, f, _mm_setzero_si128()), nan16);
        }
        float* dst = static_cast<float*>(e.y) + (e.row0 + r) * e.ld + j0;
        if (mask == 0xffff) _mm512_storeu_ps(dst, v); else _mm512_mask_storeu_ps(dst, mask, v);
      }
    }
  }
  for (int c = c0; c < C; ++c) {
    const int64_t j0 = e.m0 + c * 8;
    if (j0 >= e.m1) break;
    const __mmask8 mask = static_cast<__mmask8>(e.m1 - j0 >= 8 ? 0xff : (1u << (e.m1 - j0)) - 1);
    const __m256 b = e.bias ? _mm256_maskz_loadu_ps(mask, e.bias + j0) : _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const int64_t off = (e.row0 + r) * e.ld + j0;
      // Plain stores where the 8 filters are all real (masked stores are slow on some CPUs).
      if (e.out_kind == 0) {
        const __m256 p = _mm256_mul_ps(_mm512_cvtepu64_ps(acc[r][c]), vscale);
        __m256 v = e.row_bias ? _mm256_sub_ps(_mm256_set1_ps(e.row_bias[e.row0 + r]), p)
                   : e.bias   ? _mm256_sub_ps(b, p)
                              : _mm256_xor_ps(p, sign);
        if (e.nan && e.nan[r]) v = nanv;
        if (e.col_nan) {
          const __m128i f = _mm_maskz_loadu_epi8(mask, e.col_nan + (j0 - e.cbase));
          const __mmask8 nm = static_cast<__mmask8>(_mm_mask_cmpneq_epi8_mask(mask, f, _mm_setzero_si128()));
          v = _mm256_mask_mov_ps(v, nm, nanv);
        }
        float* dst = static_cast<float*>(e.y) + off;
        if (mask == 0xff) _mm256_storeu_ps(dst, v); else _mm256_mask_storeu_ps(dst, mask, v);
      } else if (e.out_kind == 1) {
        const __m256i v = _mm512_cvtepi64_epi32(acc[r][c]);
        int32_t* dst = static_cast<int32_t*>(e.y) + off;
        if (mask == 0xff) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
        else _mm256_mask_storeu_epi32(dst, mask, v);
      } else {
        int64_t* dst = static_cast<int64_t*>(e.y) + off;
        if (mask == 0xff) _mm512_storeu_si512(dst, acc[r][c]); else _mm512_mask_storeu_epi64(dst, mask, acc[r][c]);
      }
    }
  }
}
using Tile512 = void (*)(const uint8_t*, int64_t, const uint8_t*, int64_t, const Epilogue&);

// The float hot path: a full R x (C * 8) tile (every row and column real, C even, 255 * K < 2^31), written 16
// outputs = one 64-byte line per store. It is the float branch of tile_avx512 with compile-time trip counts
// only, so the R * C accumulators never leave the registers (the generic tile spills them to the stack around
// its run-time edge tests) and the bias of the tile is loaded once, not per row.
// Rows mode (CFM false, the linear kernel): bias and outputs per column (filter), a NaN flag per row (input row).
// Channels-first mode (CFM true, l1fx_i8_pointwise_cf): the rows are filters, the columns positions, so the bias
// is per row and the NaN flags per column.
// stream: non-temporal stores (the output is larger than the caches; the caller checked 64-byte alignment):
// no read-for-ownership of each output line, which at K = 64 costs more than the whole SAD loop.
template <int R, int C, bool CFM = false>
L1FX_NO_CONTRACT inline void tile_f32(const uint8_t* xs, int64_t k8, const uint8_t* wp, int64_t kb, float* y,
                                      int64_t ld, float scale, const float* bias, const uint8_t* nan, bool stream) {
  static_assert(C % 2 == 0, "pairs of 8-filter blocks");
  __m512i acc[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t j = 0; j < kb; ++j) {
    __m512i w[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) w[c] = _mm512_loadu_si512(wp + (c * kb + j) * 64);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int64_t v;
      std::memcpy(&v, xs + r * k8 + j * 8, 8);
      const __m512i xv = _mm512_set1_epi64(v);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_add_epi64(acc[r][c], _mm512_sad_epu8(xv, w[c]));
    }
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512 vscale = _mm512_set1_ps(scale), sign = _mm512_set1_ps(-0.0f), nanv = _mm512_set1_ps(NAN);
#pragma GCC unroll 4
  for (int c = 0; c < C; c += 2) {
    __m512 b = _mm512_setzero_ps();
    __mmask16 bad = 0;
    if (!CFM && bias) b = _mm512_loadu_ps(bias + c * 8);
    if (CFM) bad = _mm_cmpneq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(nan + c * 8)),
                                       _mm_setzero_si128());
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i sums = _mm512_permutex2var_epi32(acc[r][c], even, acc[r][c + 1]);
      const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), vscale);
      if (CFM && bias) b = _mm512_set1_ps(bias[r]);
      __m512 v = bias ? _mm512_sub_ps(b, p) : _mm512_xor_ps(p, sign);
      if (CFM) v = _mm512_mask_mov_ps(v, bad, nanv);
      else if (nan[r]) v = nanv;
      float* dst = y + r * ld + c * 8;
      if (stream) _mm512_stream_ps(dst, v); else _mm512_storeu_ps(dst, v);
    }
  }
}
#endif

// Register tiles: rows x 8-filter blocks. AVX-512: 6 x 4 = 24 accumulators + 4 weights of 32 registers;
// AVX2: 2 x 2 blocks = 8 accumulators + 4 weight halves of 16.
constexpr int R512 = 6, C512 = 4, R256 = 2, C256 = 2, RSC = 4, CSC = 2;
#ifndef L1FX_RF
#define L1FX_RF 12
#define L1FX_CF 2
#endif
constexpr int RF = L1FX_RF, CF = L1FX_CF;  // the float hot path's tile (tile_f32)
static_assert(PANEL % RF == 0, "whole tiles per panel");
// Float outputs of at least this many bytes are streamed (stream = -1): they do not stay cached beside the
// input anyway, and every plain store would first read its line from memory. Measured on Zen 4 (32 MB L3),
// layer + a ReLU reading the output, K = 64, M = 128: plain stores win up to 8 MiB (1.58 vs 1.75 ms), streamed
// ones from 16 MiB (3.64 vs 4.52 ms).
constexpr int64_t STREAM_BYTES = int64_t(12) << 20;
using TileFn = void (*)(const uint8_t*, int64_t, const uint8_t*, int64_t, uint64_t*);

#define L1FX_TILE_TABLE(NAME, FN, RM, CM, FT)                                      \
  template <int R, int C>                                                          \
  FT NAME##_at(int r, int c) {                                                     \
    if constexpr (R > 1) {                                                         \
      if (r < R) return NAME##_at<R - 1, C>(r, c);                                 \
    }                                                                              \
    if constexpr (C > 1) {                                                         \
      if (c < C) return NAME##_at<R, C - 1>(r, c);                                 \
    }                                                                              \
    return &FN<R, C>;                                                              \
  }                                                                                \
  FT NAME(int r, int c) { return NAME##_at<RM, CM>(r, c); }

L1FX_TILE_TABLE(pick_scalar, tile_scalar, RSC, CSC, TileFn)
#if defined(__AVX2__)
L1FX_TILE_TABLE(pick_avx2, tile_avx2, R256, C256, TileFn)
#endif
#if defined(__AVX512BW__)
L1FX_TILE_TABLE(pick_avx512, tile_avx512, R512, C512, Tile512)
#endif

int compiled_isa() {
#if defined(__AVX512BW__)
  return 2;
#elif defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}

}  // namespace

extern "C" {

int l1fx_i8_isa() { return compiled_isa(); }

// y [n, m] from x [n, k] (float32 or uint8, row-major) and the packed weight (see the header).
// stream: 1 = non-temporal stores of the float output, 0 = plain stores, -1 = decide (STREAM_BYTES); it applies
// where it can (AVX-512BW, float output, y 64-byte aligned and m a multiple of 16), else plain stores.
// Returns 0, or 1 for a bad kind, 2 for an int32 output that could overflow, 3 for NaN-capable input
// with integer output.
int l1fx_i8_linear(int in_kind, const void* x, const uint8_t* wp, int64_t n, int64_t k, int64_t m, float qscale,
                   int zero_point, int out_kind, float scale, const float* bias, void* y, int isa, int nthreads,
                   int stream) {
  if ((in_kind != 0 && in_kind != 1) || out_kind < 0 || out_kind > 2) return 1;
  if (out_kind == 1 && 255.0 * double(k) >= 2147483648.0) return 2;
  if (in_kind == 0 && out_kind != 0) return 3;
  if (n <= 0 || m <= 0) return 0;
  isa = std::min(std::max(isa, 0), compiled_isa());
  int rt = RSC, ct = CSC;
  TileFn (*pick)(int, int) = pick_scalar;
#if defined(__AVX2__)
  if (isa == 1) rt = R256, ct = C256, pick = pick_avx2;
#endif
  if (isa == 2) rt = RF, ct = CF;  // its own tiles (tile_f32, pick_avx512 at the edges), which write y themselves
  const int64_t kb = (k + 7) / 8, k8 = kb * 8, mb = (m + 7) / 8;
  const int64_t panels = (n + PANEL - 1) / PANEL;
  const float zp = float(zero_point);
  const bool fits32 = 255.0 * double(k) < 2147483648.0;
  const bool fast = isa == 2 && out_kind == 0 && fits32;
  const bool nt = fast && stream != 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0 && m % 16 == 0 &&
                  (stream == 1 || double(n) * double(m) * 4.0 >= double(STREAM_BYTES));
  (void)fits32;
  (void)nt;
  // A thread takes a chunk of up to 4 consecutive panels (at least 8 chunks per thread, for balance), so it
  // knows its next panel and prefetches that panel's input rows a few lines per tile while this one computes:
  // fill_panel then reads them from L1 instead of stalling on memory at the start of every panel.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(4, panels / (8 * int64_t(std::max(1, nthreads)))));
  const int64_t chunks = (panels + chunk - 1) / chunk;
  const int64_t row_bytes = in_kind == 0 ? 4 * k : k;
  int threads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, chunks)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint8_t> panel(PANEL * k8 + PANEL_SLACK), nan(PANEL);
    std::vector<uint64_t> acc(R512 * C512 * 8 + RSC * CSC * 8 + R256 * C256 * 8);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < chunks; ++c)
    for (int64_t p = c * chunk, p_end = std::min(panels, (c + 1) * chunk); p < p_end; ++p) {
      const int64_t n0 = p * PANEL, rows = std::min(PANEL, n - n0);
      const int64_t tiles = ((mb + ct - 1) / ct) * ((rows + rt - 1) / rt);
      const char* next = static_cast<const char*>(x) + (n0 + PANEL) * row_bytes;
      const int64_t next_lines = p + 1 < p_end ? (std::min(PANEL, n - n0 - PANEL) * row_bytes + 63) / 64 : 0;
      const int64_t lines_per_tile = (next_lines + tiles - 1) / tiles;
      int64_t fetched = 0;
      fill_panel(in_kind, x, n0, rows, k, k8, qscale, zp, panel.data(), nan.data());
      for (int64_t b0 = 0; b0 < mb; b0 += ct) {
        const int cb = int(std::min<int64_t>(ct, mb - b0));
        const int64_t m0 = b0 * 8, m1 = std::min(m, (b0 + cb) * 8);
        for (int64_t r0 = 0; r0 < rows; r0 += rt) {
          const int rr = int(std::min<int64_t>(rt, rows - r0));
          for (int64_t e = 0; e < lines_per_tile && fetched < next_lines; ++e, ++fetched)
            __builtin_prefetch(next + fetched * 64, 0, 3);
#if defined(__AVX512BW__)
          if (isa == 2) {
            if (fast && rr == RF && m1 - m0 == CF * 8) {
              tile_f32<RF, CF>(panel.data() + r0 * k8, k8, wp + b0 * kb * 64, kb, static_cast<float*>(y) + (n0 + r0) * m + m0,
                               m, scale, bias ? bias + m0 : nullptr, nan.data() + r0, nt);
              continue;
            }
            // Edges (and integer outputs): the generic tiles, at most R512 x C512 at a time.
            for (int r1 = 0; r1 < rr; r1 += R512)
              for (int c1 = 0; c1 < cb; c1 += C512) {
                const int r2 = std::min(R512, rr - r1), c2 = std::min(C512, cb - c1);
                const int64_t ma = m0 + c1 * 8, mz = std::min(m1, ma + c2 * 8);
                const Epilogue e{out_kind, y, m, n0 + r0 + r1, ma, mz, scale, bias, nan.data() + r0 + r1, fits32};
                pick_avx512(r2, c2)(panel.data() + (r0 + r1) * k8, k8, wp + (b0 + c1) * kb * 64, kb, e);
              }
            continue;
          }
#endif
          pick(rr, cb)(panel.data() + r0 * k8, k8, wp + b0 * kb * 64, kb, acc.data());
          for (int r = 0; r < rr; ++r) {
            const uint64_t* a = acc.data() + r * cb * 8;
            const int64_t row = n0 + r0 + r;
            if (out_kind == 0) {
              float* out = static_cast<float*>(y) + row * m;
              if (nan[r0 + r]) {
                for (int64_t j = m0; j < m1; ++j) out[j] = NAN;
              } else {
                write_float(out, a, bias, m0, m1, scale);
              }
            } else if (out_kind == 1) {
              int32_t* out = static_cast<int32_t*>(y) + row * m;
              for (int64_t j = m0; j < m1; ++j) out[j] = static_cast<int32_t>(a[j - m0]);
            } else {
              int64_t* out = static_cast<int64_t*>(y) + row * m;
              for (int64_t j = m0; j < m1; ++j) out[j] = static_cast<int64_t>(a[j - m0]);
            }
          }
        }
      }
    }
#if defined(__AVX512BW__)
    if (nt) _mm_sfence();  // this thread's streamed lines are globally visible before the region's barrier
#endif
  }
  return 0;
}

// q = clamp(nearbyint(x / qscale) + zp, 0, 255) elementwise (NaN -> zp); returns the number of NaNs.
int64_t l1fx_i8_quantize(const float* x, uint8_t* q, int64_t count, float qscale, int zero_point, int nthreads) {
  const float zp = float(zero_point);
  int64_t nans = 0;
#pragma omp parallel for num_threads(std::max(1, nthreads)) reduction(+ : nans) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const float v = x[i];
    const bool bad = std::isnan(v);
    nans += bad;
    q[i] = bad ? static_cast<uint8_t>(zero_point) : quant1(v, qscale, zp);
  }
  return nans;
}

// Patch rows of one sample for output positions p0 .. p1 and channels c0 .. c0 + cg: the implicit-GEMM gather of
// the int8 conv (the caller pads q with the zero point). q: [C][D][H][W] codes (1-d/2-d as 3-d with leading 1s);
// g: kernel[3], stride[3], dilation[3], out[3]; rows: [p1 - p0][cg * kd * kh * kw] in (c, kd, kh, kw) order,
// the order of the weight's flattening.
int l1fx_i8_patches(const uint8_t* q, int64_t c0, int64_t cg, int64_t d, int64_t h, int64_t w, const int64_t* g,
                    int64_t p0, int64_t p1, uint8_t* rows, int nthreads) {
  const int64_t kd = g[0], kh = g[1], kw = g[2], sd = g[3], sh = g[4], sw = g[5], dd = g[6], dh = g[7], dw = g[8];
  const int64_t oh = g[10], ow = g[11];
  const int64_t kg = cg * kd * kh * kw;
#pragma omp parallel for num_threads(std::max(1, nthreads)) schedule(static)
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t z = p / (oh * ow), y = (p / ow) % oh, x = p % ow;
    uint8_t* dst = rows + (p - p0) * kg;
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t a = 0; a < kd; ++a)
        for (int64_t b = 0; b < kh; ++b) {
          const uint8_t* src = q + (((c0 + c) * d + z * sd + a * dd) * h + y * sh + b * dh) * w + x * sw;
          if (dw == 1) {
            std::memcpy(dst, src, kw);
          } else {
            for (int64_t e = 0; e < kw; ++e) dst[e] = src[e * dw];
          }
          dst += kw;
        }
  }
  (void)d;
  return 0;
}

#if defined(__AVX512VBMI__)
// The channels-first layer's packing, vectorised: positions l0 .. l0 + np of x [K][L] (row stride l) quantised
// (the operations of fill_panel) into [blocks of 8 positions][kb][8 positions][8 k] codes, nan[p] = position p
// holds NaN in some channel. Per 8 k x 8 positions: four 2-row zmm quantisations (8 positions of channel kk in
// the low half, of kk + 1 in the high half) give the codes channel-major; one VPERMB transposes them to the
// position-major block. Channels past k and positions past np are code 0 (the zero padding of the weight).
void pack_positions(const float* xb, int64_t k, int64_t l, int64_t l0, int64_t np, int64_t kb, float qscale,
                    float zp, uint8_t* packed, uint8_t* nan) {
  const __m512 vscale = _mm512_set1_ps(qscale), vzp = _mm512_set1_ps(zp), lo = _mm512_setzero_ps(),
               hi = _mm512_set1_ps(255.0f);
  alignas(64) uint8_t idx[64];
  for (int p = 0; p < 8; ++p)
    for (int i = 0; i < 8; ++i) idx[p * 8 + i] = static_cast<uint8_t>(i * 8 + p);
  const __m512i transpose = _mm512_load_si512(idx);
  const int64_t blocks = (np + 7) / 8;
  __mmask8 bad[32] = {};  // NaN positions per block (CHUNK / 8 blocks at most)
  for (int64_t kblk = 0; kblk < kb; ++kblk)
    for (int64_t pb = 0; pb < blocks; ++pb) {
      const int64_t p0 = pb * 8;
      const __mmask8 live = static_cast<__mmask8>(np - p0 >= 8 ? 0xff : (1u << (np - p0)) - 1);
      __m128i part[4];
      for (int h = 0; h < 4; ++h) {
        const int64_t c0 = kblk * 8 + 2 * h;
        const __mmask8 m0 = c0 < k ? live : 0, m1 = c0 + 1 < k ? live : 0;
        const float* src = xb + c0 * l + l0 + p0;
        const __m256 a = _mm256_maskz_loadu_ps(m0, src), b = _mm256_maskz_loadu_ps(m1, m1 ? src + l : src);
        const __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
        const __mmask16 both = static_cast<__mmask16>(m0 | (unsigned(m1) << 8));
        const __mmask16 isnan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        bad[pb] |= static_cast<__mmask8>(isnan | (isnan >> 8));
        __m512 q = _mm512_add_ps(
            _mm512_roundscale_ps(_mm512_div_ps(v, vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vzp);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        part[h] = _mm512_maskz_cvtusepi32_epi8(both, _mm512_cvttps_epi32(q));
      }
      __m512i z = _mm512_castsi128_si512(part[0]);
      z = _mm512_inserti32x4(z, part[1], 1);
      z = _mm512_inserti32x4(z, part[2], 2);
      z = _mm512_inserti32x4(z, part[3], 3);
      _mm512_storeu_si512(packed + (pb * kb + kblk) * 64, _mm512_permutexvar_epi8(transpose, z));
    }
  for (int64_t p = 0; p < blocks * 8; ++p) nan[p] = (bad[p / 8] >> (p % 8)) & 1;
}
#endif

#if defined(__AVX512BW__)
// Channels-first pointwise layer: y[n, m, l] = bias[m] + -(scale * sum_k |q(x[n, k, l]) - qw[m, k]|) for x
// [N][K][L] float32, straight into y [N][M][L] with no transposed copy of either. |a - b| is symmetric, so
// the tile's roles swap: its rows are the weight rows (wrows [M][K8] codes, zero padded), its packed operand is
// a chunk of positions quantised and packed here like a weight ([blocks of 8 positions][K8/8][8][8]).
// AVX-512BW builds only (returns 4 elsewhere: the caller uses the rows path).
int l1fx_i8_pointwise_cf(const float* x, const uint8_t* wrows, int64_t n, int64_t k, int64_t l, int64_t m,
                         float qscale, int zero_point, float scale, const float* bias, float* y, int nthreads) {
  const int64_t kb = (k + 7) / 8, k8 = kb * 8;
  constexpr int64_t CHUNK = 256;  // positions per task (32 blocks)
  const int64_t chunks = (l + CHUNK - 1) / CHUNK, tasks = n * chunks;
  const float zp = float(zero_point);
  const bool fits32 = 255.0 * double(k) < 2147483648.0;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, tasks)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint8_t> packed(CHUNK / 8 * kb * 64), nan(CHUNK);
#if !defined(__AVX512VBMI__)
    std::vector<uint8_t> codes(CHUNK);
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / chunks, l0 = (t % chunks) * CHUNK, np = std::min(CHUNK, l - l0);
      const int64_t blocks = (np + 7) / 8;
      const float* xb = x + b * k * l;
#if defined(__AVX512VBMI__)
      pack_positions(xb, k, l, l0, np, kb, qscale, zp, packed.data(), nan.data());
#else
      std::memset(packed.data(), 0, blocks * kb * 64);
      std::memset(nan.data(), 0, CHUNK);
      for (int64_t kk = 0; kk < k; ++kk) {
        const float* src = xb + kk * l + l0;
        for (int64_t p = 0; p < np; ++p) {
          nan[p] |= std::isnan(src[p]);
          codes[p] = quant1(src[p], qscale, zp);
        }
        uint8_t* col = packed.data() + (kk / 8) * 64 + (kk % 8);
        for (int64_t p = 0; p < np; ++p) col[((p / 8) * kb) * 64 + (p % 8) * 8] = codes[p];
      }
#endif
      float* yb = y + b * m * l;
      // Full tiles of 16 positions: 12, 8 or 4 filters at a time (the widths of real layers are multiples of 4)
      // through tile_f32; what is left (filters or positions) through the generic tiles.
      const int64_t full = fits32 ? std::min(blocks, (l - l0) / 8) / 2 * 2 : 0;  // blocks of only real positions
      int64_t m0 = 0;
      for (; m0 < m; ) {
        const int64_t left = m - m0;
        const int rr = left >= 12 ? 12 : left >= 8 ? 8 : left >= 4 ? 4 : 0;
        if (rr == 0) break;
        const float* rb = bias ? bias + m0 : nullptr;
        for (int64_t b0 = 0; b0 < full; b0 += 2) {
          float* dst = yb + m0 * l + l0 + b0 * 8;
          const uint8_t* pk = packed.data() + b0 * kb * 64;
          if (rr == 12) tile_f32<12, 2, true>(wrows + m0 * k8, k8, pk, kb, dst, l, scale, rb, nan.data() + b0 * 8, false);
          else if (rr == 8) tile_f32<8, 2, true>(wrows + m0 * k8, k8, pk, kb, dst, l, scale, rb, nan.data() + b0 * 8, false);
          else tile_f32<4, 2, true>(wrows + m0 * k8, k8, pk, kb, dst, l, scale, rb, nan.data() + b0 * 8, false);
        }
        m0 += rr;
      }
      auto generic = [&](int64_t ma, int64_t mz, int64_t ba, int64_t bz) {
        for (int64_t r0 = ma; r0 < mz; r0 += R512) {
          const int rr = int(std::min<int64_t>(R512, mz - r0));
          for (int64_t b0 = ba; b0 < bz; b0 += C512) {
            const int cb = int(std::min<int64_t>(C512, bz - b0));
            Epilogue e{0, yb, l, r0, l0 + b0 * 8, std::min(l, l0 + (b0 + cb) * 8), scale, nullptr,
                       nullptr, fits32, bias, nan.data(), l0};
            pick_avx512(rr, cb)(wrows + r0 * k8, k8, packed.data() + b0 * kb * 64, kb, e);
          }
        }
      };
      generic(0, m0, full, blocks);  // the positions past the full tiles, for the filters done above
      generic(m0, m, 0, blocks);     // the filters left (fewer than 4), all positions
    }
  }
  return 0;
}
#else
int l1fx_i8_pointwise_cf(const float*, const uint8_t*, int64_t, int64_t, int64_t, int64_t, float, int, float,
                         const float*, float*, int) {
  return 4;
}
#endif

}  // extern "C"
