// Registration of the CUDA ops (dfqkern::cuda_*) and their argument checks; the math lives in
// the .cu files behind launch.h. Python entry point: dfqkern/kernels/cuda.py, which prepares
// layouts and calls torch.ops.dfqkern.cuda_*; these checks are the last line of defence.
// (ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuSPARSE / cuBLAS headers that a
// plain CUDA_HOME toolkit need not have.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>

#include "launch.h"

namespace dfqkern::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_tensor(const Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_numel(const Tensor& t, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == n, op, ": ", name, " must have ", n, " elements, got ", t.numel());
}

void check_aligned16(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name, " must be 16-byte aligned");
}

int float_kind(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return kOutF32;
    case at::kHalf: return kOutF16;
    case at::kBFloat16: return kOutBF16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t);
  }
  return kOutF32;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Streaming multiprocessors of `device` (cached: a device attribute query per GEMM is avoidable).
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < 64 && cache[device].load() > 0) return cache[device].load();
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
              "dfqkern: cannot query the SM count of CUDA device ", device);
  if (device >= 0 && device < 64) cache[device].store(sms);
  return sms;
}

struct Geometry {
  int KH, KW, sh, sw, ph, pw, dh, dw;
};

// Copies the convolution geometry into a launch-args struct (GemmArgs, DepthwiseArgs: same field names).
template <class Args>
void set_geometry(Args& p, const Geometry& g, int64_t H, int64_t W, int OH, int OW) {
  p.H = int(H);
  p.W = int(W);
  p.OH = OH;
  p.OW = OW;
  p.KH = g.KH;
  p.KW = g.KW;
  p.stride_h = g.sh;
  p.stride_w = g.sw;
  p.pad_h = g.ph;
  p.pad_w = g.pw;
  p.dil_h = g.dh;
  p.dil_w = g.dw;
}

Geometry parse_geometry(at::IntArrayRef g, const char* op) {
  TORCH_CHECK(g.size() == 8, op, ": geometry must be [kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w], got ",
              g.size(), " values");
  Geometry r{int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]), int(g[6]), int(g[7])};
  TORCH_CHECK(r.KH >= 1 && r.KW >= 1, op, ": kernel size must be >= 1");
  TORCH_CHECK(r.sh >= 1 && r.sw >= 1, op, ": stride must be >= 1");
  TORCH_CHECK(r.ph >= 0 && r.pw >= 0, op, ": padding must be >= 0");
  TORCH_CHECK(r.dh >= 1 && r.dw >= 1, op, ": dilation must be >= 1");
  return r;
}

int out_size(int in, int pad, int dil, int k, int stride) { return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1; }

// An optional fp32 mark tensor (0 / NaN per activation row or input pixel; see launch.h) of `n` elements.
const float* mark_ptr(const OptTensor& mark, int64_t n, const char* op, const char* name) {
  if (!mark) return nullptr;
  check_tensor(*mark, op, name, at::kFloat);
  check_numel(*mark, n, op, name);
  TORCH_CHECK(mark->is_contiguous(), op, ": ", name, " must be contiguous");
  return mark->data_ptr<float>();
}

// Shared checks / setup of the GEMM arguments for the dense and conv entry points.
struct GemmSetup {
  GemmArgs args;
  int abits;
};

