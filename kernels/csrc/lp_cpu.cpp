// l1fx CPU kernels for the lp layers (p > 1 or p = inf; p = 1 is l1_cpu.cpp):
//
//   forward   y[n,m] = bias[m] - ||x[n,:] - w[m,:]||_p
//   backward  e[n,m,k] = sign(d) (|d| / r)^(p-1),  d = x[n,k] - w[m,k],  r = ||d||_p  (0 where r = 0;
//             p = inf: sign(d)/c on the c entries with |d| = r)
//             gw[m,k] = sum_n g[n,m] (a d + b e),  gx[n,k] = -sum_m g[n,m] (a clamp(d,-1,1) + b e)
//             with a = mix, b = 1 - mix.
//
// float32, finite inputs (both entry points return 3 on a NaN/inf input, and the Python wrapper
// runs the reference kernel instead). Every
// summand is formed from the difference d = fl(x - w) itself (never from ||x||^2 + ||w||^2 - 2 x.w,
// whose terms grow with the data's offset), so each output is within ~K eps |y| of the exact value.
//
// The forward kernel is a GEMM-like register tile (rows x a panel of filters, the filters in the
// vector lanes, weights repacked once as [K][F] panels), one mode per p:
//   p = 2      acc += d*d                               (one FMA per element)
//   p = inf    acc = max(acc, |d|)
//   p = n, n + 1/2 (integer n <= 8)  acc += |d|^n [* sqrt|d|]   (a few multiplies)
//   other p    two passes: m = max |d|, then acc += (|d| / m)^p by a vector exp2(p log2 t)
//              (t in [0, 1]: nothing overflows; r = m acc^(1/p))
// The one-pass modes sum unscaled powers; an output whose sum overflowed or came out below 2^-100
// (where underflowed terms could matter) is recomputed in double precision, scaled by the max
// (rescue_norm), so large |d| and p never give inf or 0 by overflow/underflow.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
constexpr int FV = 2;  // filter vectors per tile
constexpr int F = FV * VW;

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

