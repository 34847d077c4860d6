// l1 transposed convolution on the CPU: direct gather kernels, float32, OpenMP (see kernels/cpu_transpose.py).
//
// Output position o receives the pairs (input i, tap k) with o = i*stride + k*dilation - padding per dim;
//   y[n, m, o]  = b[m] - sum_{pairs of o} sum_{c in group} |x[n, c, i] - w[c, m_g, k]|
//   gx[n, c, i] = sum_{k: o valid} sum_{m_g} g[n, m, o] * phi_x(fl(w - x))
//   gw[c, m, k] = sum_n sum_{i: o valid} g[n, m, o] * phi_w(fl(x - w))
// with phi_x(d) = mix*HardTanh(d) + (1-mix)*sign(d), phi_w(d) = mix*d + (1-mix)*sign(d) (docs/l1_ops.md).
// Only real pairs are visited: no zero-stuffed input, no term for an output outside the grid.
// Every summand comes from the difference itself, rounded once (exact like the l1 conv kernels).
//
// Vector lanes: blocks of 16 output channels (forward, weight gradient) or 16 input channels (input
// gradient), held in GCC/Clang vector registers; channel counts are zero-padded to a multiple of 16 by the
// wrapper (M_p, C_p) and the padded lanes are never stored.
// Layouts (prepared by the Python wrapper):
//   x   [N, C, I]         (NC..., I = Id*Ih*Iw)
//   wt  [G, K, C_g, M_p]  (forward and weight gradient: output channels innermost)
//   wx  [G, K, M_g, C_p]  (input gradient: input channels innermost)
//   ycl [N, O, G, M_p]    (channels last; the wrapper crops the padding and moves channels to dim 1)
//   gcl [N, O, G, M_p]    (the upstream gradient, channels last, zero-padded)
//   gx  [N, C, I], gw [C, M_g, K] (torch layouts)
// geom: I[3], K[3], S[3], P[3], D[3], O[3] (1-d/2-d as 3-d with leading size-1 dims).
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t L = 16;
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 vabs(v16 d) { return (v16)((i16v)d & 0x7fffffff); }
inline int64_t padded(int64_t n) { return (n + L - 1) / L * L; }

struct Geom {
    int64_t in[3], k[3], s[3], p[3], d[3], out[3];
    int64_t ivol() const { return in[0] * in[1] * in[2]; }
    int64_t kvol() const { return k[0] * k[1] * k[2]; }
    int64_t ovol() const { return out[0] * out[1] * out[2]; }
};

Geom read_geom(const int64_t* g) {
    Geom r;
    for (int a = 0; a < 3; ++a) {
        r.in[a] = g[a]; r.k[a] = g[3 + a]; r.s[a] = g[6 + a]; r.p[a] = g[9 + a]; r.d[a] = g[12 + a];
        r.out[a] = g[15 + a];
    }
    return r;
}

// Input index of output o at tap k along one dim, or -1 when (o, k) is not a pair.
inline int64_t input_of(int64_t o, int64_t k, int64_t s, int64_t p, int64_t d, int64_t size_in) {
    int64_t t = o + p - k * d;
    if (t < 0 || t % s) return -1;
    t /= s;
    return t < size_in ? t : -1;
}

// Output index of input i at tap k along one dim, or -1 when it falls outside the output.
inline int64_t output_of(int64_t i, int64_t k, int64_t s, int64_t p, int64_t d, int64_t size_out) {
    int64_t o = i * s + k * d - p;
    return (o >= 0 && o < size_out) ? o : -1;
}

// sign(NaN) = 0 as torch (comparisons with NaN are false; a true vector comparison is -1).
inline v16 vsign(v16 d) {
    return __builtin_convertvector(d < 0.0f, v16) - __builtin_convertvector(d > 0.0f, v16);
}
inline v16 vhardtanh(v16 d) {  // NaN stays NaN
    const v16 one = v16{} + 1.0f;
    return d > one ? one : (d < -one ? -one : d);
}

// The MGS blends; MODE 0: mix = 0 (sign only, a NaN difference gives 0), 1: mix = 1, 2: in between.
template <int MODE>
inline v16 phi_x(v16 d, float mix) {
    if (MODE == 0) return vsign(d);
    if (MODE == 1) return vhardtanh(d);
    return mix * vhardtanh(d) + (1.0f - mix) * vsign(d);
}
template <int MODE>
inline v16 phi_w(v16 d, float mix) {
    if (MODE == 0) return vsign(d);
    if (MODE == 1) return d;
    return mix * d + (1.0f - mix) * vsign(d);
}