GemmSetup gemm_setup(const char* op, int64_t M, const Tensor& a_zp, const OptTensor& a_scale, const Tensor& w,
                     const Tensor& w_zero4, const Tensor& w_sum, const Tensor& w_cdelta, bool need_row_sums,
                     const OptTensor& w_scale, const OptTensor& bias, int64_t n, int64_t k_chunks, int64_t slot_bits,
                     int64_t path) {
  TORCH_CHECK(path == kPathA8 || path == kPathA4I4 || path == kPathA4I8, op, ": path must be 0 (A8), 1 (A4 int4 mma) or 2 (A4 int8 mma), got ", path);
  TORCH_CHECK(slot_bits == 2 || slot_bits == 4, op, ": slot_bits must be 2 or 4, got ", slot_bits);
  TORCH_CHECK(n >= 1 && k_chunks >= 1, op, ": n and k_chunks must be >= 1");
  TORCH_CHECK(M <= INT32_MAX && n <= INT32_MAX, op, ": M and n must fit in int32");
  check_tensor(a_zp, op, "a_zp", at::kInt);
  TORCH_CHECK(a_zp.numel() == 1 || a_zp.numel() == M, op, ": a_zp must have 1 or M=", M, " elements, got ", a_zp.numel());
  check_tensor(w, op, "w", at::kByte);
  check_numel(w, (n + 7) / 8 * k_chunks * 512, op, "w");
  check_aligned16(w, op, "w");
  const std::initializer_list<std::pair<const Tensor*, const char*>> per_n = {
      {&w_zero4, "w_zero4"}, {&w_sum, "w_sum"}, {&w_cdelta, "w_cdelta"}};
  for (auto [t, name] : per_n) {
    check_tensor(*t, op, name, at::kInt);
    check_numel(*t, n, op, name);
  }
  GemmSetup s;
  GemmArgs& p = s.args;
  s.abits = path == kPathA8 ? 8 : 4;
  p.a_zp = a_zp.data_ptr<int32_t>();
  p.a_zp_per_row = a_zp.numel() != 1;
  if (a_scale) {
    check_tensor(*a_scale, op, "a_scale", at::kFloat);
    TORCH_CHECK(a_scale->numel() == 1 || a_scale->numel() == M, op, ": a_scale must have 1 or M=", M, " elements");
    TORCH_CHECK(w_scale.has_value(), op, ": w_scale is required when a_scale is given");
    check_tensor(*w_scale, op, "w_scale", at::kFloat);
    check_numel(*w_scale, n, op, "w_scale");
    p.a_scale = a_scale->data_ptr<float>();
    p.a_scale_per_row = a_scale->numel() != 1;
    p.w_scale = w_scale->data_ptr<float>();
    if (bias) {
      check_tensor(*bias, op, "bias", at::kFloat);
      check_numel(*bias, n, op, "bias");
      p.bias = bias->data_ptr<float>();
    }
  } else {
    TORCH_CHECK(!bias.has_value(), op, ": bias needs a_scale (the integer output has no bias)");
  }
  p.w = w.data_ptr<uint8_t>();
  p.w_zero4 = reinterpret_cast<const uint32_t*>(w_zero4.data_ptr<int32_t>());
  p.w_sum = w_sum.data_ptr<int32_t>();
  p.w_cdelta = w_cdelta.data_ptr<int32_t>();
  p.need_row_sums = need_row_sums ? 1 : 0;
  p.M = int(M);
  p.N = int(n);
  p.k_chunks = int(k_chunks);
  return s;
}

// Allocates the output (and split-K workspace), runs the GEMM, returns the [M, n] result.
Tensor launch_gemm_op(const char* op, GemmSetup& s, const Tensor& like, int64_t path, int64_t slot_bits,
                std::optional<at::ScalarType> out_dtype, at::IntArrayRef out_shape) {
  GemmArgs& p = s.args;
  auto opts = like.options();
  Tensor out;
  if (p.a_scale != nullptr) {
    const at::ScalarType dt = out_dtype.value_or(at::kFloat);
    p.out_type = float_kind(dt, op, "out_dtype");
    out = at::empty(out_shape, opts.dtype(dt));
  } else {
    TORCH_CHECK(!out_dtype.has_value() || *out_dtype == at::kInt, op, ": the integer GEMM returns int32, got out_dtype ", *out_dtype);
    p.out_type = kOutI32;
    out = at::empty(out_shape, opts.dtype(at::kInt));
  }
  if (p.M == 0) return out;
  const int sms = sm_count(like.device().index());
  p.split_k = choose_split_k(p.M, p.N, p.k_chunks, sms);
  Tensor workspace;
  if (p.split_k > 1) {
    if (p.a_scale == nullptr) {
      out.zero_();
      workspace = out;
    } else {
      workspace = at::zeros({p.M, p.N}, opts.dtype(at::kInt));
    }
    p.workspace = workspace.data_ptr<int32_t>();
  }
  p.out = out.data_ptr();
  check_launch(launch_packed_gemm(p, int(path), int(slot_bits), current_stream()), op);
  return out;
}

