// dfqkern._C: op registration and argument checks only; the math lives in csrc/cpu and csrc/cuda.
//
// CPU ops are registered as torch.ops.dfqkern.cpu_* (schema + CPU kernel). Each wrapper checks its
// arguments and raises a readable error (ValueError / TypeError naming the argument and the allowed
// values) before calling dfqkern::cpu::*; no kernel ever sees an unchecked tensor.
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"

#ifndef DFQKERN_VERSION
#define DFQKERN_VERSION "dev"
#endif

namespace dfqkern {

// What this build contains, so Python can report and choose backends without guessing.
pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = DFQKERN_VERSION;
#ifdef DFQKERN_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_ops"] = true;
  d["cpu_avx2"] = cpu::cpu_has_avx2();
  d["cpu_dotprod"] = cpu::cpu_has_dotprod();  // aarch64 sdot (false elsewhere)
  return d;
}

namespace {

using at::Tensor;
using std::optional;

// ------------------------------------------------------------------------------------------ checks

void check_cpu(const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the dfqkern CPU backend, got device ",
                    t.device());
}

void check_float(const char* name, const Tensor& t) {
  check_cpu(name, t);
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", s);
}

void check_bits(const char* name, int64_t bits, std::initializer_list<int64_t> allowed) {
  bool ok = false;
  std::string list;
  for (int64_t a : allowed) {
    ok = ok || a == bits;
    list += (list.empty() ? "" : ", ") + std::to_string(a);
  }
  TORCH_CHECK_VALUE(ok, name, " must be one of (", list, "), got ", bits);
}

void check_same_shape(const char* a, const Tensor& ta, const char* b, const Tensor& tb) {
  TORCH_CHECK_VALUE(ta.sizes() == tb.sizes(), a, " and ", b, " must have one shape, got ", ta.sizes(), " and ",
                    tb.sizes());
}

// Normalizes `axis` against x and checks the per-tensor / per-channel parameter sizes.
optional<int64_t> check_params(const Tensor& x, const Tensor& scale, const Tensor& zero_point, optional<int64_t> axis) {
  check_cpu("scale", scale);
  check_cpu("zero_point", zero_point);
  TORCH_CHECK_TYPE(scale.is_floating_point(), "scale must be a floating-point tensor, got ", scale.scalar_type());
  TORCH_CHECK_TYPE(zero_point.scalar_type() != at::kBool && !zero_point.is_complex(),
                   "zero_point must be an integer or float tensor, got ", zero_point.scalar_type());
  if (!axis) {
    TORCH_CHECK_VALUE(scale.numel() == 1 && zero_point.numel() == 1,
                      "per-tensor scale and zero_point must have one element, got shapes ", scale.sizes(), " and ",
                      zero_point.sizes());
    return axis;
  }
  const int64_t dim = x.dim();
  TORCH_CHECK_VALUE(dim > 0 && *axis >= -dim && *axis < dim, "axis must be in [", -dim, ", ", dim - 1,
                    "] for a tensor of shape ", x.sizes(), ", got ", *axis);
  const int64_t a = *axis < 0 ? *axis + dim : *axis;
  TORCH_CHECK_VALUE(scale.numel() == x.size(a) && zero_point.numel() == x.size(a), "per-channel scale and zero_point must have ",
                    x.size(a), " elements (size of axis ", a, "), got ", scale.numel(), " and ", zero_point.numel());
  return a;
}

void check_drop(double drop_prob) {
  TORCH_CHECK_VALUE(drop_prob >= 0.0 && drop_prob <= 1.0, "drop_prob must be in [0, 1], got ", drop_prob);
}


int64_t chunk_k(int64_t w_bits) { return w_bits == 2 ? 128 : (w_bits == 8 ? 32 : 64); }

// A prepacked cpu-tile-v1 or cpu-panel-v1 weight (told apart by corr's last dimension, 4 or 16) of
// `groups` x `n/groups` rows and K = k.
void check_prepacked(const Tensor& tiles, const Tensor& corr, int64_t w_bits, int64_t n, int64_t k, int64_t groups) {
  check_bits("w_bits", w_bits, {2, 3, 4, 8});
  check_cpu("w_tiles", tiles);
  check_cpu("w_corr", corr);
  TORCH_CHECK_VALUE(groups >= 1 && n % groups == 0, "weight rows (", n, ") must be a multiple of groups (", groups, ")");
  const bool panel = corr.dim() == 3 && corr.size(2) == 16;
  const int64_t rows = panel ? 16 : 4, t = groups * ((n / groups + rows - 1) / rows);
  const int64_t block_k = panel ? chunk_k(w_bits) / 8 : chunk_k(w_bits), block_bytes = panel ? 64 : 128;
  const int64_t nblocks = (k + block_k - 1) / block_k;
  const char* layout = panel ? "cpu-panel-v1" : "cpu-tile-v1";
  TORCH_CHECK_TYPE(tiles.scalar_type() == at::kByte && tiles.is_contiguous(), "w_tiles must be contiguous uint8, got ",
                   tiles.scalar_type());
  TORCH_CHECK_VALUE(tiles.numel() == t * nblocks * block_bytes, "w_tiles has ", tiles.numel(), " bytes; a ", layout,
                    " weight with ", n, " rows, K=", k, ", ", w_bits, " bits, groups=", groups, " needs ",
                    t * nblocks * block_bytes, " (re-derive it with cpu_prepack_weight / cpu_prepack_panels)");
  TORCH_CHECK_VALUE(corr.scalar_type() == at::kInt && corr.is_contiguous() && corr.dim() == 3 &&
                        corr.size(0) == t && corr.size(1) == 3 && corr.size(2) == rows,
                    "w_corr must be contiguous int32 [", t, ", 3, ", rows, "], got ", corr.scalar_type(), " ",
                    corr.sizes());
}