template <int MODE>
void input_grad(const float* gcl, const float* x, const float* wx, float* gx, float mix, int64_t n_batch,
                int64_t c, int64_t m, int64_t groups, const Geom& g, int threads) {
    const int64_t cg = c / groups, mg = m / groups, mp = padded(mg), cp = padded(cg);
    const int64_t iv = g.ivol(), kv = g.kvol(), ov = g.ovol(), cblocks = cp / L;
    const int64_t jobs = n_batch * groups * cblocks * iv;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
        const int64_t i = job % iv, rest = job / iv, cb = rest % cblocks, ng = rest / cblocks;
        const int64_t grp = ng % groups, n = ng / groups, c0 = cb * L, lanes = cg - c0 < L ? cg - c0 : L;
        const int64_t id = i / (g.in[1] * g.in[2]), ih = (i / g.in[2]) % g.in[1], iw = i % g.in[2];
        const float* xb = x + (n * c + grp * cg + c0) * iv + i;
        float xs[L] = {0.0f};
        for (int64_t j = 0; j < lanes; ++j) xs[j] = xb[j * iv];
        const v16 xv = load(xs);
        v16 acc = v16{};
        for (int64_t kd = 0; kd < g.k[0]; ++kd) {
            const int64_t od = output_of(id, kd, g.s[0], g.p[0], g.d[0], g.out[0]);
            if (od < 0) continue;
            for (int64_t kh = 0; kh < g.k[1]; ++kh) {
                const int64_t oh = output_of(ih, kh, g.s[1], g.p[1], g.d[1], g.out[1]);
                if (oh < 0) continue;
                for (int64_t kw = 0; kw < g.k[2]; ++kw) {
                    const int64_t ow = output_of(iw, kw, g.s[2], g.p[2], g.d[2], g.out[2]);
                    if (ow < 0) continue;
                    const int64_t o = (od * g.out[1] + oh) * g.out[2] + ow, kk = (kd * g.k[1] + kh) * g.k[2] + kw;
                    const float* grow = gcl + ((n * ov + o) * groups + grp) * mp;
                    const float* wk = wx + (grp * kv + kk) * mg * cp + c0;
                    for (int64_t j = 0; j < mg; ++j) acc += grow[j] * phi_x<MODE>(load(wk + j * cp) - xv, mix);
                }
            }
        }
        float out[L];
        store(out, acc);
        float* gb = gx + (n * c + grp * cg + c0) * iv + i;
        for (int64_t j = 0; j < lanes; ++j) gb[j * iv] = out[j];
    }
}

template <int MODE>
void weight_grad(const float* gcl, const float* x, const float* wt, float* gw, float mix, int64_t n_batch,
                 int64_t c, int64_t m, int64_t groups, const Geom& g, int threads) {
    const int64_t cg = c / groups, mg = m / groups, mp = padded(mg), mblocks = mp / L;
    const int64_t iv = g.ivol(), kv = g.kvol(), ov = g.ovol();
    const int64_t jobs = c * kv * mblocks;  // one (input channel, tap, block of 16 output channels) per job
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t job = 0; job < jobs; ++job) {
        const int64_t mb = job % mblocks, rest = job / mblocks, kk = rest % kv, ci = rest / kv;
        const int64_t grp = ci / cg, cc = ci % cg, m0 = mb * L;
        const int64_t kd = kk / (g.k[1] * g.k[2]), kh = (kk / g.k[2]) % g.k[1], kw = kk % g.k[2];
        const v16 wv = load(wt + ((grp * kv + kk) * cg + cc) * mp + m0);
        v16 acc = v16{};
        for (int64_t n = 0; n < n_batch; ++n) {
            const float* xb = x + (n * c + ci) * iv;
            for (int64_t id = 0; id < g.in[0]; ++id) {
                const int64_t od = output_of(id, kd, g.s[0], g.p[0], g.d[0], g.out[0]);
                if (od < 0) continue;
                for (int64_t ih = 0; ih < g.in[1]; ++ih) {
                    const int64_t oh = output_of(ih, kh, g.s[1], g.p[1], g.d[1], g.out[1]);
                    if (oh < 0) continue;
                    for (int64_t iw = 0; iw < g.in[2]; ++iw) {
                        const int64_t ow = output_of(iw, kw, g.s[2], g.p[2], g.d[2], g.out[2]);
                        if (ow < 0) continue;
                        const float xv = xb[(id * g.in[1] + ih) * g.in[2] + iw];
                        const int64_t o = (od * g.out[1] + oh) * g.out[2] + ow;
                        acc += load(gcl + ((n * ov + o) * groups + grp) * mp + m0) * phi_w<MODE>(xv - wv, mix);
                    }
                }
            }
        }
        float out[L];
        store(out, acc);
        const int64_t lanes = mg - m0 < L ? mg - m0 : L;
        for (int64_t j = 0; j < lanes; ++j) gw[(ci * mg + m0 + j) * kv + kk] = out[j];
    }
}

}  // namespace