// ------------------------------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor, Tensor> quantize_rows(const Tensor& x, const OptTensor& inv_scale, const OptTensor& zero_point,
                                                 int64_t bits, bool per_token, bool symmetric, int64_t row_bytes,
                                                 const OptTensor& mark_out) {
  const char* op = "dfqkern::cuda_quantize_rows";
  check_cuda(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.dim(), " dims");
  TORCH_CHECK(x.stride(1) == 1, op, ": x rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t packed = bits == 8 ? K : (K + 1) / 2;
  TORCH_CHECK(row_bytes >= packed && row_bytes % 16 == 0, op, ": row_bytes must be a multiple of 16 and >= ", packed,
              ", got ", row_bytes);
  TORCH_CHECK(M <= INT32_MAX && K <= INT32_MAX, op, ": M and K must fit in int32");
  c10::cuda::CUDAGuard guard(x.device());
  QuantRowsArgs p;
  p.x = x.data_ptr();
  p.dtype = float_kind(x.scalar_type(), op, "x");
  p.ldx = x.stride(0);
  p.M = int(M);
  p.K = int(K);
  p.bits = int(bits);
  p.per_token = per_token;
  p.symmetric = symmetric;
  auto opts = x.options();
  Tensor out = at::empty({M, row_bytes}, opts.dtype(at::kByte));
  Tensor scale, zp;
  if (per_token) {
    scale = at::empty({M}, opts.dtype(at::kFloat));
    zp = at::empty({M}, opts.dtype(at::kInt));
    p.out_scale = scale.data_ptr<float>();
    p.out_zp = zp.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(inv_scale && zero_point, op, ": per-tensor quantization needs inv_scale and zero_point");
    check_tensor(*inv_scale, op, "inv_scale", at::kFloat);
    check_tensor(*zero_point, op, "zero_point", at::kInt);
    check_numel(*inv_scale, 1, op, "inv_scale");
    check_numel(*zero_point, 1, op, "zero_point");
    p.inv_scale = inv_scale->data_ptr<float>();
    p.zp = zero_point->data_ptr<int32_t>();
    scale = at::empty({0}, opts.dtype(at::kFloat));  // per-tensor: the caller keeps its scale / zero point
    zp = at::empty({0}, opts.dtype(at::kInt));
  }
  p.out = out.data_ptr<uint8_t>();
  p.out_bytes = row_bytes;
  p.out_mark = const_cast<float*>(mark_ptr(mark_out, M, op, "mark_out"));
  check_launch(launch_quantize_rows(p, current_stream()), op);
  return {out, scale, zp};
}

Tensor quantize_image(const Tensor& x, const Tensor& inv_scale, const Tensor& zero_point, int64_t bits, bool pack,
                      int64_t c_padded, const OptTensor& mark_out) {
  const char* op = "dfqkern::cuda_quantize_image";
  check_cuda(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be NCHW, got ", x.dim(), " dims");
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(c_padded >= x.size(1), op, ": c_padded must be >= C=", x.size(1));
  TORCH_CHECK(!pack || (bits == 4 && c_padded % 2 == 0), op, ": packing needs bits=4 and an even c_padded");
  check_tensor(inv_scale, op, "inv_scale", at::kFloat);
  check_tensor(zero_point, op, "zero_point", at::kInt);
  check_numel(inv_scale, 1, op, "inv_scale");
  check_numel(zero_point, 1, op, "zero_point");
  c10::cuda::CUDAGuard guard(x.device());
  QuantImageArgs p;
  p.x = x.data_ptr();
  p.dtype = float_kind(x.scalar_type(), op, "x");
  p.stride_n = x.stride(0);
  p.stride_c = x.stride(1);
  p.stride_h = x.stride(2);
  p.stride_w = x.stride(3);
  p.N = int(x.size(0));
  p.C = int(x.size(1));
  p.H = int(x.size(2));
  p.W = int(x.size(3));
  p.c_padded = int(c_padded);
  p.bits = int(bits);
  p.pack = pack;
  p.inv_scale = inv_scale.data_ptr<float>();
  p.zp = zero_point.data_ptr<int32_t>();
  Tensor out = at::empty({x.size(0), x.size(2), x.size(3), pack ? c_padded / 2 : c_padded}, x.options().dtype(at::kByte));
  p.out = out.data_ptr<uint8_t>();
  p.out_mark = const_cast<float*>(mark_ptr(mark_out, x.size(0) * x.size(2) * x.size(3), op, "mark_out"));
  check_launch(launch_quantize_image(p, current_stream()), op);
  return out;
}

Tensor packed_gemm(const Tensor& a, const Tensor& a_zp, const OptTensor& a_scale, const Tensor& w, const Tensor& w_zero4,
                   const Tensor& w_sum, const Tensor& w_cdelta, bool need_row_sums, const OptTensor& w_scale,
                   const OptTensor& bias, int64_t n, int64_t k_chunks, int64_t slot_bits, int64_t path,
                   std::optional<at::ScalarType> out_dtype, const OptTensor& a_mark) {
  const char* op = "dfqkern::cuda_packed_gemm";
  check_tensor(a, op, "a", at::kByte);
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D [M, row_bytes], got ", a.dim(), " dims");
  TORCH_CHECK(a.size(1) % 16 == 0 && a.size(1) > 0, op, ": a's row length must be a positive multiple of 16 bytes, got ", a.size(1));
  check_aligned16(a, op, "a");
  c10::cuda::CUDAGuard guard(a.device());
  GemmSetup s = gemm_setup(op, a.size(0), a_zp, a_scale, w, w_zero4, w_sum, w_cdelta, need_row_sums, w_scale, bias, n,
                           k_chunks, slot_bits, path);
  const int64_t kc = 512 / slot_bits;
  TORCH_CHECK(a.size(1) * 8 / s.abits <= k_chunks * kc, op, ": a has ", a.size(1) * 8 / s.abits,
              " K slots per row but the weight only ", k_chunks * kc);
  s.args.a = a.data_ptr<uint8_t>();
  s.args.lda = a.size(1);
  s.args.a_mark = mark_ptr(a_mark, a.size(0), op, "a_mark");
  return launch_gemm_op(op, s, a, path, slot_bits, out_dtype, {a.size(0), n});
}

Tensor packed_conv(const Tensor& x, const Tensor& a_zp, const OptTensor& a_scale, const Tensor& w, const Tensor& w_zero4,
                   const Tensor& w_sum, const Tensor& w_cdelta, bool need_row_sums, const OptTensor& w_scale,
                   const OptTensor& bias, int64_t n, int64_t k_chunks, int64_t slot_bits, int64_t path,
                   at::IntArrayRef geometry, int64_t c_padded, std::optional<at::ScalarType> out_dtype,
                   const OptTensor& a_mark) {
  const char* op = "dfqkern::cuda_packed_conv";
  check_tensor(x, op, "x", at::kByte);
  TORCH_CHECK(x.dim() == 4, op, ": x must be NHWC codes [N, H, W, pixel_bytes], got ", x.dim(), " dims");
  check_aligned16(x, op, "x");
  const Geometry g = parse_geometry(geometry, op);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2);
  const int OH = out_size(int(H), g.ph, g.dh, g.KH, g.sh), OW = out_size(int(W), g.pw, g.dw, g.KW, g.sw);
  TORCH_CHECK(OH >= 1 && OW >= 1, op, ": output would be empty (", OH, "x", OW, ")");
  GemmSetup s = gemm_setup(op, N * OH * OW, a_zp, a_scale, w, w_zero4, w_sum, w_cdelta, need_row_sums, w_scale, bias, n,
                           k_chunks, slot_bits, path);
  TORCH_CHECK(a_zp.numel() == 1, op, ": conv activations are per-tensor (a_zp must have one element)");
  TORCH_CHECK(!a_scale || a_scale->numel() == 1, op, ": conv activations are per-tensor (a_scale must have one element)");
  const int64_t pixel_bytes = c_padded * s.abits / 8;
  TORCH_CHECK(c_padded > 0 && pixel_bytes % 16 == 0, op, ": c_padded * abits / 8 must be a positive multiple of 16, got c_padded=", c_padded);
  TORCH_CHECK(x.size(3) == pixel_bytes, op, ": x has ", x.size(3), " bytes per pixel, expected ", pixel_bytes);
  TORCH_CHECK(int64_t(g.KH) * g.KW * c_padded <= k_chunks * (512 / slot_bits), op, ": weight K is shorter than kh*kw*c_padded");
  GemmArgs& p = s.args;
  p.a = x.data_ptr<uint8_t>();
  p.conv = 1;
  set_geometry(p, g, H, W, OH, OW);
  p.c_padded = int(c_padded);
  p.pixel_bytes = int(pixel_bytes);
  p.a_mark = mark_ptr(a_mark, N * H * W, op, "a_mark");
  return launch_gemm_op(op, s, x, path, slot_bits, out_dtype, {N, OH, OW, n});
}

Tensor depthwise_conv(const Tensor& x, const Tensor& a_zp, const OptTensor& a_scale, const Tensor& w,
                      const OptTensor& w_scale, const OptTensor& bias, at::IntArrayRef geometry,
                      std::optional<at::ScalarType> out_dtype, const OptTensor& a_mark) {
  const char* op = "dfqkern::cuda_depthwise_conv";
  check_tensor(x, op, "x", at::kByte);
  TORCH_CHECK(x.dim() == 4, op, ": x must be NHWC codes [N, H, W, C], got ", x.dim(), " dims");
  const Geometry g = parse_geometry(geometry, op);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  check_tensor(w, op, "w", at::kChar);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == int64_t(g.KH) * g.KW && w.size(1) == C, op, ": w must be [kh*kw=",
              g.KH * g.KW, ", C=", C, "], got ", w.sizes());
  check_tensor(a_zp, op, "a_zp", at::kInt);
  check_numel(a_zp, 1, op, "a_zp");
  const int OH = out_size(int(H), g.ph, g.dh, g.KH, g.sh), OW = out_size(int(W), g.pw, g.dw, g.KW, g.sw);
  TORCH_CHECK(OH >= 1 && OW >= 1, op, ": output would be empty (", OH, "x", OW, ")");
  DepthwiseArgs p;
  p.x = x.data_ptr<uint8_t>();
  p.a_zp = a_zp.data_ptr<int32_t>();
  p.w = w.data_ptr<int8_t>();
  Tensor out;
  if (a_scale) {
    check_tensor(*a_scale, op, "a_scale", at::kFloat);
    check_numel(*a_scale, 1, op, "a_scale");
    TORCH_CHECK(w_scale.has_value(), op, ": w_scale is required when a_scale is given");
    check_tensor(*w_scale, op, "w_scale", at::kFloat);
    check_numel(*w_scale, C, op, "w_scale");
    p.a_scale = a_scale->data_ptr<float>();
    p.w_scale = w_scale->data_ptr<float>();
    if (bias) {
      check_tensor(*bias, op, "bias", at::kFloat);
      check_numel(*bias, C, op, "bias");
      p.bias = bias->data_ptr<float>();
    }
    const at::ScalarType dt = out_dtype.value_or(at::kFloat);
    p.out_type = float_kind(dt, op, "out_dtype");
    out = at::empty({N, OH, OW, C}, x.options().dtype(dt));
  } else {
    TORCH_CHECK(!bias.has_value(), op, ": bias needs a_scale (the integer output has no bias)");
    p.out_type = kOutI32;
    out = at::empty({N, OH, OW, C}, x.options().dtype(at::kInt));
  }
  p.out = out.data_ptr();
  p.a_mark = mark_ptr(a_mark, N * H * W, op, "a_mark");
  p.N = int(N);
  p.C = int(C);
  set_geometry(p, g, H, W, OH, OW);
  check_launch(launch_depthwise(p, current_stream()), op);
  return out;
}