void check_row_vector(const char* name, const Tensor& t, int64_t n) {
  check_cpu(name, t);
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == n, name, " must have ", n, " elements, got ", t.numel());
}

void check_act_params(const optional<Tensor>& a_scale, const optional<Tensor>& a_zero_point, bool per_token) {
  if (per_token) return;
  TORCH_CHECK_VALUE(a_scale && a_zero_point, "static activation quantization needs a_scale and a_zero_point");
  check_cpu("a_scale", *a_scale);
  check_cpu("a_zero_point", *a_zero_point);
  TORCH_CHECK_VALUE(a_scale->numel() == 1 && a_zero_point->numel() == 1,
                    "a_scale and a_zero_point must have one element (per-tensor), got shapes ", a_scale->sizes(), " and ",
                    a_zero_point->sizes());
  TORCH_CHECK_TYPE(a_scale->is_floating_point(), "a_scale must be a floating-point tensor, got ", a_scale->scalar_type());
}

void check_packed_codes(const char* name, const Tensor& data, int64_t bits, int64_t k) {
  check_cpu(name, data);
  const int64_t per = bits == 2 ? 4 : (bits == 8 ? 1 : 2);
  TORCH_CHECK_TYPE(data.scalar_type() == at::kByte, name, " must be uint8 (kpack-lsb-v1), got ", data.scalar_type());
  TORCH_CHECK_VALUE(data.dim() == 2 && data.size(1) == (k + per - 1) / per, name, " must be [rows, ", (k + per - 1) / per,
                    "] for K=", k, " ", bits, "-bit codes, got ", data.sizes());
}

// ------------------------------------------------------------------------------------------ wrappers

std::string isa() { return cpu::isa_name(); }

void set_isa(const std::string& name) { cpu::set_isa(name); }

int64_t set_parallel_min_cost(int64_t cost) { return cpu::set_parallel_min_cost(cost); }

Tensor quantize(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t bits, optional<int64_t> axis) {
  check_float("x", x);
  check_bits("bits", bits, {2, 3, 4, 8});
  axis = check_params(x, scale, zero_point, axis);
  return cpu::quantize(x, scale, zero_point, bits, axis);
}

Tensor dequantize(const Tensor& codes, const Tensor& scale, const Tensor& zero_point, optional<int64_t> axis) {
  check_cpu("codes", codes);
  TORCH_CHECK_TYPE(!codes.is_floating_point() && !codes.is_complex() && codes.scalar_type() != at::kBool,
                   "codes must be an integer tensor, got ", codes.scalar_type());
  axis = check_params(codes, scale, zero_point, axis);
  return cpu::dequantize(codes, scale, zero_point, axis);
}

Tensor fake_quant_forward(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t bits,
                          optional<int64_t> axis, double drop_prob, int64_t seed) {
  check_float("x", x);
  check_bits("bits", bits, {2, 3, 4, 8});
  check_drop(drop_prob);
  axis = check_params(x, scale, zero_point, axis);
  return cpu::fake_quant_forward(x, scale, zero_point, bits, axis, drop_prob, seed);
}

std::tuple<Tensor, Tensor, Tensor> fake_quant_backward(const Tensor& grad, const Tensor& x, const Tensor& scale,
                                                       const Tensor& zero_point, int64_t bits, optional<int64_t> axis,
                                                       double grad_scale, double drop_prob, int64_t seed) {
  check_float("grad", grad);
  check_float("x", x);
  check_same_shape("grad", grad, "x", x);
  check_bits("bits", bits, {2, 3, 4, 8});
  check_drop(drop_prob);
  axis = check_params(x, scale, zero_point, axis);
  return cpu::fake_quant_backward(grad, x, scale, zero_point, bits, axis, grad_scale, drop_prob, seed);
}

std::tuple<Tensor, Tensor> adaround_forward(const Tensor& base, const Tensor& v, const Tensor& scale,
                                            const Tensor& zero_point, int64_t bits, optional<int64_t> axis, double beta,
                                            bool hard) {
  check_float("v", v);
  check_float("base", base);
  check_same_shape("base", base, "v", v);
  check_bits("bits", bits, {2, 3, 4, 8});
  axis = check_params(v, scale, zero_point, axis);
  return cpu::adaround_forward(base, v, scale, zero_point, bits, axis, beta, hard);
}

std::tuple<Tensor, Tensor> adaround_backward(const Tensor& grad, const Tensor& base, const Tensor& v,
                                             const Tensor& scale, const Tensor& zero_point, int64_t bits,
                                             optional<int64_t> axis, double beta, double reg_grad) {
  check_float("grad", grad);
  check_float("v", v);
  check_float("base", base);
  check_same_shape("base", base, "v", v);
  check_same_shape("grad", grad, "v", v);
  check_bits("bits", bits, {2, 3, 4, 8});
  axis = check_params(v, scale, zero_point, axis);
  return cpu::adaround_backward(grad, base, v, scale, zero_point, bits, axis, beta, reg_grad);
}

