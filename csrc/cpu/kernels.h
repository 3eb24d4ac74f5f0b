// The CPU backend's C++ API, called by csrc/ops.cpp after its argument checks.
// Functions here assume checked arguments (CPU tensors, float inputs, parameter sizes that match);
// they make inputs contiguous / fp32 where a kernel needs it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace dfqkern::cpu {

// --------------------------------------------------------------------------- elementwise (elementwise.cpp)
at::Tensor quantize(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t bits,
                    std::optional<int64_t> axis);
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero_point,
                      std::optional<int64_t> axis);
at::Tensor fake_quant_forward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t bits,
                              std::optional<int64_t> axis, double drop_prob, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& scale,
                                                                   const at::Tensor& zero_point, int64_t bits,
                                                                   std::optional<int64_t> axis, double grad_scale,
                                                                   double drop_prob, int64_t seed);
std::tuple<at::Tensor, at::Tensor> adaround_forward(const at::Tensor& base, const at::Tensor& v,
                                                    const at::Tensor& scale, const at::Tensor& zero_point,
                                                    int64_t bits, std::optional<int64_t> axis, double beta, bool hard);
std::tuple<at::Tensor, at::Tensor> adaround_backward(const at::Tensor& grad, const at::Tensor& base,
                                                     const at::Tensor& v, const at::Tensor& scale,
                                                     const at::Tensor& zero_point, int64_t bits,
                                                     std::optional<int64_t> axis, double beta, double reg_grad);

// --------------------------------------------------------------------------- packed GEMM (gemm.cpp)
// Weight layout "cpu-tile-v1" (derived from kpack-lsb-v1 by prepack_weight; see gemm.h).
// Returns (tiles uint8 [groups * tiles_per_group * nchunks * 4 * 32], corr int32 [groups * tiles_per_group, 3, 4]).
std::tuple<at::Tensor, at::Tensor> prepack_weight(const at::Tensor& data, const at::Tensor& zero_point, int64_t bits,
                                                  int64_t k, int64_t groups);
// Weight layout "cpu-panel-v1" for M > 1 (see gemm.h): (panels uint8 [groups * panels_per_group * blocks * 64],
// corr int32 [groups * panels_per_group, 3, 16]). linear / linear_int / conv2d* accept either layout.
std::tuple<at::Tensor, at::Tensor> prepack_panels(const at::Tensor& data, const at::Tensor& zero_point, int64_t bits,
                                                  int64_t k, int64_t groups);
// Quantize float [M, K] activations and pack them (kpack-lsb-v1): (data, scale [1]|[M], zero_point [1]|[M]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activation(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& scale,
                                                                   const std::optional<at::Tensor>& zero_point,
                                                                   int64_t bits, bool per_token, bool symmetric);
// Exact int32 (a - a_zp) @ (w - w_zp)^T from packed activations [M, packed K] and a prepacked weight.
at::Tensor linear_int(const at::Tensor& a_data, const at::Tensor& a_zero_point, int64_t a_bits, int64_t k,
                      const at::Tensor& w_tiles, const at::Tensor& w_corr, int64_t w_bits, int64_t n);
// Packed Linear with activations quantized on the fly; fp32 output [*x.shape[:-1], N] (1-D x: [N]).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w_tiles, const at::Tensor& w_corr, const at::Tensor& w_scale,
                  int64_t w_bits, int64_t n, int64_t k, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& a_zero_point,
                  int64_t a_bits, bool per_token, bool symmetric);

// --------------------------------------------------------------------------- matmul (matmul.cpp)
// Exact int32 batched (a - a_zp) @ (b - b_zp) of uint8 code tensors a [..., M, K], b [..., K, N] (any
// strides); a_zp broadcastable to [..., M, 1], b_zp to [..., 1, N] (integer dtypes). Wrapping int32
// arithmetic: exact whenever the true result fits in int32 (contract.MATMUL_MAX_K for 8-bit codes).
at::Tensor matmul_int(const at::Tensor& a, const at::Tensor& a_zero_point, const at::Tensor& b,
                      const at::Tensor& b_zero_point);

