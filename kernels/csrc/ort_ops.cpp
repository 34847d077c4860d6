// onnxruntime custom-op library for the l1fx ONNX domain: l1fx.L1Linear, l1fx.L1Conv, l1fx.L1ConvTranspose
// (and l1fx.L1FusedConv, which only l1fx.ort_session's in-memory graphs use), and for
// l1fx.points.FarthestPointSample (l1fx/onnx_pointops.py)
// (schemas in l1fx/onnx_ops.py) computed by the l1fx CPU kernels (l1_cpu.cpp) in place,
// with no copy and no Python.
//
// Not compiled on its own: kernels/ort_build.py writes a one-file wrapper that
// includes l1_cpu.cpp, defines L1FX_ORT_CXX_API as the path of onnxruntime_cxx_api.h
// and includes this file, then builds it like the CPU kernels (kernels/cpu_build.py).
//
// Loaded with SessionOptions.register_custom_ops_library: onnxruntime calls
// RegisterCustomOps, which adds the ops to the "l1fx" domain. A node with a
// registered kernel is run by it; the model-local function bodies are then unused.
// float32 only (the l1fx kernels' other dtype, bfloat16, has no use in exported files).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#define ORT_API_MANUAL_INIT
#include L1FX_ORT_CXX_API
#undef ORT_API_MANUAL_INIT

namespace l1fx_ort {

constexpr int kFloat32 = 0;  // dtype code of the l1fx C ABI

// Session config entry with the kernels' thread count (l1fx.ort_session sets it from
// intra_op_num_threads); read when the library is registered on a SessionOptions.
constexpr const char* kThreadsKey = "custom_op.l1fx.num_threads";

// Threads per kernel call: the configured count, else OpenMP's default (OMP_NUM_THREADS,
// else the cores), as the same kernels use under PyTorch.
int kernel_threads(int configured) {
  if (configured > 0) return configured;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Any exception becomes an onnxruntime error status (the session's run raises it).
template <typename F>
OrtStatusPtr guarded(const char* op, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("l1fx.") + op + ": " + e.what()).c_str());
  }
}

std::vector<int64_t> ints_attr(const OrtKernelInfo* info, const char* name, std::vector<int64_t> fallback) {
  const OrtApi& api = Ort::GetApi();
  size_t n = 0;
  OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
  if (st != nullptr) {  // absent: the ONNX Conv default
    api.ReleaseStatus(st);
    return fallback;
  }
  std::vector<int64_t> v(n);
  if (n) Ort::ThrowOnError(api.KernelInfoGetAttributeArray_int64(info, name, v.data(), &n));
  return v;
}

int64_t int_attr(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  const OrtApi& api = Ort::GetApi();
  int64_t v = fallback;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return fallback;
  }
  return v;
}

struct Inputs {
  Ort::ConstValue x, w, b;
  std::vector<int64_t> xs, ws, bs;
};

Inputs read_inputs(Ort::KernelContext& ctx) {
  Inputs in{ctx.GetInput(0), ctx.GetInput(1), ctx.GetInput(2), {}, {}, {}};
  in.xs = in.x.GetTensorTypeAndShapeInfo().GetShape();
  in.ws = in.w.GetTensorTypeAndShapeInfo().GetShape();
  in.bs = in.b.GetTensorTypeAndShapeInfo().GetShape();
  return in;
}