// Shared by the GEMM weight layouts (tiles, panels): they take the same packed codes.
void check_prepack_args(const Tensor& data, const Tensor& zero_point, int64_t bits, int64_t k,
                        int64_t groups) {
  check_bits("bits", bits, {2, 3, 4, 8});
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  check_packed_codes("data", data, bits, k);
  TORCH_CHECK_VALUE(groups >= 1 && data.size(0) % groups == 0, "groups must be >= 1 and divide the ", data.size(0),
                    " weight rows, got ", groups);
  check_cpu("zero_point", zero_point);
  TORCH_CHECK_VALUE(zero_point.numel() == data.size(0), "zero_point must have one element per weight row (",
                    data.size(0), "), got ", zero_point.numel());
}

std::tuple<Tensor, Tensor> prepack_weight(const Tensor& data, const Tensor& zero_point, int64_t bits, int64_t k,
                                          int64_t groups) {
  check_prepack_args(data, zero_point, bits, k, groups);
  return cpu::prepack_weight(data, zero_point, bits, k, groups);
}

std::tuple<Tensor, Tensor> prepack_panels(const Tensor& data, const Tensor& zero_point, int64_t bits, int64_t k,
                                          int64_t groups) {
  check_prepack_args(data, zero_point, bits, k, groups);
  return cpu::prepack_panels(data, zero_point, bits, k, groups);
}

Tensor prepack_depthwise(const Tensor& data, const Tensor& zero_point, int64_t bits, int64_t k) {
  check_bits("bits", bits, {2, 3, 4, 8});
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  check_packed_codes("data", data, bits, k);
  check_cpu("zero_point", zero_point);
  TORCH_CHECK_VALUE(zero_point.numel() == data.size(0), "zero_point must have one element per weight row (",
                    data.size(0), "), got ", zero_point.numel());
  const Tensor zi = zero_point.to(at::kInt);
  TORCH_CHECK_VALUE(zi.abs().max().item<int32_t>() <= 32000, "weight zero points must lie in [-32000, 32000]");
  return cpu::prepack_depthwise(data, zero_point, bits, k);
}

std::tuple<Tensor, Tensor, Tensor> quantize_activation(const Tensor& x, const optional<Tensor>& scale,
                                                       const optional<Tensor>& zero_point, int64_t bits, bool per_token,
                                                       bool symmetric) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must have K >= 1 features, got shape ", x.sizes());
  check_bits("act bits", bits, {4, 8});
  check_act_params(scale, zero_point, per_token);
  return cpu::quantize_activation(x, scale, zero_point, bits, per_token, symmetric);
}

Tensor linear_int(const Tensor& a_data, const Tensor& a_zero_point, int64_t a_bits, int64_t k, const Tensor& w_tiles,
                  const Tensor& w_corr, int64_t w_bits, int64_t n) {
  check_bits("a_bits", a_bits, {4, 8});
  check_packed_codes("a_data", a_data, a_bits, k);
  check_cpu("a_zero_point", a_zero_point);
  TORCH_CHECK_VALUE(a_zero_point.numel() == 1 || a_zero_point.numel() == a_data.size(0),
                    "a_zero_point must have 1 (per-tensor) or M=", a_data.size(0), " (per-token) elements, got ",
                    a_zero_point.numel());
  check_prepacked(w_tiles, w_corr, w_bits, n, k, 1);
  return cpu::linear_int(a_data, a_zero_point, a_bits, k, w_tiles, w_corr, w_bits, n);
}

Tensor linear(const Tensor& x, const Tensor& w_tiles, const Tensor& w_corr, const Tensor& w_scale, int64_t w_bits,
              int64_t n, int64_t k, const optional<Tensor>& bias, const optional<Tensor>& a_scale,
              const optional<Tensor>& a_zero_point, int64_t a_bits, bool per_token, bool symmetric) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "x has ", x.dim() ? x.size(-1) : 0,
                    " input features, weight expects K=", k);
  check_prepacked(w_tiles, w_corr, w_bits, n, k, 1);
  check_row_vector("w_scale", w_scale, n);
  if (bias) check_row_vector("bias", *bias, n);
  check_bits("a_bits", a_bits, {4, 8});
  check_act_params(a_scale, a_zero_point, per_token);
  return cpu::linear(x, w_tiles, w_corr, w_scale, w_bits, n, k, bias, a_scale, a_zero_point, a_bits, per_token,
                     symmetric);
}

// x: the input's sizes (NCHW).
cpu::ConvGeom conv_geom(at::IntArrayRef x, at::IntArrayRef w_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(x.size() == 4, "x must be NCHW (4-D), got shape ", x);
  TORCH_CHECK_VALUE(w_shape.size() == 4, "w_shape must be [O, C/groups, kh, kw], got ", w_shape);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must have two elements each, got ", stride, ", ", padding, ", ",
                    dilation);
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(groups >= 1 && w_shape[0] % groups == 0, "groups must be >= 1 and divide the ", w_shape[0],
                    " output channels, got ", groups);
  TORCH_CHECK_VALUE(x[1] == w_shape[1] * groups, "x has ", x[1], " channels, weight expects ",
                    w_shape[1] * groups, " (groups=", groups, ")");
  const cpu::ConvGeom g{stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups,
                       w_shape[0], w_shape[1], w_shape[2], w_shape[3]};
  TORCH_CHECK_VALUE(x[2] + 2 * padding[0] >= dilation[0] * (w_shape[2] - 1) + 1 &&
                        x[3] + 2 * padding[1] >= dilation[1] * (w_shape[3] - 1) + 1 && g.out_h(x[2]) >= 1 &&
                        g.out_w(x[3]) >= 1,
                    "input ", x, " with padding ", padding, " is smaller than the dilated kernel ",
                    w_shape.slice(2));
  return g;
}