extern "C" {

int l1fx_convt_forward(const float* x, const float* wt, const float* bias, float* ycl, int64_t n_batch, int64_t c,
                       int64_t m, int64_t groups, const int64_t* geom, int threads) {
    const Geom g = read_geom(geom);
    const int64_t cg = c / groups, mg = m / groups, mp = padded(mg), mblocks = mp / L;
    const int64_t iv = g.ivol(), kv = g.kvol(), ov = g.ovol();
    const int64_t jobs = n_batch * ov * groups * mblocks;  // ycl is [N, O, G, M_p]: job order is its order
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
        const int64_t mb = job % mblocks, rest = job / mblocks, grp = rest % groups, no = rest / groups;
        const int64_t o = no % ov, n = no / ov, m0 = mb * L;
        const int64_t od = o / (g.out[1] * g.out[2]), oh = (o / g.out[2]) % g.out[1], ow = o % g.out[2];
        v16 acc0 = v16{}, acc1 = v16{};  // two chains (even / odd channels): the adds overlap
        for (int64_t kd = 0; kd < g.k[0]; ++kd) {
            const int64_t id = input_of(od, kd, g.s[0], g.p[0], g.d[0], g.in[0]);
            if (id < 0) continue;
            for (int64_t kh = 0; kh < g.k[1]; ++kh) {
                const int64_t ih = input_of(oh, kh, g.s[1], g.p[1], g.d[1], g.in[1]);
                if (ih < 0) continue;
                for (int64_t kw = 0; kw < g.k[2]; ++kw) {
                    const int64_t iw = input_of(ow, kw, g.s[2], g.p[2], g.d[2], g.in[2]);
                    if (iw < 0) continue;
                    const int64_t kk = (kd * g.k[1] + kh) * g.k[2] + kw;
                    const float* xb = x + (n * c + grp * cg) * iv + (id * g.in[1] + ih) * g.in[2] + iw;
                    const float* wk = wt + (grp * kv + kk) * cg * mp + m0;
                    int64_t cc = 0;
                    for (; cc + 1 < cg; cc += 2) {
                        acc0 += vabs(xb[cc * iv] - load(wk + cc * mp));
                        acc1 += vabs(xb[(cc + 1) * iv] - load(wk + (cc + 1) * mp));
                    }
                    if (cc < cg) acc0 += vabs(xb[cc * iv] - load(wk + cc * mp));
                }
            }
        }
        const v16 total = acc0 + acc1;
        float out[L];
        if (bias) {
            float b[L] = {0.0f};
            const int64_t lanes = mg - m0 < L ? mg - m0 : L;
            for (int64_t j = 0; j < lanes; ++j) b[j] = bias[grp * mg + m0 + j];
            store(out, load(b) - total);
        } else {
            store(out, -total);
        }
        std::memcpy(ycl + job * L, out, sizeof out);
    }
    return 0;
}

int l1fx_convt_input_grad(const float* gcl, const float* x, const float* wx, float* gx, float mix, int64_t n_batch,
                          int64_t c, int64_t m, int64_t groups, const int64_t* geom, int threads) {
    const Geom g = read_geom(geom);
    if (mix == 0.0f) input_grad<0>(gcl, x, wx, gx, mix, n_batch, c, m, groups, g, threads);
    else if (mix == 1.0f) input_grad<1>(gcl, x, wx, gx, mix, n_batch, c, m, groups, g, threads);
    else input_grad<2>(gcl, x, wx, gx, mix, n_batch, c, m, groups, g, threads);
    return 0;
}

int l1fx_convt_weight_grad(const float* gcl, const float* x, const float* wt, float* gw, float mix, int64_t n_batch,
                           int64_t c, int64_t m, int64_t groups, const int64_t* geom, int threads) {
    const Geom g = read_geom(geom);
    if (mix == 0.0f) weight_grad<0>(gcl, x, wt, gw, mix, n_batch, c, m, groups, g, threads);
    else if (mix == 1.0f) weight_grad<1>(gcl, x, wt, gw, mix, n_batch, c, m, groups, g, threads);
    else weight_grad<2>(gcl, x, wt, gw, mix, n_batch, c, m, groups, g, threads);
    return 0;
}

}  // extern "C"