int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// ---------------------------------------------------------------- L1Linear
struct LinearKernel {
  int nthreads;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded("L1Linear", [&] {
      Ort::KernelContext ctx(context);
      Inputs in = read_inputs(ctx);
      if (in.ws.size() != 2 || in.xs.empty() || in.xs.back() != in.ws[1] || in.bs.size() != 1 ||
          in.bs[0] != in.ws[0])
        throw std::invalid_argument("X " + shape_str(in.xs) + ", W " + shape_str(in.ws) + ", B " +
                                    shape_str(in.bs) + " do not fit X[..., K], W[M, K], B[M]");
      const int64_t K = in.ws[1], M = in.ws[0];
      std::vector<int64_t> ys(in.xs.begin(), in.xs.end() - 1);
      ys.push_back(M);
      Ort::UnownedValue y = ctx.GetOutput(0, ys);
      const int64_t N = K > 0 ? numel(in.xs) / K : numel(ys) / (M > 0 ? M : 1);
      if (N == 0 || M == 0) return;
      int rc = l1fx_forward(kFloat32, in.x.GetTensorData<float>(), in.w.GetTensorData<float>(),
                            in.b.GetTensorData<float>(), y.GetTensorMutableData<float>(), N, K, M, kernel_threads(nthreads));
      if (rc != 0) throw std::runtime_error("l1fx_forward failed with code " + std::to_string(rc));
    });
  }
};

struct LinearOp : Ort::CustomOpBase<LinearOp, LinearKernel, true> {
  int nthreads;
  explicit LinearOp(int n) : nthreads(n) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new LinearKernel{nthreads};
    return nullptr;
  }
  const char* GetName() const { return "L1Linear"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// ---------------------------------------------------------------- L1Conv
// The attributes of an ONNX Conv-like node and the l1fx kernel geometry they give for X and W.
struct ConvAttrs {
  std::vector<int64_t> strides, pads, dilations;
  int64_t group;

  explicit ConvAttrs(const OrtKernelInfo* info)
      : strides(ints_attr(info, "strides", {})),
        pads(ints_attr(info, "pads", {})),
        dilations(ints_attr(info, "dilations", {})),
        group(int_attr(info, "group", 1)) {
    // Checked here so that a session that cannot run a node fails when it is made, not when it runs.
    const size_t nd = pads.size() / 2;
    for (size_t a = 0; a < nd; ++a)
      if (pads[a] != pads[a + nd])
        throw std::invalid_argument("asymmetric pads are not supported by the l1fx kernel");
  }

  // geom = {in[3], ker[3], stride[3], pad[3], dil[3], out[3]} (1-D/2-D lead with size-1 axes); returns Y's shape.
  std::vector<int64_t> conv_geometry(const std::vector<int64_t>& xs, const std::vector<int64_t>& ws,
                                     int64_t* geom) const {
    const size_t nd = xs.size() >= 2 ? xs.size() - 2 : 0;
    if (nd < 1 || nd > 3 || ws.size() != nd + 2)
      throw std::invalid_argument("X " + shape_str(xs) + ", W " + shape_str(ws) + " do not fit X[N, C, *S], "
                                  "W[M, C/group, *k] with 1 to 3 spatial axes");
    const int64_t B = xs[0], C = xs[1], M = ws[0], G = group;
    if (G < 1 || C % G != 0 || M % G != 0 || ws[1] * G != C)
      throw std::invalid_argument("group " + std::to_string(G) + " does not fit X " + shape_str(xs) +
                                  " and W " + shape_str(ws));
    std::vector<int64_t> st = strides.empty() ? std::vector<int64_t>(nd, 1) : strides;
    std::vector<int64_t> dl = dilations.empty() ? std::vector<int64_t>(nd, 1) : dilations;
    std::vector<int64_t> pd = pads.empty() ? std::vector<int64_t>(2 * nd, 0) : pads;
    if (st.size() != nd || dl.size() != nd || pd.size() != 2 * nd)
      throw std::invalid_argument("strides/pads/dilations do not have one entry per spatial axis");
    const size_t lead = 3 - nd;
    std::vector<int64_t> ys = {B, M};
    for (size_t i = 0; i < 3; ++i) {
      const bool pad_axis = i < lead;
      const size_t a = i - lead;
      const int64_t inn = pad_axis ? 1 : xs[2 + a], ker = pad_axis ? 1 : ws[2 + a];
      const int64_t s = pad_axis ? 1 : st[a], d = pad_axis ? 1 : dl[a];
      const int64_t p = pad_axis ? 0 : pd[a];
      if (s < 1 || d < 1 || p < 0) throw std::invalid_argument("strides and dilations must be >= 1, pads >= 0");
      const int64_t span = inn + 2 * p - d * (ker - 1) - 1;
      if (span < 0)
        throw std::invalid_argument("kernel " + shape_str(ws) + " is larger than the padded input " +
                                    shape_str(xs));
      const int64_t out = span / s + 1;
      geom[i] = inn; geom[3 + i] = ker; geom[6 + i] = s; geom[9 + i] = p; geom[12 + i] = d; geom[15 + i] = out;
      if (!pad_axis) ys.push_back(out);
    }
    return ys;
  }
};

struct ConvKernel {
  ConvAttrs attrs;
  int nthreads;

  ConvKernel(const OrtKernelInfo* info, int n) : attrs(info), nthreads(n) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded("L1Conv", [&] {
      Ort::KernelContext ctx(context);
      Inputs in = read_inputs(ctx);
      if (in.bs.size() != 1 || in.ws.empty() || in.bs[0] != in.ws[0])
        throw std::invalid_argument("B " + shape_str(in.bs) + " does not fit W " + shape_str(in.ws) + ": B[M]");
      int64_t geom[18];
      std::vector<int64_t> ys = attrs.conv_geometry(in.xs, in.ws, geom);
      Ort::UnownedValue y = ctx.GetOutput(0, ys);
      if (numel(ys) == 0) return;
      int rc = l1fx_conv_forward(kFloat32, in.x.GetTensorData<float>(), in.w.GetTensorData<float>(),
                                 in.b.GetTensorData<float>(), y.GetTensorMutableData<float>(), in.xs[0], in.xs[1],
                                 in.ws[0], attrs.group, geom, kernel_threads(nthreads));
      if (rc != 0) throw std::runtime_error("l1fx_conv_forward failed with code " + std::to_string(rc));
    });
  }
};

