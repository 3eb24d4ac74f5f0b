// Elementwise kernels (quantize, fused fake-quant, fused AdaRound) over one contiguous fp32 run
// that shares one set of quantization parameters (one channel, or the whole tensor).
// Drivers (elementwise.cpp) split tensors into such runs, convert fp16/bf16 chunks to fp32, run
// the chosen ISA's kernel and combine the per-run partial sums in a fixed order, so reductions
// are deterministic whatever the thread count.
//
// Semantics follow dfqkern/kernels/reference.py exactly, element by element:
//   r = round_half_even(x * inv_scale)    (fp32 multiply; inv_scale = 1/scale in fp32, by the caller)
//   t = r + zero_point                     (zero point as fp32, added after rounding)
//   code = trunc(clamp(t, 0, qmax)),  dequant = (code - zero_point) * scale
#pragma once

#include <cstdint>

namespace dfqkern::cpu::ew {

// QDrop: an element keeps its float value when hash32(flat_index, seed) < threshold.
struct Drop {
  uint32_t seed_mix = 0;  // (seed * 0x9E3779B9) mod 2^32
  uint64_t threshold = 0; // round(drop_prob * 2^32) in [0, 2^32]; 0 = QDrop off
};

struct FqParams {
  float inv, scale, zp, qmax;
  Drop drop;
};

struct ArParams {
  float scale, zp, qmax;
  float beta;     // regularizer exponent
  float beta_m1;  // (float)(beta - 1), rounded from double as torch does
  float reg_grad;
  bool hard;
};

// Two-range softmax codes (dfqkern.nn.attention.SoftmaxQuantizer.codes): lo = round_half_even(p * inv_fine),
// fine = lo where lo <= levels (clamped at 0), else coarse = clamp(round_half_even(p * inv_coarse), 0, levels);
// the other code 0; NaN gives 0 and 0. inv_* are 1/step in fp32, by the caller; levels as a float.
struct SoftmaxCodeParams {
  float inv_fine, inv_coarse, levels;
};

// Per-run partial sums (double so long runs stay accurate).
struct Sums2 {
  double a = 0, b = 0;
};

// quantize_* returns true when x held a NaN or an Inf (NaN gets code 0, +-Inf saturate); callers
// use it to propagate non-finite inputs (see dfqkern/kernels/reference.py). fq_forward_* writes NaN
// for non-finite inputs (dropped elements keep x).
#define DFQ_EW_DECLARE(isa)                                                                                   \
  bool quantize_##isa(const float* x, uint8_t* q, int64_t n, const FqParams& p);                            \
  void fq_forward_##isa(const float* x, float* y, int64_t n, const FqParams& p, uint64_t idx0);             \
  /* sums.a += sum of d(out)/d(scale) terms, sums.b += sum of d(out)/d(zero_point) terms */                 \
  void fq_backward_##isa(const float* g, const float* x, float* gx, int64_t n, const FqParams& p,            \
                         uint64_t idx0, Sums2& sums);                                                         \
  /* reg += sum(1 - |2h - 1|^beta) unless hard */                                                             \
  void ar_forward_##isa(const float* base, const float* v, float* w, int64_t n, const ArParams& p,          \
                        double& reg);                                                                         \
  /* gs += sum(g * (c - zp)) */                                                                               \
  void ar_backward_##isa(const float* g, const float* base, const float* v, float* gv, int64_t n,            \
                         const ArParams& p, double& gs);                                                     \
  /* fine / coarse codes of n probabilities; true when p held a NaN */                                       \
  bool softmax_codes_##isa(const float* p, uint8_t* fine, uint8_t* coarse, int64_t n,                        \
                           const SoftmaxCodeParams& s);

DFQ_EW_DECLARE(portable)
DFQ_EW_DECLARE(avx2)
#undef DFQ_EW_DECLARE

// The avx512vnni level's AdaRound and quantize kernels (elementwise_vnni.cpp, x86 only); its other
// elementwise kernels are the AVX2 ones.
bool quantize_vnni(const float* x, uint8_t* q, int64_t n, const FqParams& p);
void ar_forward_vnni(const float* base, const float* v, float* w, int64_t n, const ArParams& p, double& reg);
void ar_backward_vnni(const float* g, const float* base, const float* v, float* gv, int64_t n, const ArParams& p,
                      double& gs);

// quantize_* of the active ISA (every caller takes it from here).
using QuantizeFn = bool (*)(const float* x, uint8_t* q, int64_t n, const FqParams& p);
QuantizeFn quantize_kernel();

}  // namespace dfqkern::cpu::ew