cpu::ConvGeom conv_geom(const Tensor& x, at::IntArrayRef w_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
  return conv_geom(x.sizes(), w_shape, stride, padding, dilation, groups);
}

void check_conv_weight(const Tensor& w, const Tensor& w_corr, int64_t w_bits, const cpu::ConvGeom& g) {
  const int64_t k = g.kh * g.kw * g.in_per_group;
  if (g.in_per_group == 1) {  // direct depthwise layout
    check_bits("w_bits", w_bits, {2, 3, 4, 8});
    check_cpu("w", w);
    TORCH_CHECK_VALUE(w.scalar_type() == at::kShort && w.is_contiguous() && w.dim() == 2 && w.size(0) == g.out_ch &&
                          w.size(1) == k,
                      "a C/groups == 1 convolution needs the depthwise layout int16 [", g.out_ch, ", ", k,
                      "] from cpu_prepack_depthwise, got ", w.scalar_type(), " ", w.sizes());
  } else {
    check_prepacked(w, w_corr, w_bits, g.out_ch, k, g.groups);
  }
}

Tensor conv2d_int(const Tensor& x_codes, int64_t x_zero_point, const Tensor& w, const Tensor& w_corr, int64_t w_bits,
                  at::IntArrayRef w_shape, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups) {
  check_cpu("x_codes", x_codes);
  TORCH_CHECK_TYPE(x_codes.scalar_type() == at::kByte, "x_codes must be uint8 codes, got ", x_codes.scalar_type());
  TORCH_CHECK_VALUE(x_zero_point >= 0 && x_zero_point <= 255, "x_zero_point must be a code in [0, 255], got ",
                    x_zero_point);
  const cpu::ConvGeom g = conv_geom(x_codes, w_shape, stride, padding, dilation, groups);
  check_conv_weight(w, w_corr, w_bits, g);
  return cpu::conv2d_int(x_codes, x_zero_point, w, w_corr, w_bits, g);
}

Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& w_corr, const Tensor& w_scale, int64_t w_bits,
              at::IntArrayRef w_shape, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
              int64_t groups, const optional<Tensor>& bias, double a_scale, int64_t a_zero_point, int64_t a_bits) {
  check_float("x", x);
  check_bits("a_bits", a_bits, {4, 8});
  TORCH_CHECK_VALUE(a_zero_point >= 0 && a_zero_point <= 255, "a_zero_point must be an integer in [0, 255], got ",
                    a_zero_point);
  TORCH_CHECK_VALUE(a_scale > 0, "a_scale must be > 0, got ", a_scale);
  const cpu::ConvGeom g = conv_geom(x, w_shape, stride, padding, dilation, groups);
  check_conv_weight(w, w_corr, w_bits, g);
  check_row_vector("w_scale", w_scale, g.out_ch);
  if (bias) check_row_vector("bias", *bias, g.out_ch);
  return cpu::conv2d(x, w, w_corr, w_scale, w_bits, g, bias, a_scale, a_zero_point, a_bits);
}

// The layer tensors a frozen call's bound tensors were derived from, with their version counters at binding:
// check() raises once any of them was written in place since.
class WatchedTensors {
 public:
  explicit WatchedTensors(std::vector<Tensor> watch) {
    for (auto& t : watch)
      if (!t.is_inference()) {  // inference tensors keep no version counter (and cannot be written outside it)
        versions_.push_back(t.unsafeGetTensorImpl()->version_counter().current_version());
        tensors_.push_back(std::move(t));
      }
  }
  void check() const {
    for (size_t i = 0; i < tensors_.size(); ++i)
      TORCH_CHECK(tensors_[i].unsafeGetTensorImpl()->version_counter().current_version() == versions_[i],
                  "a packed layer's weights or quantizer parameters were written after dfqkern.compile(mode="
                  "'frozen') bound them: compile the model again");
  }

 private:
  std::vector<Tensor> tensors_;
  std::vector<uint32_t> versions_;
};

// A frozen call's input: float32 (the packed layer's output dtype is its input's), no gradient.
void check_frozen_input(const char* what, const Tensor& x, const optional<Tensor>& residual) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32 for a frozen packed ", what, ", got ",
                   x.scalar_type());
  TORCH_CHECK(!at::GradMode::is_enabled() || !(x.requires_grad() || (residual && residual->requires_grad())),
              "dfqkern packed layers are inference-only: no gradient flows through a frozen packed ", what,
              " (its input requires grad); run it under torch.no_grad() / torch.inference_mode()");
}