struct ConvOp : Ort::CustomOpBase<ConvOp, ConvKernel, true> {
  int nthreads;
  explicit ConvOp(int n) : nthreads(n) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded("L1Conv", [&] { *kernel = new ConvKernel(info, nthreads); });
  }
  const char* GetName() const { return "L1Conv"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// ---------------------------------------------------------------- L1FusedConv
// Not in exported files: l1fx.ort_session's native path writes it into its in-memory copy of the
// graph (l1fx/ort_fuse.py), in place of an L1Conv with what follows or feeds it:
//   Y = act(scale * (COL - sum |X - W|) + shift)
// inputs W [M, C/group, *k], COL [M] (the bias) or [B, M] (the bias less the sums over input channels
// that are constant along the positions), SCALE and SHIFT [M] (a folded inference BatchNormalization)
// or both empty, then X as one or more tensors [B, C_i, *S] read as their concatenation along channels
// (several only for kernel 1, stride 1, no padding). Attributes: L1Conv's, and relu (0/1).
struct FusedConvKernel {
  ConvAttrs attrs;
  int64_t relu;
  int nthreads;

  FusedConvKernel(const OrtKernelInfo* info, int n) : attrs(info), relu(int_attr(info, "relu", 0)), nthreads(n) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded("L1FusedConv", [&] {
      Ort::KernelContext ctx(context);
      const size_t n_in = ctx.GetInputCount();
      if (n_in < 5) throw std::invalid_argument("expects W, COL, SCALE, SHIFT and at least one X");
      Ort::ConstValue w = ctx.GetInput(0), col = ctx.GetInput(1), scale = ctx.GetInput(2), shift = ctx.GetInput(3);
      const std::vector<int64_t> ws = w.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> cs = col.GetTensorTypeAndShapeInfo().GetShape();
      const int64_t n_scale = numel(scale.GetTensorTypeAndShapeInfo().GetShape());
      const int64_t n_shift = numel(shift.GetTensorTypeAndShapeInfo().GetShape());
      std::vector<const float*> xs;
      std::vector<int64_t> channels;
      std::vector<int64_t> x0;
      for (size_t i = 4; i < n_in; ++i) {
        Ort::ConstValue x = ctx.GetInput(i);
        std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
        if (i == 4) {
          x0 = shape;
        } else if (shape.size() != x0.size() || shape.size() < 2 || shape[0] != x0[0] ||
                   !std::equal(shape.begin() + 2, shape.end(), x0.begin() + 2)) {
          throw std::invalid_argument("X inputs " + shape_str(x0) + " and " + shape_str(shape) +
                                      " differ outside the channel axis");
        }
        xs.push_back(x.GetTensorData<float>());
        channels.push_back(shape.size() >= 2 ? shape[1] : 0);
      }
      std::vector<int64_t> xall = x0;
      if (xall.size() >= 2) {
        xall[1] = 0;
        for (int64_t c : channels) xall[1] += c;
      }
      int64_t geom[18];
      std::vector<int64_t> ys = attrs.conv_geometry(xall, ws, geom);
      const int64_t B = xall[0], M = ws[0];
      const bool per_sample = cs.size() == 2;
      if (!((cs.size() == 1 && cs[0] == M) || (per_sample && cs[0] == B && cs[1] == M)))
        throw std::invalid_argument("COL " + shape_str(cs) + " is neither [M] nor [B, M] for M = " +
                                    std::to_string(M) + ", B = " + std::to_string(B));
      if (n_scale != n_shift || (n_scale != 0 && n_scale != M))
        throw std::invalid_argument("SCALE and SHIFT must both be [M] or both empty");
      Ort::UnownedValue y = ctx.GetOutput(0, ys);
      if (numel(ys) == 0) return;
      int rc = l1fx_conv_forward_fused(int(xs.size()), xs.data(), channels.data(), w.GetTensorData<float>(),
                                       col.GetTensorData<float>(), per_sample ? 1 : 0,
                                       n_scale ? scale.GetTensorData<float>() : nullptr,
                                       n_scale ? shift.GetTensorData<float>() : nullptr, relu ? 1 : 0,
                                       y.GetTensorMutableData<float>(), B, xall[1], M, attrs.group, geom,
                                       kernel_threads(nthreads));
      if (rc == 2) throw std::invalid_argument("several X inputs need kernel 1, stride 1 and no padding");
      if (rc != 0) throw std::runtime_error("l1fx_conv_forward_fused failed with code " + std::to_string(rc));
    });
  }
};