// Shared checks of the per-channel quantizer parameters.
void check_channel_params(const char* op, const Tensor& x, int64_t channels, int64_t inner,
                          std::initializer_list<std::pair<const Tensor*, const char*>> floats, const Tensor& zero_point) {
  check_cuda(x, op, "x");
  TORCH_CHECK(x.is_contiguous(), op, ": input must be contiguous");
  TORCH_CHECK(channels >= 1 && inner >= 1 && x.numel() % (channels * inner) == 0, op, ": channels=", channels,
              " and inner=", inner, " do not tile a tensor of ", x.numel(), " elements");
  TORCH_CHECK(channels <= INT32_MAX, op, ": too many channels");
  for (auto [t, name] : floats) {
    check_tensor(*t, op, name, at::kFloat);
    check_numel(*t, channels, op, name);
  }
  check_tensor(zero_point, op, "zero_point", at::kInt);
  check_numel(zero_point, channels, op, "zero_point");
}

void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, op, ": bits must be in [2, 8], got ", bits);
}

FakeQuantArgs fake_quant_args(const char* op, const Tensor& x, const Tensor& scale, const Tensor& inv_scale,
                              const Tensor& zero_point, int64_t bits, int64_t channels, int64_t inner,
                              int64_t drop_threshold, int64_t seed) {
  check_bits(op, bits);
  check_channel_params(op, x, channels, inner, {{&scale, "scale"}, {&inv_scale, "inv_scale"}}, zero_point);
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold <= (int64_t(1) << 32), op, ": drop_threshold must be in [0, 2**32]");
  FakeQuantArgs p;
  p.x = x.data_ptr();
  p.dtype = float_kind(x.scalar_type(), op, "x");
  p.numel = x.numel();
  p.channels = int(channels);
  p.inner = inner;
  p.scale = scale.data_ptr<float>();
  p.inv_scale = inv_scale.data_ptr<float>();
  p.zp = zero_point.data_ptr<int32_t>();
  p.bits = int(bits);
  p.drop_threshold = uint64_t(drop_threshold);
  p.seed_mul = static_cast<uint32_t>((uint64_t(seed) & 0xFFFFFFFFull) * 0x9E3779B9ull);
  return p;
}