// A packed conv with everything but its input bound (dfqkern.compile mode "frozen"): the checked conv2d
// above, then the residual add and ReLU that follow it in the model, fused (cpu::ConvOutputOps). One Python
// call per conv + add + ReLU instead of three, and no per-call Python argument handling. `watch`: the
// layer's own tensors the bound ones were derived from; an in-place write to any of them (their version
// counter moves, e.g. load_state_dict) makes the call raise instead of computing with stale weights.
class PackedConvCall {
 public:
  PackedConvCall(Tensor w, Tensor w_corr, Tensor w_scale, int64_t w_bits, std::vector<int64_t> w_shape,
                 std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                 int64_t groups, optional<Tensor> bias, double a_scale, int64_t a_zero_point, int64_t a_bits, bool relu,
                 std::vector<Tensor> watch)
      : w_(std::move(w)), w_corr_(std::move(w_corr)), w_scale_(std::move(w_scale)), w_bits_(w_bits),
        w_shape_(std::move(w_shape)), stride_(std::move(stride)), padding_(std::move(padding)),
        dilation_(std::move(dilation)), groups_(groups), bias_(std::move(bias)), a_scale_(a_scale),
        a_zero_point_(a_zero_point), a_bits_(a_bits), relu_(relu), watch_(std::move(watch)) {
    check_bits("a_bits", a_bits, {4, 8});
    TORCH_CHECK_VALUE(a_zero_point >= 0 && a_zero_point <= 255, "a_zero_point must be an integer in [0, 255], got ",
                      a_zero_point);
    TORCH_CHECK_VALUE(a_scale > 0, "a_scale must be > 0, got ", a_scale);
    TORCH_CHECK_VALUE(w_shape_.size() == 4, "w_shape must have 4 elements, got ", w_shape_.size());
    check_row_vector("w_scale", w_scale_, w_shape_[0]);
    if (bias_) check_row_vector("bias", *bias_, w_shape_[0]);
  }

  // conv2d(x) [+ residual] [then ReLU]; x float32 (the packed layer's output dtype is its input's).
  Tensor operator()(const Tensor& x, const optional<Tensor>& residual) const {
    check_input(x, residual);
    check_fresh();
    const cpu::ConvGeom g = geom(x.sizes());
    return cpu::conv2d(x, w_, w_corr_, w_scale_, w_bits_, g, bias_, a_scale_, a_zero_point_, a_bits_,
                       channels_last_out_, output_ops(residual));
  }

  // The residual add / ReLU after the conv.
  cpu::ConvOutputOps output_ops(const optional<Tensor>& residual) const {
    return cpu::ConvOutputOps{residual ? &*residual : nullptr, relu_};
  }

  // Output in channels-last memory (the same values; GEMM-path convs only, others stay NCHW): set by
  // dfqkern.compile where every user of the output is another frozen conv, which reads it without a transpose.
  bool channels_last_out() const { return channels_last_out_; }
  void set_channels_last_out(bool v) { channels_last_out_ = v; }

  bool relu() const { return relu_; }
  // Whether the conv takes the GEMM path (input channels per group > 1), which PackedConvChain needs.
  bool gemm_path() const { return w_shape_[1] > 1; }

  static void check_input(const Tensor& x, const optional<Tensor>& residual) { check_frozen_input("conv", x, residual); }

  void check_fresh() const { watch_.check(); }

  // The geometry on an input of sizes x (checked), the weight checked against it.
  cpu::ConvGeom geom(at::IntArrayRef x) const {
    const cpu::ConvGeom g = conv_geom(x, w_shape_, stride_, padding_, dilation_, groups_);
    check_conv_weight(w_, w_corr_, w_bits_, g);
    return g;
  }

  cpu::ConvLayer layer(const cpu::ConvGeom& g) const {
    return cpu::ConvLayer{w_, w_corr_, w_scale_, w_bits_, g, bias_, a_scale_, a_zero_point_, a_bits_};
  }


 private:
  Tensor w_, w_corr_, w_scale_;
  int64_t w_bits_;
  std::vector<int64_t> w_shape_, stride_, padding_, dilation_;
  int64_t groups_;
  optional<Tensor> bias_;
  double a_scale_;
  int64_t a_zero_point_, a_bits_;
  bool relu_;
  bool channels_last_out_ = false;
  WatchedTensors watch_;
};

// Two frozen convs where the first's output (after its ReLU, if it has one) feeds only the second: one call
// of cpu::conv2d_chain (the first writes NHWC fp32, the second quantizes it from there), then the second's
// residual add / ReLU. The same values as second(first(x), residual), bit for bit.
class PackedConvChain {
 public:
  PackedConvChain(PackedConvCall first, PackedConvCall second) : first_(std::move(first)), second_(std::move(second)) {
    TORCH_CHECK_VALUE(first_.gemm_path() && second_.gemm_path(),
                      "PackedConvChain: both convs must take the GEMM path (input channels per group > 1)");
  }

  Tensor operator()(const Tensor& x, const optional<Tensor>& residual) const {
    PackedConvCall::check_input(x, residual);
    first_.check_fresh();
    second_.check_fresh();
    const cpu::ConvGeom ga = first_.geom(x.sizes());
    const cpu::ConvGeom gb = second_.geom({x.size(0), ga.out_ch, ga.out_h(x.size(2)), ga.out_w(x.size(3))});
    return cpu::conv2d_chain(x, first_.layer(ga), first_.relu(), second_.layer(gb), second_.channels_last_out(),
                             second_.output_ops(residual));
  }

  bool channels_last_out() const { return second_.channels_last_out(); }
  void set_channels_last_out(bool v) { second_.set_channels_last_out(v); }

 private:
  PackedConvCall first_, second_;
};

