// Fused AdaRound forward (soft / hard rounding + regularizer) and backward (grad V incl. the
// regularizer term, per-channel grad scale), with in-kernel reductions.
// Twin of dfqkern.kernels.reference.adaround_forward / adaround_backward.
#include <algorithm>

#include "../common/rounding.h"
#include "common.cuh"
#include "launch.h"

namespace dfqkern::cuda {

namespace {

using rounding::kGamma;    // rectified sigmoid constants (csrc/common/rounding.h)
using rounding::kStretch;

__device__ __forceinline__ float sigmoid(float v) { return __frcp_rn(__fadd_rn(1.0f, expf(-v))); }

// torch.pow(x, e) for x >= 0, including pow(0, 0) = 1 (exp2/log2 would give NaN there).
__device__ __forceinline__ float pow_nonneg(float x, float e) {
  if (e == 0.0f) return 1.0f;
  if (x == 0.0f) return e > 0.0f ? 0.0f : INFINITY;
  if (e == 1.0f) return x;
  if (e == 2.0f) return __fmul_rn(x, x);
  return exp2f(e * log2f(x));
}

__device__ __forceinline__ int channel_of(const AdaRoundArgs& p, int64_t i) {
  return p.channels == 1 ? 0 : static_cast<int>((i / p.inner) % p.channels);
}

template <typename T>
__global__ void adaround_forward_kernel(const AdaRoundArgs p) {
  __shared__ float scratch[32];
  const float qmax = float((1 << p.bits) - 1);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  float reg = 0.0f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int c = channel_of(p, i);
    const float vi = to_float(v[i]);
    float h;
    if (p.hard) {
      h = vi >= 0.0f ? 1.0f : 0.0f;
    } else {
      h = fminf(fmaxf(__fadd_rn(__fmul_rn(sigmoid(vi), kStretch), kGamma), 0.0f), 1.0f);
      reg += 1.0f - pow_nonneg(fabsf(2.0f * h - 1.0f), p.beta);
    }
    const float zpf = float(p.zp[c]);
    const float code = fminf(fmaxf(__fadd_rn(__fadd_rn(p.base[i], h), zpf), 0.0f), qmax);
    out[i] = from_float<T>(__fmul_rn(__fsub_rn(code, zpf), p.scale[c]));
  }
  if (!p.hard) {
    reg = block_sum(reg, scratch);
    if (threadIdx.x == 0) atomicAdd(p.reg, reg);
  }
}

// grid (channels, splits), like the fake-quant backward.
template <typename T>
__global__ void adaround_backward_kernel(const AdaRoundArgs p) {
  __shared__ float scratch[32];
  const float qmax = float((1 << p.bits) - 1);
  const int c = blockIdx.x;
  const float s = p.scale[c], zpf = float(p.zp[c]);
  const T* v = static_cast<const T*>(p.v);
  const T* grad = static_cast<const T*>(p.grad);
  T* gv_out = static_cast<T*>(p.out);
  const int64_t per_channel = p.numel / p.channels;
  float gs = 0.0f;
  for (int64_t j = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; j < per_channel; j += int64_t(gridDim.y) * blockDim.x) {
    const int64_t i = channel_element(j, c, p.channels, p.inner);
    const float g = to_float(grad[i]);
    const float sig = sigmoid(to_float(v[i]));
    const float hs = __fadd_rn(__fmul_rn(sig, kStretch), kGamma);
    const float h = fminf(fmaxf(hs, 0.0f), 1.0f);
    const float dh_dv = (hs > 0.0f && hs < 1.0f) ? sig * (1.0f - sig) * kStretch : 0.0f;
    const float t = __fadd_rn(__fadd_rn(p.base[i], h), zpf);
    const bool inside = t >= 0.0f && t <= qmax;
    const float code = fminf(fmaxf(t, 0.0f), qmax);
    const float u = 2.0f * h - 1.0f;
    const float sign_u = u > 0.0f ? 1.0f : (u < 0.0f ? -1.0f : 0.0f);
    const float dreg_dh = -p.beta * pow_nonneg(fabsf(u), p.beta - 1.0f) * sign_u * 2.0f;
    const float gv = (inside ? g * s * dh_dv : 0.0f) + p.reg_grad * dreg_dh * dh_dv;
    gv_out[i] = from_float<T>(gv);
    gs += g * __fsub_rn(code, zpf);
  }
  gs = block_sum(gs, scratch);
  if (threadIdx.x == 0) atomicAdd(p.grad_scale + c, gs);
}

}  // namespace

cudaError_t launch_adaround_forward(const AdaRoundArgs& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((p.numel + threads * 8 - 1) / (threads * 8), 1 << 16)));
  switch (p.dtype) {
    case kOutF16: adaround_forward_kernel<__half><<<blocks, threads, 0, stream>>>(p); break;
    case kOutBF16: adaround_forward_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(p); break;
    default: adaround_forward_kernel<float><<<blocks, threads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_adaround_backward(const AdaRoundArgs& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int threads = 256;
  const dim3 grid = per_channel_grid(p.numel, p.channels, threads);
  switch (p.dtype) {
    case kOutF16: adaround_backward_kernel<__half><<<grid, threads, 0, stream>>>(p); break;
    case kOutBF16: adaround_backward_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(p); break;
    default: adaround_backward_kernel<float><<<grid, threads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace dfqkern::cuda