Tensor fake_quant_forward(const Tensor& x, const Tensor& scale, const Tensor& inv_scale, const Tensor& zero_point,
                          int64_t bits, int64_t channels, int64_t inner, int64_t drop_threshold, int64_t seed) {
  const char* op = "dfqkern::cuda_fake_quant_forward";
  FakeQuantArgs p = fake_quant_args(op, x, scale, inv_scale, zero_point, bits, channels, inner, drop_threshold, seed);
  c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty_like(x);
  p.out = out.data_ptr();
  check_launch(launch_fake_quant_forward(p, current_stream()), op);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> fake_quant_backward(const Tensor& grad, const Tensor& x, const Tensor& scale,
                                                       const Tensor& inv_scale, const Tensor& zero_point, int64_t bits,
                                                       int64_t channels, int64_t inner, int64_t drop_threshold,
                                                       int64_t seed) {
  const char* op = "dfqkern::cuda_fake_quant_backward";
  FakeQuantArgs p = fake_quant_args(op, x, scale, inv_scale, zero_point, bits, channels, inner, drop_threshold, seed);
  check_cuda(grad, op, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous(), op,
              ": grad must be contiguous with x's shape and dtype");
  c10::cuda::CUDAGuard guard(x.device());
  Tensor gx = at::empty_like(x);
  Tensor ds = at::zeros({channels}, x.options().dtype(at::kFloat));
  Tensor dz = at::zeros({channels}, x.options().dtype(at::kFloat));
  p.grad = grad.data_ptr();
  p.out = gx.data_ptr();
  p.grad_scale = ds.data_ptr<float>();
  p.grad_zp = dz.data_ptr<float>();
  check_launch(launch_fake_quant_backward(p, current_stream()), op);
  return {gx, ds, dz};
}

AdaRoundArgs adaround_args(const char* op, const Tensor& base, const Tensor& v, const Tensor& scale,
                           const Tensor& zero_point, int64_t bits, int64_t channels, int64_t inner, double beta) {
  check_bits(op, bits);
  check_channel_params(op, v, channels, inner, {{&scale, "scale"}}, zero_point);
  check_tensor(base, op, "base", at::kFloat);
  TORCH_CHECK(base.sizes() == v.sizes(), op, ": base and v must have one shape, got ", base.sizes(), " and ", v.sizes());
  AdaRoundArgs p;
  p.base = base.data_ptr<float>();
  p.v = v.data_ptr();
  p.dtype = float_kind(v.scalar_type(), op, "v");
  p.numel = v.numel();
  p.channels = int(channels);
  p.inner = inner;
  p.scale = scale.data_ptr<float>();
  p.zp = zero_point.data_ptr<int32_t>();
  p.bits = int(bits);
  p.beta = float(beta);
  return p;
}

std::tuple<Tensor, Tensor> adaround_forward(const Tensor& base, const Tensor& v, const Tensor& scale,
                                            const Tensor& zero_point, int64_t bits, int64_t channels, int64_t inner,
                                            double beta, bool hard) {
  const char* op = "dfqkern::cuda_adaround_forward";
  AdaRoundArgs p = adaround_args(op, base, v, scale, zero_point, bits, channels, inner, beta);
  c10::cuda::CUDAGuard guard(v.device());
  Tensor w_hat = at::empty_like(v);
  Tensor reg = at::zeros({}, v.options().dtype(at::kFloat));
  p.out = w_hat.data_ptr();
  p.reg = reg.data_ptr<float>();
  p.hard = hard;
  check_launch(launch_adaround_forward(p, current_stream()), op);
  return {w_hat, reg};
}

std::tuple<Tensor, Tensor> adaround_backward(const Tensor& grad, const Tensor& base, const Tensor& v,
                                             const Tensor& scale, const Tensor& zero_point, int64_t bits,
                                             int64_t channels, int64_t inner, double beta, double reg_grad) {
  const char* op = "dfqkern::cuda_adaround_backward";
  AdaRoundArgs p = adaround_args(op, base, v, scale, zero_point, bits, channels, inner, beta);
  check_cuda(grad, op, "grad");
  TORCH_CHECK(grad.sizes() == v.sizes() && grad.scalar_type() == v.scalar_type() && grad.is_contiguous(), op,
              ": grad must be contiguous with v's shape and dtype");
  c10::cuda::CUDAGuard guard(v.device());
  Tensor gv = at::empty_like(v);
  Tensor gs = at::zeros({channels}, v.options().dtype(at::kFloat));
  p.grad = grad.data_ptr();
  p.out = gv.data_ptr();
  p.grad_scale = gs.data_ptr<float>();
  p.reg_grad = float(reg_grad);
  check_launch(launch_adaround_backward(p, current_stream()), op);
  return {gv, gs};
}

// Exact int32 attention matmul on [batch, M, K] x [batch, K, N] codes (dfqkern/kernels/cuda.py flattens the
// leading dims and broadcasts the zero points to [batch, M] / [batch, N] views; any strides are read).
Tensor matmul_int(const Tensor& a, const Tensor& a_zp, const Tensor& b, const Tensor& b_zp) {
  const char* op = "dfqkern::cuda_matmul_int";
  check_cuda(a, op, "a");
  check_cuda(b, op, "b");
  check_cuda(a_zp, op, "a_zp");
  check_cuda(b_zp, op, "b_zp");
  TORCH_CHECK(a.scalar_type() == at::kByte && b.scalar_type() == at::kByte, op, ": a and b must be uint8 codes, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a_zp.scalar_type() == at::kInt && b_zp.scalar_type() == at::kInt, op,
              ": a_zp and b_zp must be int32, got ", a_zp.scalar_type(), " and ", b_zp.scalar_type());
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, op, ": a and b must be [batch, M, K] and [batch, K, N], got ", a.sizes(),
              " and ", b.sizes());
  const int64_t batch = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  TORCH_CHECK(b.size(0) == batch && b.size(1) == K, op, ": b must be [", batch, ", ", K, ", N], got ", b.sizes());
  TORCH_CHECK(a_zp.dim() == 2 && a_zp.size(0) == batch && a_zp.size(1) == M, op, ": a_zp must be [", batch, ", ", M,
              "], got ", a_zp.sizes());
  TORCH_CHECK(b_zp.dim() == 2 && b_zp.size(0) == batch && b_zp.size(1) == N, op, ": b_zp must be [", batch, ", ", N,
              "], got ", b_zp.sizes());
  TORCH_CHECK(b.device() == a.device() && a_zp.device() == a.device() && b_zp.device() == a.device(), op,
              ": a, b, a_zp and b_zp must be on one device");
  // (a - za)(b - zb) of 8-bit codes summed over K stays below 2^31 (contract.MATMUL_MAX_K)
  constexpr int64_t kMaxK = (int64_t{1} << 31) / (255 * 255);
  TORCH_CHECK(K <= kMaxK, op, ": K=", K, " exceeds ", kMaxK, ", the largest K whose int32 result is exact");
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX, op, ": M and N must fit in int32");
  c10::cuda::CUDAGuard guard(a.device());
  Tensor out = at::empty({batch, M, N}, a.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_();  // every sum is empty
  TORCH_CHECK(matmul_int_blocks(batch, int(M), int(N)) <= INT32_MAX, op, ": batch ", batch, " x ", M, " x ", N,
              " needs more thread blocks than one launch takes");
  MatmulIntArgs p;
  p.a = a.data_ptr<uint8_t>();
  p.b = b.data_ptr<uint8_t>();
  p.za = a_zp.data_ptr<int32_t>();
  p.zb = b_zp.data_ptr<int32_t>();
  p.out = out.data_ptr<int32_t>();
  p.batch = batch;
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  p.stride_ab = a.stride(0);
  p.stride_am = a.stride(1);
  p.stride_ak = a.stride(2);
  p.stride_bb = b.stride(0);
  p.stride_bk = b.stride(1);
  p.stride_bn = b.stride(2);
  p.stride_zab = a_zp.stride(0);
  p.stride_zam = a_zp.stride(1);
  p.stride_zbb = b_zp.stride(0);
  p.stride_zbn = b_zp.stride(1);
  p.a_k_fast = a.stride(2) == 1 || a.stride(1) != 1;
  p.b_n_fast = b.stride(2) == 1 || b.stride(1) != 1;
  check_launch(launch_matmul_int(p, current_stream()), op);
  return out;
}

}  // namespace
}  // namespace dfqkern::cuda