// A packed Linear with static per-tensor activation quantization and everything but its input bound
// (dfqkern.compile mode "frozen"): the checked linear above, with the layout the Python dispatch picks bound
// per case (w1 / corr1 for one row, wn / corrn for several; wn_bits: the code width wn holds, which differs
// from w_bits where the several-rows layout is the one-byte-per-code copy of the amx level; -1: w_bits).
class PackedLinearCall {
 public:
  PackedLinearCall(Tensor w1, Tensor corr1, Tensor wn, Tensor corrn, Tensor w_scale, int64_t w_bits, int64_t n,
                   int64_t k, optional<Tensor> bias, Tensor a_scale, Tensor a_zero_point, int64_t a_bits, bool symmetric,
                   std::vector<Tensor> watch, int64_t wn_bits)
      : w1_(std::move(w1)), corr1_(std::move(corr1)), wn_(std::move(wn)), corrn_(std::move(corrn)),
        w_scale_(std::move(w_scale)), w_bits_(w_bits), wn_bits_(wn_bits < 0 ? w_bits : wn_bits), n_(n), k_(k),
        bias_(std::move(bias)), a_scale_(std::move(a_scale)), a_zero_point_(std::move(a_zero_point)), a_bits_(a_bits),
        symmetric_(symmetric), watch_(std::move(watch)) {
    check_prepacked(w1_, corr1_, w_bits_, n_, k_, 1);
    check_prepacked(wn_, corrn_, wn_bits_, n_, k_, 1);
    check_row_vector("w_scale", w_scale_, n_);
    if (bias_) check_row_vector("bias", *bias_, n_);
    check_bits("a_bits", a_bits_, {4, 8});
    check_act_params(a_scale_, a_zero_point_, false);
  }

  Tensor operator()(const Tensor& x) const {
    check_frozen_input("linear", x, std::nullopt);
    watch_.check();
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k_, "x has ", x.dim() ? x.size(-1) : 0,
                      " input features, weight expects K=", k_);
    const bool one_row = x.numel() == k_;
    Tensor y = cpu::linear(x, one_row ? w1_ : wn_, one_row ? corr1_ : corrn_, w_scale_, one_row ? w_bits_ : wn_bits_,
                           n_, k_, bias_,
                           a_scale_, a_zero_point_, a_bits_, false, symmetric_);
    if (y.dim() != x.dim()) {
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape.back() = n_;
      y = y.reshape(shape);
    }
    return y;
  }

 private:
  Tensor w1_, corr1_, wn_, corrn_, w_scale_;
  int64_t w_bits_, wn_bits_, n_, k_;
  optional<Tensor> bias_;
  Tensor a_scale_, a_zero_point_;
  int64_t a_bits_;
  bool symmetric_;
  WatchedTensors watch_;
};

// A zero point of matmul_int: one element, or broadcastable to `shape` with size 1 along `free_dim`.
void check_matmul_zero_point(const char* name, const Tensor& z, at::IntArrayRef shape, int64_t free_dim) {
  check_cpu(name, z);
  TORCH_CHECK_TYPE(!z.is_floating_point() && !z.is_complex() && z.scalar_type() != at::kBool, name,
                   " must be an integer tensor, got ", z.scalar_type());
  if (z.numel() == 1) return;
  std::vector<int64_t> want(shape.begin(), shape.end());
  want[want.size() + free_dim] = 1;
  bool ok = z.dim() == static_cast<int64_t>(want.size());
  for (int64_t i = 0; ok && i < z.dim(); ++i) ok = z.size(i) == 1 || z.size(i) == want[i];
  TORCH_CHECK_VALUE(ok, name, " of shape ", z.sizes(), " must have one element or broadcast to ", at::IntArrayRef(want));
}