struct FusedConvOp : Ort::CustomOpBase<FusedConvOp, FusedConvKernel, true> {
  int nthreads;
  explicit FusedConvOp(int n) : nthreads(n) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded("L1FusedConv", [&] { *kernel = new FusedConvKernel(info, nthreads); });
  }
  const char* GetName() const { return "L1FusedConv"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 4 ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// ---------------------------------------------------------------- L1ConvTranspose
// Y[N, M, *out] = B - sum |X - W| over the real (input, tap) pairs of each output, by the cpu backend's
// transposed-convolution kernel (l1_conv_transpose.cpp, compiled into this library in its own namespace
// by kernels/ort_build.py): the same per-output sums in the same order as under PyTorch. The kernel
// wants the filters as [G, K, C/G, M/G padded to 16] and writes [N, *out, G, M/G padded]; this op
// rearranges both (as kernels/cpu_transpose.py does) around the call.
struct ConvTransposeKernel {
  ConvAttrs attrs;
  std::vector<int64_t> output_padding;
  int nthreads;

  ConvTransposeKernel(const OrtKernelInfo* info, int n)
      : attrs(info), output_padding(ints_attr(info, "output_padding", {})), nthreads(n) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded("L1ConvTranspose", [&] {
      Ort::KernelContext ctx(context);
      Inputs in = read_inputs(ctx);
      const size_t nd = in.xs.size() >= 2 ? in.xs.size() - 2 : 0;
      const int64_t G = attrs.group;
      if (nd < 1 || nd > 3 || in.ws.size() != nd + 2 || G < 1 || in.xs[1] != in.ws[0] || in.ws[0] % G != 0 ||
          in.bs.size() != 1 || in.bs[0] != in.ws[1] * G)
        throw std::invalid_argument("X " + shape_str(in.xs) + ", W " + shape_str(in.ws) + ", B " + shape_str(in.bs) +
                                    " do not fit X[N, C, *S], W[C, M/group, *k], B[M] with group " +
                                    std::to_string(G) + " and 1 to 3 spatial axes");
      auto per_axis = [](const std::vector<int64_t>& v, int64_t fallback, size_t n) {
        if (v.empty()) return std::vector<int64_t>(n, fallback);
        if (v.size() != n) throw std::invalid_argument("strides/pads/output_padding/dilations do not have one "
                                                        "entry per spatial axis");
        return v;
      };
      const std::vector<int64_t> st = per_axis(attrs.strides, 1, nd), dl = per_axis(attrs.dilations, 1, nd);
      const std::vector<int64_t> op = per_axis(output_padding, 0, nd);
      if (!attrs.pads.empty() && attrs.pads.size() != 2 * nd)
        throw std::invalid_argument("pads do not have two entries per spatial axis");
      const std::vector<int64_t> pd = attrs.pads.empty() ? std::vector<int64_t>(nd, 0)
                                                         : std::vector<int64_t>(attrs.pads.begin(),
                                                                                attrs.pads.begin() + nd);
      const int64_t N = in.xs[0], C = in.xs[1], Cg = C / G, Mg = in.ws[1], M = Mg * G;
      const int64_t Mp = l1fx_convt_src::padded(Mg);  // the kernel's lanes
      int64_t geom[18];
      std::vector<int64_t> ys = {N, M};
      int64_t taps = 1, positions = 1;
      const size_t lead = 3 - nd;
      for (size_t i = 0; i < 3; ++i) {
        const bool pad_axis = i < lead;
        const size_t a = i - lead;
        const int64_t inn = pad_axis ? 1 : in.xs[2 + a], ker = pad_axis ? 1 : in.ws[2 + a];
        const int64_t s = pad_axis ? 1 : st[a], d = pad_axis ? 1 : dl[a], p = pad_axis ? 0 : pd[a];
        const int64_t o = pad_axis ? 0 : op[a];
        if (s < 1 || d < 1 || p < 0 || o < 0)
          throw std::invalid_argument("strides and dilations must be >= 1, pads and output_padding >= 0");
        const int64_t out = (inn - 1) * s - 2 * p + d * (ker - 1) + o + 1;
        if (out < 1) throw std::invalid_argument("the output of X " + shape_str(in.xs) + " and W " +
                                                 shape_str(in.ws) + " would be empty");
        geom[i] = inn; geom[3 + i] = ker; geom[6 + i] = s; geom[9 + i] = p; geom[12 + i] = d; geom[15 + i] = out;
        if (!pad_axis) ys.push_back(out);
        taps *= ker;
        positions *= out;
      }
      Ort::UnownedValue y = ctx.GetOutput(0, ys);
      if (numel(ys) == 0) return;
      // W[c, mg, kk] -> wt[g][kk][ci][mj], lanes mj >= Mg zero.
      const float* w = in.w.GetTensorData<float>();
      std::vector<float> wt(static_cast<size_t>(G * taps * Cg * Mp), 0.0f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t ci = 0; ci < Cg; ++ci)
          for (int64_t mj = 0; mj < Mg; ++mj)
            for (int64_t kk = 0; kk < taps; ++kk)
              wt[((g * taps + kk) * Cg + ci) * Mp + mj] = w[((g * Cg + ci) * Mg + mj) * taps + kk];
      std::vector<float> ycl(static_cast<size_t>(N * positions * G * Mp));
      int rc = l1fx_convt_src::l1fx_convt_forward(in.x.GetTensorData<float>(), wt.data(), in.b.GetTensorData<float>(),
                                                  ycl.data(), N, C, M, G, geom, kernel_threads(nthreads));
      if (rc != 0) throw std::runtime_error("l1fx_convt_forward failed with code " + std::to_string(rc));
      // ycl[n][o][g][mj] -> Y[n][g * Mg + mj][o]
      float* out = y.GetTensorMutableData<float>();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < positions; ++o) {
          const float* row = ycl.data() + (n * positions + o) * G * Mp;
          for (int64_t g = 0; g < G; ++g)
            for (int64_t mj = 0; mj < Mg; ++mj) out[(n * M + g * Mg + mj) * positions + o] = row[g * Mp + mj];
        }
    });
  }
};