// Op names carry a cuda_ prefix: the CPU backend owns the TORCH_LIBRARY(dfqkern) block in ops.cpp.
TORCH_LIBRARY_FRAGMENT(dfqkern, m) {
  m.def("cuda_quantize_rows(Tensor x, Tensor? inv_scale, Tensor? zero_point, int bits, bool per_token, "
        "bool symmetric, int row_bytes, Tensor(a!)? mark_out=None) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_quantize_image(Tensor x, Tensor inv_scale, Tensor zero_point, int bits, bool pack, int c_padded, "
        "Tensor(a!)? mark_out=None) -> Tensor");
  m.def("cuda_packed_gemm(Tensor a, Tensor a_zp, Tensor? a_scale, Tensor w, Tensor w_zero4, Tensor w_sum, "
        "Tensor w_cdelta, bool need_row_sums, Tensor? w_scale, Tensor? bias, int n, int k_chunks, int slot_bits, "
        "int path, ScalarType? out_dtype, Tensor? a_mark=None) -> Tensor");
  m.def("cuda_packed_conv(Tensor x, Tensor a_zp, Tensor? a_scale, Tensor w, Tensor w_zero4, Tensor w_sum, "
        "Tensor w_cdelta, bool need_row_sums, Tensor? w_scale, Tensor? bias, int n, int k_chunks, int slot_bits, "
        "int path, int[] geometry, int c_padded, ScalarType? out_dtype, Tensor? a_mark=None) -> Tensor");
  m.def("cuda_depthwise_conv(Tensor x, Tensor a_zp, Tensor? a_scale, Tensor w, Tensor? w_scale, Tensor? bias, "
        "int[] geometry, ScalarType? out_dtype, Tensor? a_mark=None) -> Tensor");
  m.def("cuda_fake_quant_forward(Tensor x, Tensor scale, Tensor inv_scale, Tensor zero_point, int bits, int channels, "
        "int inner, int drop_threshold, int seed) -> Tensor");
  m.def("cuda_fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor inv_scale, Tensor zero_point, int bits, "
        "int channels, int inner, int drop_threshold, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_adaround_forward(Tensor base, Tensor v, Tensor scale, Tensor zero_point, int bits, int channels, "
        "int inner, float beta, bool hard) -> (Tensor, Tensor)");
  m.def("cuda_adaround_backward(Tensor grad, Tensor base, Tensor v, Tensor scale, Tensor zero_point, int bits, "
        "int channels, int inner, float beta, float reg_grad) -> (Tensor, Tensor)");
  m.def("cuda_matmul_int(Tensor a, Tensor a_zp, Tensor b, Tensor b_zp) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfqkern, CUDA, m) {
  using namespace dfqkern::cuda;
  m.impl("cuda_quantize_rows", &quantize_rows);
  m.impl("cuda_quantize_image", &quantize_image);
  m.impl("cuda_packed_gemm", &packed_gemm);
  m.impl("cuda_packed_conv", &packed_conv);
  m.impl("cuda_depthwise_conv", &depthwise_conv);
  m.impl("cuda_fake_quant_forward", &fake_quant_forward);
  m.impl("cuda_fake_quant_backward", &fake_quant_backward);
  m.impl("cuda_adaround_forward", &adaround_forward);
  m.impl("cuda_adaround_backward", &adaround_backward);
  m.impl("cuda_matmul_int", &matmul_int);
}