Tensor matmul_int(const Tensor& a, const Tensor& a_zero_point, const Tensor& b, const Tensor& b_zero_point) {
  check_cpu("a", a);
  check_cpu("b", b);
  TORCH_CHECK_TYPE(a.scalar_type() == at::kByte, "a must be a uint8 tensor of codes, got ", a.scalar_type());
  TORCH_CHECK_TYPE(b.scalar_type() == at::kByte, "b must be a uint8 tensor of codes, got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.dim() >= 2 && b.dim() == a.dim(), "a and b must be [..., M, K] and [..., K, N] with one number "
                    "of dims, got shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.sizes().slice(0, a.dim() - 2) == b.sizes().slice(0, b.dim() - 2),
                    "a and b must have one batch shape, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.size(-1) == b.size(-2), "a has K=", a.size(-1), " but b has K=", b.size(-2));
  // (a - za)(b - zb) of 8-bit codes summed over K stays below 2^31 (contract.MATMUL_MAX_K)
  constexpr int64_t kMaxK = (int64_t{1} << 31) / (255 * 255);
  TORCH_CHECK_VALUE(a.size(-1) <= kMaxK, "K=", a.size(-1), " exceeds ", kMaxK,
                    ", the largest K whose int32 result is exact");
  check_matmul_zero_point("a_zero_point", a_zero_point, a.sizes(), -1);
  check_matmul_zero_point("b_zero_point", b_zero_point, b.sizes(), -2);
  return cpu::matmul_int(a, a_zero_point, b, b_zero_point);
}

Tensor attention_qkv(const Tensor& qkv, int64_t heads, double q_mult, const Tensor& scale, const Tensor& zero_point,
                     int64_t bits, double fine, double coarse, int64_t levels) {
  check_cpu("qkv", qkv);
  TORCH_CHECK_TYPE(qkv.scalar_type() == at::kFloat, "qkv must be float32, got ", qkv.scalar_type());
  TORCH_CHECK_VALUE(heads >= 1, "heads must be >= 1, got ", heads);
  TORCH_CHECK_VALUE(qkv.dim() == 3 && qkv.size(2) % (3 * heads) == 0 && qkv.size(2) > 0,
                    "qkv must be [B, N, 3 * heads * head_dim] with heads=", heads, ", got shape ", qkv.sizes());
  constexpr int64_t kMaxK = (int64_t{1} << 31) / (255 * 255);  // as matmul_int: exact int32 sums
  TORCH_CHECK_VALUE(qkv.size(1) <= kMaxK && qkv.size(2) / (3 * heads) <= kMaxK, "tokens and head_dim must be at most ",
                    kMaxK, " (exact int32 matmuls), got shape ", qkv.sizes(), " with heads=", heads);
  check_bits("bits", bits, {2, 3, 4, 8});
  check_cpu("scale", scale);
  check_cpu("zero_point", zero_point);
  TORCH_CHECK_TYPE(scale.is_floating_point(), "scale must be a floating-point tensor, got ", scale.scalar_type());
  TORCH_CHECK_TYPE(!zero_point.is_floating_point() && !zero_point.is_complex() && zero_point.scalar_type() != at::kBool,
                   "zero_point must be an integer tensor, got ", zero_point.scalar_type());
  TORCH_CHECK_VALUE((scale.numel() == 3 || scale.numel() == 3 * heads) && zero_point.numel() == scale.numel(),
                    "scale and zero_point must have 3 (per tensor) or 3 * heads = ", 3 * heads,
                    " (per head) elements, got ", scale.numel(), " and ", zero_point.numel());
  TORCH_CHECK_VALUE(std::isfinite(q_mult), "q_mult must be finite, got ", q_mult);
  TORCH_CHECK_VALUE(fine > 0 && coarse > 0 && std::isfinite(fine) && std::isfinite(coarse),
                    "fine and coarse must be finite and > 0, got ", fine, " and ", coarse);
  TORCH_CHECK_VALUE(levels >= 1 && levels <= 255, "levels must be in [1, 255], got ", levels);
  return cpu::attention_qkv(qkv, heads, q_mult, scale, zero_point, bits, fine, coarse, levels);
}

}  // namespace
}  // namespace dfqkern