struct ConvTransposeOp : Ort::CustomOpBase<ConvTransposeOp, ConvTransposeKernel, true> {
  int nthreads;
  explicit ConvTransposeOp(int n) : nthreads(n) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded("L1ConvTranspose", [&] { *kernel = new ConvTransposeKernel(info, nthreads); });
  }
  const char* GetName() const { return "L1ConvTranspose"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// ---------------------------------------------------------------- l1fx.points.FarthestPointSample
// idx[B, npoint] (int64) = farthest point sampling of XYZ[B, N, C] (float) from START[B] (int64), as
// l1fx.onnx_pointops.fps_reference computes it (its model-local function body is one ONNX Loop, whose
// per-iteration overhead made it ~35 ms of a 55 ms PointNet++ session): each step takes the point with the
// largest squared distance to the points taken so far, the first index on ties; the distance is
// sum_c (x_c - centre_c)^2 summed in index order without fused multiply-adds (torch's order for C <= 4),
// the running minimum and the arg-max treat NaN as torch.minimum and torch.argmax do (NaN wins).
__attribute__((optimize("fp-contract=off")))
void farthest_point_sample(const float* xyz, const int64_t* start, int64_t* idx, int64_t B, int64_t N, int64_t C,
                           int64_t npoint, int nthreads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (B > 1 && nthreads > 1)
  for (int64_t b = 0; b < B; ++b) {
    const float* x = xyz + b * N * C;
    std::vector<float> dist(static_cast<size_t>(N), __builtin_inff());
    std::vector<float> centre(static_cast<size_t>(C));
    int64_t far = start[b];
    for (int64_t i = 0; i < npoint; ++i) {
      idx[b * npoint + i] = far;
      std::copy(x + far * C, x + far * C + C, centre.begin());
      float best = 0.0f;
      int64_t best_n = 0;
      for (int64_t n = 0; n < N; ++n) {
        const float* p = x + n * C;
        float sq = 0.0f;
        if (C > 0) {
          const float d0 = p[0] - centre[0];
          sq = d0 * d0;
          for (int64_t c = 1; c < C; ++c) {
            const float d = p[c] - centre[c];
            sq = sq + d * d;
          }
        }
        const float old = dist[size_t(n)];
        const float v = (std::isnan(old) || std::isnan(sq)) ? std::numeric_limits<float>::quiet_NaN()
                                                               : (sq < old ? sq : old);
        dist[size_t(n)] = v;
        if (n == 0 || (!std::isnan(best) && (std::isnan(v) || v > best))) {
          best = v;
          best_n = n;
        }
      }
      far = best_n;
    }
  }
}

struct FpsKernel {
  int64_t npoint;
  int nthreads;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded("points.FarthestPointSample", [&] {
      Ort::KernelContext ctx(context);
      Ort::ConstValue xyz = ctx.GetInput(0), start = ctx.GetInput(1);
      const std::vector<int64_t> xs = xyz.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> ss = start.GetTensorTypeAndShapeInfo().GetShape();
      if (xs.size() != 3 || ss.size() != 1 || ss[0] != xs[0])
        throw std::invalid_argument("XYZ " + shape_str(xs) + ", START " + shape_str(ss) +
                                    " do not fit XYZ[B, N, C], START[B]");
      const int64_t B = xs[0], N = xs[1], C = xs[2];
      if (npoint < 0) throw std::invalid_argument("npoint must be >= 0, got " + std::to_string(npoint));
      Ort::UnownedValue out = ctx.GetOutput(0, {B, npoint});
      if (B == 0 || npoint == 0) return;
      if (N == 0) throw std::invalid_argument("XYZ " + shape_str(xs) + " has no points to sample");
      const int64_t* st = start.GetTensorData<int64_t>();
      for (int64_t b = 0; b < B; ++b)
        if (st[b] < 0 || st[b] >= N)
          throw std::invalid_argument("START[" + std::to_string(b) + "] = " + std::to_string(st[b]) +
                                      " is not a point index in [0, " + std::to_string(N) + ")");
      farthest_point_sample(xyz.GetTensorData<float>(), st, out.GetTensorMutableData<int64_t>(), B, N, C, npoint,
                            kernel_threads(nthreads));
    });
  }
};