inline vf splat(float a) { return a - vf{}; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vabs(vf a) { return (vf)((vi)a & (vi{} + 0x7fffffff)); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // finite data: no NaN here
inline vf vsqrt(vf a) {
  vf r;
  for (int i = 0; i < VW; ++i) r[i] = __builtin_sqrtf(a[i]);  // vectorised (VSQRTPS) at -O3
  return r;
}
// sqrt(a) for the summands of p = n + 1/2: VSQRTPS is a slow unit (it made p = 1.5 ~3x slower than
// p = 3); on AVX-512 the 14-bit VRSQRT14PS estimate y and one Newton step, a y (3 - a y^2) / 2,
// give ~1 ulp. a below 2^-100 (y may be inf, and a^(n+1/2) is negligible there): 0.
inline vf vsqrt_fast(vf a) {
#if defined(__AVX512F__)
  const vf y = (vf)_mm512_rsqrt14_ps((__m512)a);
  const vf r = a * y * (1.5f - 0.5f * a * y * y);
  return a >= splat(7.8886091e-31f) ? r : vf{};
#else
  return vsqrt(a);
#endif
}

// log2(t) for t >= 0 (t = 0 and denormals give about -127..-149, whose powers are negligible
// next to the sum's largest term, which is 1): exponent + log2 of the mantissa m in
// [sqrt(1/2), sqrt(2)) as f P(f), f = m - 1, P of degree 8 fitted (weighted least squares,
// relative error 0.2 eps in exact arithmetic, 1.2 eps evaluated in float32); no division.
inline vf vlog2(vf t) {
  vi bits = (vi)t;
  vi e = ((bits >> 23) & 0xff) - 127;
  vf m = (vf)((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  vi big = m > splat(1.41421356f);
  m = big ? m * 0.5f : m;
  e = e - big;  // big is -1 where true
  const vf f = m - 1.0f;
  vf poly = splat(0.12583884596824646f);
  poly = poly * f - 0.20727063715457916f;
  poly = poly * f + 0.21571533381938934f;
  poly = poly * f - 0.23894467949867249f;
  poly = poly * f + 0.28791627287864685f;
  poly = poly * f - 0.3607036769390106f;
  poly = poly * f + 0.48091062903404236f;
  poly = poly * f - 0.7213473320007324f;
  poly = poly * f + 1.4426950216293335f;
  return __builtin_convertvector(e, vf) + f * poly;
}

// 2^y for y <= ~0 (y below -126 gives 2^-126: negligible next to the largest term, 1):
// 2^n * e^(f ln 2), n = round(y), |f| <= 1/2, Taylor to degree 7 (error < 6e-9 relative).
inline vf vexp2(vf y) {
  y = vmax(y, splat(-126.0f));
  y = y < splat(126.0f) ? y : splat(126.0f);
  const vf nf = __builtin_convertvector(__builtin_convertvector(y + (y >= 0 ? 0.5f : -0.5f), vi), vf);
  const vf g = (y - nf) * 0.693147180559945309f;
  vf poly = splat(1.0f / 5040.0f);
  poly = poly * g + 1.0f / 720.0f;
  poly = poly * g + 1.0f / 120.0f;
  poly = poly * g + 1.0f / 24.0f;
  poly = poly * g + 1.0f / 6.0f;
  poly = poly * g + 0.5f;
  poly = poly * g + 1.0f;
  poly = poly * g + 1.0f;
  const vi scale = (__builtin_convertvector(nf, vi) + 127) << 23;
  return poly * (vf)scale;
}

// t^p, t >= 0, general p >= 1.
inline vf vpow(vf t, float p) { return vexp2(splat(p) * vlog2(t)); }

// |d|^N (N >= 1) by repeated squaring, unrolled at compile time.
template <int N>
inline vf vpowi(vf a) {
  if constexpr (N == 1) return a;
  else if constexpr (N % 2 == 0) { const vf h = vpowi<N / 2>(a); return h * h; }
  else return vpowi<N - 1>(a) * a;
}

enum Mode { L2 = 0, LINF = 1, POWI = 2, GENERAL = 3 };

struct Params {
  Mode mode;
  float p;
  int n;       // POWI: the integer part
  bool half;   // POWI: p = n + 1/2
};

Params params_for(float p) {
  Params q{GENERAL, p, 0, false};
  if (std::isinf(p)) q.mode = LINF;
  else if (p == 2.0f) q.mode = L2;
  else if (p <= 8.5f && std::floor(2.0f * p) == 2.0f * p) {
    q.mode = POWI;
    q.n = int(std::floor(p));
    q.half = p != float(q.n);
  }
  return q;
}

// ||x - w||_p in double precision, scaled by the max (the rescue path and the small-K path).
double rescue_norm(const float* x, const float* w, int64_t K, float p) {
  double m = 0.0;
  for (int64_t k = 0; k < K; ++k) m = std::max(m, std::fabs(double(x[k]) - double(w[k])));
  if (std::isinf(p) || m == 0.0 || std::isinf(m)) return m;
  double s = 0.0;
  for (int64_t k = 0; k < K; ++k) s += std::pow(std::fabs(double(x[k]) - double(w[k])) / m, double(p));
  return m * std::pow(s, 1.0 / double(p));
}

// One-pass sums below kSmall or above kBig (overflowed, or too near it for the root's Newton step)
// are recomputed by rescue_norm.
constexpr float kSmall = 7.8886091e-31f;  // 2^-100
constexpr float kBig = 1.0e37f;

// s^(1/p) for the one-pass sums (s in [2^-100, 1e37], p = NP or NP + 1/2): a first guess
// r0 = exp2(log2(s) / p), whose error grows with |log2 s| (up to ~30 eps), then one Newton step on
// r^p = s, r1 = r0 (1 - (1 - s / r0^p) / p), which squares it away (r0^p by products: ~NP eps).
template <int NP, bool HALF>
inline vf root_newton(vf s, float p) {
  const vf r0 = vexp2(vlog2(s) * (1.0f / p));
  vf rp = vpowi<NP>(r0);
  if constexpr (HALF) rp = rp * vsqrt(r0);
  return r0 * (1.0f - (1.0f - s / rp) * (1.0f / p));
}

// R x F tile. xp: micro-panel [K][R]; wpp: panel [K][F]. out[r][f] = ||d||_p.
template <int R, int NP, bool HALF>
inline void tile(const float* xp, const float* wpp, int64_t K, const Params& q, float out[R][F]) {
  vf acc[R][FV];
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < FV; ++f) acc[r][f] = vf{};
  if (q.mode == L2) {
    for (int64_t k = 0; k < K; ++k)
      for (int r = 0; r < R; ++r) {
        const vf xv = splat(xp[k * R + r]);
        for (int f = 0; f < FV; ++f) {
          const vf d = xv - load(wpp + k * F + f * VW);
          acc[r][f] = acc[r][f] + d * d;
        }
      }
  } else if (q.mode == LINF || q.mode == GENERAL) {
    for (int64_t k = 0; k < K; ++k)
      for (int r = 0; r < R; ++r) {
        const vf xv = splat(xp[k * R + r]);
        for (int f = 0; f < FV; ++f) acc[r][f] = vmax(acc[r][f], vabs(xv - load(wpp + k * F + f * VW)));
      }
    if (q.mode == GENERAL) {
      vf inv[R][FV];
      for (int r = 0; r < R; ++r)
        for (int f = 0; f < FV; ++f) inv[r][f] = 1.0f / acc[r][f];  // m = 0 or tiny: inf, fixed up below
      vf sum[R][FV];
      for (int r = 0; r < R; ++r)
        for (int f = 0; f < FV; ++f) sum[r][f] = vf{};
      for (int64_t k = 0; k < K; ++k)
        for (int r = 0; r < R; ++r) {
          const vf xv = splat(xp[k * R + r]);
          for (int f = 0; f < FV; ++f) {
            const vf t = vabs(xv - load(wpp + k * F + f * VW)) * inv[r][f];
            sum[r][f] = sum[r][f] + vpow(t, q.p);
          }
        }
      const vf ip = splat(1.0f / q.p), tiny = splat(1.17549435e-38f), inf = splat(__builtin_inff());
      for (int r = 0; r < R; ++r)
        for (int f = 0; f < FV; ++f) {
          const vf m = acc[r][f];
          // sum in [1, K]: its root by exp2/log2 loses ~log2(K) eps at most (far below K eps)
          vf v = m * vexp2(vlog2(sum[r][f]) * ip);
          // m = 0: r = 0; m = inf: r = inf; 0 < m < FLT_MIN (1/m overflowed): -1, the rescue
          v = (m == 0.0f) | (m == inf) ? m : m < tiny ? splat(-1.0f) : v;
          store(out[r] + f * VW, v);
        }
      return;
    }
  } else if constexpr (NP > 0) {  // POWI
    for (int64_t k = 0; k < K; ++k)
      for (int r = 0; r < R; ++r) {
        const vf xv = splat(xp[k * R + r]);
        for (int f = 0; f < FV; ++f) {
          const vf a = vabs(xv - load(wpp + k * F + f * VW));
          const vf t = vpowi<NP>(a);
          if constexpr (HALF) acc[r][f] = acc[r][f] + t * vsqrt_fast(a);
          else acc[r][f] = acc[r][f] + t;
        }
      }
  }
  const vf small = splat(kSmall), big = splat(kBig);
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < FV; ++f) {
      const vf sum = acc[r][f];
      vf v = sum;
      if (q.mode == LINF) {
        v = sum;
      } else {
        if (q.mode == L2) {
          v = vsqrt(sum);
        } else if constexpr (NP > 0) {
          v = root_newton<NP, HALF>(sum, q.p);
        }
        v = (sum >= small) & (sum < big) ? v : splat(-1.0f);  // overflowed or tiny: the rescue
      }
      store(out[r] + f * VW, v);
    }
}

template <int R, int NP = 0, bool HALF = false>
void forward(const float* x, const float* w, const float* bias, float* y, int64_t N, int64_t K, int64_t M,
             float p, int nthreads) {
  const Params q = params_for(p);
  const int64_t n_panels = (M + F - 1) / F, M_pad = n_panels * F;
  // weights as panels [p][K][F], zero padded
  std::vector<float> wp(size_t(n_panels * K * F), 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) wp[size_t(((m / F) * K + k) * F + m % F)] = w[m * K + k];
  std::vector<float> bt(size_t(M_pad), 0.f);  // the bias, zero padded to whole panels
  for (int64_t m = 0; m < M; ++m) bt[size_t(m)] = bias ? bias[m] : 0.f;
  const int64_t NB = std::max<int64_t>(R, std::min<int64_t>(256, 16384 / std::max<int64_t>(K, 1)) / R * R);
  const int64_t n_blocks = (N + NB - 1) / NB;
  const int64_t groups = std::min<int64_t>(n_panels, std::max<int64_t>(1, (4 * nthreads + n_blocks - 1) / n_blocks));
  const int64_t per_group = (n_panels + groups - 1) / groups;
  const int64_t items = n_blocks * groups;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, items)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> xb(size_t(NB * K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t blk = it / groups, grp = it % groups;
      const int64_t n0 = blk * NB, rows = std::min(NB, N - n0);
      for (int64_t r0 = 0; r0 < rows; r0 += R) {  // micro-panels [K][R], the tail repeating its last row
        const int live = int(std::min<int64_t>(R, rows - r0));
        for (int j = 0; j < R; ++j) {
          const float* src = x + (n0 + r0 + std::min(j, live - 1)) * K;
          float* dst = &xb[size_t(r0 * K + j)];
          for (int64_t k = 0; k < K; ++k) dst[k * R] = src[k];
        }
      }
      const int64_t p1 = std::min(n_panels, (grp + 1) * per_group);
      for (int64_t pn = grp * per_group; pn < p1; ++pn) {
        const int64_t m0 = pn * F, mcols = std::min<int64_t>(F, M - m0);
        for (int64_t r0 = 0; r0 < rows; r0 += R) {
          float out[R][F];
          tile<R, NP, HALF>(&xb[size_t(r0 * K)], &wp[size_t(pn * K * F)], K, q, out);
          for (int r = 0; r < R && r0 + r < rows; ++r) {
            const int64_t n = n0 + r0 + r;
            bool rescue = false;
            float yv[F];
            for (int f = 0; f < FV; ++f) {
              const vf v = load(out[r] + f * VW);
              const vi neg = v < 0.0f;
              for (int i = 0; i < VW; ++i) rescue |= neg[i] != 0;
              store(yv + f * VW, load(&bt[size_t(m0 + f * VW)]) - v);
            }
            float* yr = y + n * M + m0;
            std::memcpy(yr, yv, size_t(mcols) * sizeof(float));
            if (rescue)  // rare: only where a one-pass sum overflowed/underflowed (norm flagged -1)
              for (int64_t c = 0; c < mcols; ++c)
                if (out[r][c] < 0.0f)
                  yr[c] = bt[size_t(m0 + c)] - float(rescue_norm(x + n * K, w + (m0 + c) * K, K, p));
          }
        }
      }
    }
  }
}

// e = d||d||_p / dd for one (row, filter) pair into e[0..K), given r = ||d||_p.
inline void exact_grad_row(const float* x, const float* w, int64_t K, float p, float r, float* e) {
  if (r == 0.0f) {
    for (int64_t k = 0; k < K; ++k) e[k] = 0.0f;
    return;
  }
  if (std::isinf(p)) {
    int64_t c = 0;
    for (int64_t k = 0; k < K; ++k) c += std::fabs(x[k] - w[k]) == r;
    const float share = c ? 1.0f / float(c) : 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float d = x[k] - w[k];
      e[k] = std::fabs(d) == r ? (d > 0 ? share : d < 0 ? -share : 0.0f) : 0.0f;
    }
    return;
  }
  const float inv = 1.0f / r;
  int64_t k = 0;
  if (p == 2.0f) {
    for (; k < K; ++k) e[k] = (x[k] - w[k]) * inv;
    return;
  }
  const vf vinv = splat(inv);
  for (; k + VW <= K; k += VW) {
    const vf d = load(x + k) - load(w + k);
    const vf t = vpow(vabs(d) * vinv, p - 1.0f);
    store(e + k, d < 0 ? -t : d > 0 ? t : vf{});
  }
  for (; k < K; ++k) {
    const float d = x[k] - w[k];
    const float t = float(std::pow(double(std::fabs(d)) / double(r), double(p) - 1.0));
    e[k] = d < 0 ? -t : d > 0 ? t : 0.0f;
  }
}