TORCH_LIBRARY_FRAGMENT(dfqkern, m) {
  m.def("cpu_isa() -> str", &dfqkern::isa);
  m.def("cpu_set_isa(str name) -> ()", &dfqkern::set_isa);
  m.def("cpu_set_parallel_min_cost(int cost) -> int", &dfqkern::set_parallel_min_cost);
  m.def("cpu_quantize(Tensor x, Tensor scale, Tensor zero_point, int bits, int? axis) -> Tensor");
  m.def("cpu_dequantize(Tensor codes, Tensor scale, Tensor zero_point, int? axis) -> Tensor");
  m.def("cpu_fake_quant_forward(Tensor x, Tensor scale, Tensor zero_point, int bits, int? axis, float drop_prob, "
        "int seed) -> Tensor");
  m.def("cpu_fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int bits, int? axis, "
        "float grad_scale, float drop_prob, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_adaround_forward(Tensor base, Tensor v, Tensor scale, Tensor zero_point, int bits, int? axis, "
        "float beta, bool hard) -> (Tensor, Tensor)");
  m.def("cpu_adaround_backward(Tensor grad, Tensor base, Tensor v, Tensor scale, Tensor zero_point, int bits, "
        "int? axis, float beta, float reg_grad) -> (Tensor, Tensor)");
  m.def("cpu_prepack_weight(Tensor data, Tensor zero_point, int bits, int k, int groups) -> (Tensor, Tensor)");
  m.def("cpu_prepack_panels(Tensor data, Tensor zero_point, int bits, int k, int groups) -> (Tensor, Tensor)");
  m.def("cpu_prepack_depthwise(Tensor data, Tensor zero_point, int bits, int k) -> Tensor");
  m.def("cpu_quantize_activation(Tensor x, Tensor? scale, Tensor? zero_point, int bits, bool per_token, "
        "bool symmetric) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_linear_int(Tensor a_data, Tensor a_zero_point, int a_bits, int k, Tensor w_tiles, Tensor w_corr, "
        "int w_bits, int n) -> Tensor");
  m.def("cpu_linear(Tensor x, Tensor w_tiles, Tensor w_corr, Tensor w_scale, int w_bits, int n, int k, Tensor? bias, "
        "Tensor? a_scale, Tensor? a_zero_point, int a_bits, bool per_token, bool symmetric) -> Tensor");
  m.def("cpu_conv2d_int(Tensor x_codes, int x_zero_point, Tensor w, Tensor w_corr, int w_bits, int[] w_shape, "
        "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("cpu_conv2d(Tensor x, Tensor w, Tensor w_corr, Tensor w_scale, int w_bits, int[] w_shape, int[] stride, "
        "int[] padding, int[] dilation, int groups, Tensor? bias, float a_scale, int a_zero_point, int a_bits) -> Tensor");
  m.def("cpu_matmul_int(Tensor a, Tensor a_zero_point, Tensor b, Tensor b_zero_point) -> Tensor");
  m.def("cpu_attention_qkv(Tensor qkv, int heads, float q_mult, Tensor scale, Tensor zero_point, int bits, "
        "float fine, float coarse, int levels) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfqkern, CPU, m) {
  m.impl("cpu_quantize", &dfqkern::quantize);
  m.impl("cpu_dequantize", &dfqkern::dequantize);
  m.impl("cpu_fake_quant_forward", &dfqkern::fake_quant_forward);
  m.impl("cpu_fake_quant_backward", &dfqkern::fake_quant_backward);
  m.impl("cpu_adaround_forward", &dfqkern::adaround_forward);
  m.impl("cpu_adaround_backward", &dfqkern::adaround_backward);
  m.impl("cpu_prepack_weight", &dfqkern::prepack_weight);
  m.impl("cpu_prepack_panels", &dfqkern::prepack_panels);
  m.impl("cpu_prepack_depthwise", &dfqkern::prepack_depthwise);
  m.impl("cpu_quantize_activation", &dfqkern::quantize_activation);
  m.impl("cpu_linear_int", &dfqkern::linear_int);
  m.impl("cpu_linear", &dfqkern::linear);
  m.impl("cpu_conv2d_int", &dfqkern::conv2d_int);
  m.impl("cpu_conv2d", &dfqkern::conv2d);
  m.impl("cpu_matmul_int", &dfqkern::matmul_int);
  m.impl("cpu_attention_qkv", &dfqkern::attention_qkv);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dfqkern compiled kernels (CPU; CUDA when built with it)";
  m.def("build_info", &dfqkern::build_info, "Which parts this build of the extension contains");
  m.def("cpu_isa", &dfqkern::isa, "torch.ops.dfqkern.cpu_isa without the dispatcher (read per packed Linear call)");
  // The packed Linear / Conv2d again as plain functions: batch-1 inference is latency-bound and a
  // direct call skips the dispatcher (about 7 us per call; same checks, same kernels).
  m.def("cpu_linear", &dfqkern::linear, "torch.ops.dfqkern.cpu_linear without the dispatcher");
  m.def("cpu_conv2d", &dfqkern::conv2d, "torch.ops.dfqkern.cpu_conv2d without the dispatcher");
  m.def("cpu_matmul_int", &dfqkern::matmul_int, "torch.ops.dfqkern.cpu_matmul_int without the dispatcher");
  m.def("cpu_attention_qkv", &dfqkern::attention_qkv, "torch.ops.dfqkern.cpu_attention_qkv without the dispatcher");
  pybind11::class_<dfqkern::PackedConvCall>(m, "PackedConvCall",
                                            "A packed conv with its weights, activation quantizer and the residual "
                                            "add / ReLU after it bound: call(x, residual=None)")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, int64_t, std::vector<int64_t>, std::vector<int64_t>,
                          std::vector<int64_t>, std::vector<int64_t>, int64_t, std::optional<at::Tensor>, double, int64_t,
                          int64_t, bool, std::vector<at::Tensor>>(),
           pybind11::arg("w"), pybind11::arg("w_corr"), pybind11::arg("w_scale"), pybind11::arg("w_bits"),
           pybind11::arg("w_shape"), pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"),
           pybind11::arg("groups"), pybind11::arg("bias"), pybind11::arg("a_scale"), pybind11::arg("a_zero_point"),
           pybind11::arg("a_bits"), pybind11::arg("relu"), pybind11::arg("watch"))
      .def("__call__", &dfqkern::PackedConvCall::operator(), pybind11::arg("x"),
           pybind11::arg("residual") = pybind11::none())
      .def_property_readonly("relu", &dfqkern::PackedConvCall::relu)
      .def_property_readonly("gemm_path", &dfqkern::PackedConvCall::gemm_path)
      .def_property("channels_last_out", &dfqkern::PackedConvCall::channels_last_out,
                    &dfqkern::PackedConvCall::set_channels_last_out);
  pybind11::class_<dfqkern::PackedLinearCall>(m, "PackedLinearCall",
                                              "A packed Linear with its weights and activation quantizer bound: "
                                              "call(x)")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t,
                          std::optional<at::Tensor>, at::Tensor, at::Tensor, int64_t, bool, std::vector<at::Tensor>,
                          int64_t>(),
           pybind11::arg("w1"), pybind11::arg("corr1"), pybind11::arg("wn"), pybind11::arg("corrn"),
           pybind11::arg("w_scale"), pybind11::arg("w_bits"), pybind11::arg("n"), pybind11::arg("k"),
           pybind11::arg("bias"), pybind11::arg("a_scale"), pybind11::arg("a_zero_point"), pybind11::arg("a_bits"),
           pybind11::arg("symmetric"), pybind11::arg("watch"), pybind11::arg("wn_bits") = -1)
      .def("__call__", &dfqkern::PackedLinearCall::operator(), pybind11::arg("x"));
  pybind11::class_<dfqkern::PackedConvChain>(m, "PackedConvChain",
                                             "Two frozen convs in a row, the first's output (after its ReLU) feeding "
                                             "only the second: call(x, residual=None)")
      .def(pybind11::init<dfqkern::PackedConvCall, dfqkern::PackedConvCall>(), pybind11::arg("first"),
           pybind11::arg("second"))
      .def("__call__", &dfqkern::PackedConvChain::operator(), pybind11::arg("x"),
           pybind11::arg("residual") = pybind11::none())
      .def_property("channels_last_out", &dfqkern::PackedConvChain::channels_last_out,
                    &dfqkern::PackedConvChain::set_channels_last_out);
}