struct FpsOp : Ort::CustomOpBase<FpsOp, FpsKernel, true> {
  int nthreads;
  explicit FpsOp(int n) : nthreads(n) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded("points.FarthestPointSample", [&] { *kernel = new FpsKernel{int_attr(info, "npoint", -1), nthreads}; });
  }
  const char* GetName() const { return "FarthestPointSample"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; }
};

}  // namespace l1fx_ort

extern "C" {

// The API version this library was compiled against (the runtime must be at least as new).
int l1fx_ort_api_version() { return ORT_API_VERSION; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                   const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // A runtime older than the headers. Returning success here would register nothing and leave the
    // session on the slow function bodies while l1fx reports the native path, so fail the registration
    // (l1fx.ort_session then falls back, with its warning). Version 1 of the API serves every runtime,
    // and CreateStatus is its first entry (the struct only grows), so it can build the error.
    const OrtApi* v1 = api_base->GetApi(1);
    if (v1 == nullptr) return nullptr;  // every onnxruntime serves version 1: cannot happen
    const std::string msg = std::string("the l1fx custom-op library was built with onnxruntime API version ") +
                            std::to_string(ORT_API_VERSION) + " headers, newer than this onnxruntime (" +
                            api_base->GetVersionString() + "); rebuild it with older headers ($L1FX_ORT_INCLUDE)";
    return v1->CreateStatus(ORT_FAIL, msg.c_str());
  }
  Ort::InitApi(api);
  int nthreads = 0;
  try {
    nthreads = std::atoi(Ort::ConstSessionOptions(options).GetConfigEntryOrDefault(l1fx_ort::kThreadsKey, "0").c_str());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain("l1fx", &domain)) return st;
  // The ops and the domain must outlive every session made with these options, which onnxruntime
  // does not tell us: one small set per registration, kept for the process.
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, new l1fx_ort::LinearOp(nthreads))) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, new l1fx_ort::ConvOp(nthreads))) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, new l1fx_ort::FusedConvOp(nthreads))) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, new l1fx_ort::ConvTransposeOp(nthreads))) return st;
  if (OrtStatus* st = api->AddCustomOpDomain(options, domain)) return st;
  OrtCustomOpDomain* points = nullptr;  // l1fx.onnx_pointops.DOMAIN
  if (OrtStatus* st = api->CreateCustomOpDomain("l1fx.points", &points)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(points, new l1fx_ort::FpsOp(nthreads))) return st;
  return api->AddCustomOpDomain(options, points);
}

}  // extern "C"