// --------------------------------------------------------------------------- attention (attention.cpp)
// Packed attention core on a fused projection's fp32 output qkv [B, N, 3 * heads * d] (q unscaled): q * q_mult,
// k and v quantized with scale / zero_point ([3] per tensor or [3 * heads] per head, q k v order), softmax of
// the int32 q.k^T * (qs * ks), two-range softmax codes (steps fine / coarse, top code levels) against v, fp32
// [B, N, heads * d]. The same values as dfqkern.kernels.reference.attention_qkv, bit for bit.
at::Tensor attention_qkv(const at::Tensor& qkv, int64_t heads, double q_mult, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t bits, double fine, double coarse, int64_t levels);

// --------------------------------------------------------------------------- conv2d (conv.cpp)
// Depthwise-style weights (C/groups == 1): int16 [O, kh*kw] holding code - zero_point.
at::Tensor prepack_depthwise(const at::Tensor& data, const at::Tensor& zero_point, int64_t bits, int64_t k);
struct ConvGeom {
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
  int64_t out_ch, in_per_group, kh, kw;  // weight [out_ch, in_per_group, kh, kw]
  // Output height / width on an h x w input (< 1 where the dilated kernel does not fit the padded input).
  int64_t out_h(int64_t h) const { return (h + 2 * pad_h - dil_h * (kh - 1) - 1) / stride_h + 1; }
  int64_t out_w(int64_t w) const { return (w + 2 * pad_w - dil_w * (kw - 1) - 1) / stride_w + 1; }
};
// Exact int32 NCHW convolution of (x_codes - x_zp) with the prepacked weight (zero padding).
at::Tensor conv2d_int(const at::Tensor& x_codes, int64_t x_zero_point, const at::Tensor& w_prepacked,
                      const at::Tensor& w_corr, int64_t w_bits, const ConvGeom& g);
// What follows a frozen conv in the model: relu(y + residual), each optional. Fused into the GEMM / depthwise
// work items where the residual is fp32 with the output's sizes and strides (the same fp32 add as torch's; the
// ReLU keeps NaN as torch.relu), else ATen's add and relu as the model wrote them.
struct ConvOutputOps {
  const at::Tensor* residual = nullptr;
  bool relu = false;
};
// Packed Conv2d on float NCHW input with static per-tensor activation quantization; fp32 NCHW output, or
// channels-last (NHWC in memory, the same values) with channels_last_out where the conv takes the GEMM path
// (C / groups > 1). An fp32 channels-last x is read in place by the GEMM path (no transpose).
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& w_prepacked, const at::Tensor& w_corr,
                  const at::Tensor& w_scale, int64_t w_bits, const ConvGeom& g, const std::optional<at::Tensor>& bias,
                  double a_scale, int64_t a_zero_point, int64_t a_bits, bool channels_last_out = false,
                  const ConvOutputOps& ops = {});
// A packed conv's bound arguments (conv2d's, after x).
struct ConvLayer {
  const at::Tensor& w;  // prepacked
  const at::Tensor& w_corr;
  const at::Tensor& w_scale;
  int64_t w_bits;
  ConvGeom g;
  const std::optional<at::Tensor>& bias;
  double a_scale;
  int64_t a_zero_point, a_bits;
};
// Two packed convs in a row, x -> first -> [ReLU] -> second (dfqkern.compile mode "frozen"): the first writes
// its fp32 output NHWC and the second's quantize pass reads it there (no NCHW round trip, no transpose, no
// separate ReLU pass). Bit for bit conv2d(relu(conv2d(x, first)), second). Both convs must take the GEMM path
// (input channels per group > 1); x float32 (NCHW or channels-last, as conv2d), fp32 output NCHW or, with
// channels_last_out, channels-last.
at::Tensor conv2d_chain(const at::Tensor& x, const ConvLayer& first, bool relu, const ConvLayer& second,
                        bool channels_last_out = false, const ConvOutputOps& ops = {});

}  // namespace dfqkern::cpu
