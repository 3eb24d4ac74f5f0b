// Fused fake-quant forward / backward (LSQ gradients, optional QDrop) with in-kernel reductions.
// Twin of dfqkern.kernels.reference.fake_quant_forward / fake_quant_backward.
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace dfqkern::cuda {

namespace {

__device__ __forceinline__ bool dropped(const FakeQuantArgs& p, int64_t i) {
  return p.drop_threshold != 0 && uint64_t(hash32(uint64_t(i), p.seed_mul)) < p.drop_threshold;
}

__device__ __forceinline__ int channel_of(const FakeQuantArgs& p, int64_t i) {
  return p.channels == 1 ? 0 : static_cast<int>((i / p.inner) % p.channels);
}

template <typename T>
__global__ void fake_quant_forward_kernel(const FakeQuantArgs p) {
  const float qmax = float((1 << p.bits) - 1);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.numel; i += int64_t(gridDim.x) * blockDim.x) {
    const T xi = x[i];
    if (dropped(p, i)) {  // QDrop: this element keeps its float value
      out[i] = xi;
      continue;
    }
    const float xf = to_float(xi);
    if (nonfinite(xf)) {  // NaN / +-Inf propagate as NaN (reference.fake_quant_forward)
      out[i] = from_float<T>(quiet_nan());
      continue;
    }
    const int c = channel_of(p, i);
    const float zpf = float(p.zp[c]);
    const float q = quant_code(xf, p.inv_scale[c], zpf, qmax);
    out[i] = from_float<T>(__fmul_rn(__fsub_rn(q, zpf), p.scale[c]));
  }
}

// grid (channels, splits): each block reduces part of one channel's LSQ scale / zero-point gradient.
template <typename T>
__global__ void fake_quant_backward_kernel(const FakeQuantArgs p) {
  __shared__ float scratch[32];
  const float qmax = float((1 << p.bits) - 1);
  const int c = blockIdx.x;
  const float s = p.scale[c], inv = p.inv_scale[c], zpf = float(p.zp[c]);
  const T* x = static_cast<const T*>(p.x);
  const T* grad = static_cast<const T*>(p.grad);
  T* gx = static_cast<T*>(p.out);
  const int64_t per_channel = p.numel / p.channels;
  float ds = 0.0f, dz = 0.0f;
  for (int64_t j = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; j < per_channel; j += int64_t(gridDim.y) * blockDim.x) {
    const int64_t i = channel_element(j, c, p.channels, p.inner);
    const float g = to_float(grad[i]);
    const float xs = __fmul_rn(to_float(x[i]), inv);
    const float r = rintf(xs);
    const float t = __fadd_rn(r, zpf);
    const bool below = t < 0.0f, above = t > qmax, inside = !(below || above);
    const bool kept = !dropped(p, i);
    gx[i] = from_float<T>(kept ? (inside ? g : 0.0f) : g);  // straight-through inside the clip range
    if (kept) {
      ds += g * (inside ? __fsub_rn(r, xs) : (below ? -zpf : qmax - zpf));
      dz += inside ? 0.0f : g * -s;
    }
  }
  ds = block_sum(ds, scratch);
  dz = block_sum(dz, scratch);
  if (threadIdx.x == 0) {
    atomicAdd(p.grad_scale + c, ds);
    atomicAdd(p.grad_zp + c, dz);
  }
}

int elementwise_blocks(int64_t n, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 1 << 20)));
}

}  // namespace

cudaError_t launch_fake_quant_forward(const FakeQuantArgs& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int threads = 256, blocks = elementwise_blocks(p.numel, threads);
  switch (p.dtype) {
    case kOutF16: fake_quant_forward_kernel<__half><<<blocks, threads, 0, stream>>>(p); break;
    case kOutBF16: fake_quant_forward_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(p); break;
    default: fake_quant_forward_kernel<float><<<blocks, threads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_fake_quant_backward(const FakeQuantArgs& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int threads = 256;
  const dim3 grid = per_channel_grid(p.numel, p.channels, threads);
  switch (p.dtype) {
    case kOutF16: fake_quant_backward_kernel<__half><<<grid, threads, 0, stream>>>(p); break;
    case kOutBF16: fake_quant_backward_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(p); break;
    default: fake_quant_backward_kernel<float><<<grid, threads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace dfqkern::cuda