// Whether every value is finite (exponent bits not all ones), vectorised.
bool all_finite(const float* p, int64_t n) {
  if (!p) return true;
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, 4);
    bad |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
  }
  return !bad;
}

}  // namespace

extern "C" {

// y [N, M] = bias - ||x[n] - w[m]||_p; x [N, K], w [M, K] float32 (finite), bias [M] or null.
// Returns 3 (nothing written) if any input is NaN or infinite: the caller runs the reference kernel.
int l1fx_lp_forward(const float* x, const float* w, const float* bias, float* y, int64_t n, int64_t k, int64_t m,
                    float p, int nthreads) {
  if (!(p > 1.0f)) return 1;
  if (!all_finite(x, n * k) || !all_finite(w, m * k) || !all_finite(bias, m)) return 3;
  const Params q = params_for(p);
  constexpr int RF = VW == 16 ? 8 : 4;
  if (q.mode == GENERAL) { forward<4>(x, w, bias, y, n, k, m, p, nthreads); return 0; }
  if (q.mode != POWI) { forward<RF>(x, w, bias, y, n, k, m, p, nthreads); return 0; }
  // POWI: one instantiation per exponent (the powers unroll at compile time)
#define L1FX_POWI(N)                                                                   \
  case N:                                                                              \
    if (q.half) forward<RF, N, true>(x, w, bias, y, n, k, m, p, nthreads);             \
    else forward<RF, N, false>(x, w, bias, y, n, k, m, p, nthreads);                   \
    break;
  switch (q.n) {
    L1FX_POWI(1) L1FX_POWI(2) L1FX_POWI(3) L1FX_POWI(4) L1FX_POWI(5) L1FX_POWI(6) L1FX_POWI(7) L1FX_POWI(8)
    default: return 1;
  }
#undef L1FX_POWI
  return 0;
}

// MGS gradients (see the top of the file); r [N, M] = the norms (from l1fx_lp_forward without bias).
// gx [N, K] and/or gw [M, K] (null: not wanted). One pass per gradient, each thread owning rows of
// its output (no reduction across threads).
int l1fx_lp_backward(const float* g, const float* x, const float* w, const float* r, float* gx, float* gw,
                     float mix, int64_t N, int64_t K, int64_t M, float p, int nthreads) {
  if (!(p > 1.0f)) return 1;
  if (!all_finite(g, N * M) || !all_finite(x, N * K) || !all_finite(w, M * K)) return 3;
  const float a = mix, b = 1.0f - mix;
  if (gx) {
#pragma omp parallel num_threads(int(std::max<int64_t>(1, std::min<int64_t>(nthreads, N))))
    {
      std::vector<float> e(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 4)
      for (int64_t n = 0; n < N; ++n) {
        float* out = gx + n * K;
        const float* xr = x + n * K;
        for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
        for (int64_t mm = 0; mm < M; ++mm) {
          const float gv = g[n * M + mm];
          const float* wr = w + mm * K;
          if (b != 0.0f) exact_grad_row(xr, wr, K, p, r[n * M + mm], e.data());
          for (int64_t k = 0; k < K; ++k) {
            const float d = xr[k] - wr[k];
            const float c = std::min(1.0f, std::max(-1.0f, d));
            out[k] -= gv * (a * c + (b != 0.0f ? b * e[size_t(k)] : 0.0f));
          }
        }
      }
    }
  }
  if (gw) {
#pragma omp parallel num_threads(int(std::max<int64_t>(1, std::min<int64_t>(nthreads, M))))
    {
      std::vector<float> e(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 1)
      for (int64_t mm = 0; mm < M; ++mm) {
        float* out = gw + mm * K;
        const float* wr = w + mm * K;
        for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
        for (int64_t n = 0; n < N; ++n) {
          const float gv = g[n * M + mm];
          const float* xr = x + n * K;
          if (b != 0.0f) exact_grad_row(xr, wr, K, p, r[n * M + mm], e.data());
          for (int64_t k = 0; k < K; ++k)
            out[k] += gv * (a * (xr[k] - wr[k]) + (b != 0.0f ? b * e[size_t(k)] : 0.0f));
        }
      }
    }
  }
  return 0;
}

}  // extern "C"
