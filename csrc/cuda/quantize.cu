// Fused activation quantize(+pack) kernels: dense rows (Linear, per-tensor or per-token) and
// NCHW images -> NHWC codes for the implicit-GEMM / depthwise convs.
// Codes are bit-identical to dfqkern.kernels.reference.quantize / token_qparams: every float
// operation is an explicitly rounded IEEE op (the build enables --use_fast_math).
#include <algorithm>
#include <cmath>

#include "../common/rounding.h"
#include "common.cuh"
#include "launch.h"

namespace dfqkern::cuda {

namespace {

using rounding::kScaleEps;

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per row: (per-token: min/max -> scale, zero point) then quantize + pack the row.
template <typename T, int BITS>
__global__ void quantize_rows_kernel(const QuantRowsArgs p) {
  constexpr int kQmax = (1 << BITS) - 1;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= p.M) return;
  const T* x = static_cast<const T*>(p.x) + int64_t(row) * p.ldx;

  float inv;
  int zp;
  bool bad = false;  // this lane saw a NaN / Inf
  if (p.per_token) {  // reference.token_qparams -> qparams_from_range
    float lo = INFINITY, hi = -INFINITY;
    for (int k = lane; k < p.K; k += 32) {
      const float v = to_float(x[k]);
      if (nonfinite(v)) {
        bad = true;
        continue;
      }
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    bad = __any_sync(0xffffffffu, bad);
    lo = fminf(warp_min(lo), 0.0f);
    hi = fmaxf(warp_max(hi), 0.0f);
    float scale;
    if (p.symmetric) {
      scale = fmaxf(__fdiv_rn(fmaxf(-lo, hi), float((1 << (BITS - 1)) - 1)), kScaleEps);
      zp = 1 << (BITS - 1);
    } else {
      scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), float(kQmax)), kScaleEps);
      zp = static_cast<int>(fminf(fmaxf(rintf(__fdiv_rn(-lo, scale)), 0.0f), float(kQmax)));
    }
    inv = __frcp_rn(scale);  // == torch's 1.0 / scale (reciprocal, correctly rounded)
    if (bad) {  // a row holding NaN / Inf: scale NaN, zero point 0 (2^(b-1) symmetric), codes 0
      scale = quiet_nan();
      inv = quiet_nan();  // quant_code: fmaxf(NaN, 0) = 0
      zp = p.symmetric ? (1 << (BITS - 1)) : 0;
    }
    if (lane == 0) {
      p.out_scale[row] = scale;
      p.out_zp[row] = zp;
    }
  } else {
    inv = p.inv_scale[0];
    zp = p.zp[0];
  }
  const float zpf = float(zp);

  uint8_t* out = p.out + int64_t(row) * p.out_bytes;
  const int64_t kb = BITS == 8 ? p.K : (p.K + 1) / 2;  // kpack-lsb-v1 bytes; zeros after
  for (int64_t j = lane; j < p.out_bytes; j += 32) {
    uint32_t byte = 0;
    if (j < kb) {
      if constexpr (BITS == 8) {
        byte = static_cast<uint32_t>(quant_code(to_float(x[j]), inv, zpf, float(kQmax)));
      } else {
        const uint32_t lo = static_cast<uint32_t>(quant_code(to_float(x[2 * j]), inv, zpf, float(kQmax)));
        const uint32_t hi = 2 * j + 1 < p.K
                                ? static_cast<uint32_t>(quant_code(to_float(x[2 * j + 1]), inv, zpf, float(kQmax)))
                                : static_cast<uint32_t>(zp);  // padded slot holds the zero point
        byte = lo | (hi << 4);
      }
      if (p.out_mark != nullptr && !p.per_token) {
        bad |= nonfinite(to_float(x[BITS == 8 ? j : 2 * j]));
        if (BITS != 8 && 2 * j + 1 < p.K) bad |= nonfinite(to_float(x[2 * j + 1]));
      }
    }
    out[j] = static_cast<uint8_t>(byte);
  }
  if (p.out_mark != nullptr) {
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) p.out_mark[row] = bad ? quiet_nan() : 0.0f;
  }
}

// One thread per output byte of the NHWC image [N, H, W, bytes_per_pixel].
template <typename T>
__global__ void quantize_image_kernel(const QuantImageArgs p) {
  const float qmax = float((1 << p.bits) - 1);
  const float inv = p.inv_scale[0];
  const int zp = p.zp[0];
  const float zpf = float(zp);
  const int pb = p.pack ? p.c_padded / 2 : p.c_padded;
  const int64_t total = int64_t(p.N) * p.H * p.W * pb;
  const T* x = static_cast<const T*>(p.x);
  auto code = [&](int64_t base, int c) -> uint32_t {
    return c < p.C ? static_cast<uint32_t>(quant_code(to_float(x[base + c * p.stride_c]), inv, zpf, qmax))
                   : static_cast<uint32_t>(zp);
  };
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pix = i / pb;
    const int j = static_cast<int>(i - pix * pb);
    const int w = static_cast<int>(pix % p.W);
    const int64_t nh = pix / p.W;
    const int h = static_cast<int>(nh % p.H);
    const int n = static_cast<int>(nh / p.H);
    const int64_t base = n * p.stride_n + h * p.stride_h + w * p.stride_w;
    const uint32_t byte = p.pack ? (code(base, 2 * j) | (code(base, 2 * j + 1) << 4)) : code(base, j);
    p.out[i] = static_cast<uint8_t>(byte);
    if (p.out_mark != nullptr) {  // the pixel's mark (zero-filled by the caller) becomes NaN on a NaN / Inf
      const int c0 = p.pack ? 2 * j : j, c1 = p.pack ? 2 * j + 1 : j;
      const bool bad = (c0 < p.C && nonfinite(to_float(x[base + c0 * p.stride_c]))) ||
                       (c1 < p.C && nonfinite(to_float(x[base + c1 * p.stride_c])));
      if (bad) p.out_mark[pix] = quiet_nan();
    }
  }
}

template <typename T>
void launch_rows_typed(const QuantRowsArgs& p, int blocks, int threads, cudaStream_t stream) {
  if (p.bits == 8)
    quantize_rows_kernel<T, 8><<<blocks, threads, 0, stream>>>(p);
  else
    quantize_rows_kernel<T, 4><<<blocks, threads, 0, stream>>>(p);
}

int grid_for(int64_t total, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 1 << 20)));
}

}  // namespace

cudaError_t launch_quantize_rows(const QuantRowsArgs& p, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  const int threads = 256, rows_per_block = threads / 32;
  const int blocks = (p.M + rows_per_block - 1) / rows_per_block;
  switch (p.dtype) {
    case kOutF16: launch_rows_typed<__half>(p, blocks, threads, stream); break;
    case kOutBF16: launch_rows_typed<__nv_bfloat16>(p, blocks, threads, stream); break;
    default: launch_rows_typed<float>(p, blocks, threads, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_quantize_image(const QuantImageArgs& p, cudaStream_t stream) {
  const int64_t total = int64_t(p.N) * p.H * p.W * (p.pack ? p.c_padded / 2 : p.c_padded);
  if (total == 0) return cudaSuccess;
  const int threads = 256, blocks = grid_for(total, threads);
  switch (p.dtype) {
    case kOutF16: quantize_image_kernel<__half><<<blocks, threads, 0, stream>>>(p); break;
    case kOutBF16: quantize_image_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(p); break;
    default: quantize_image_kernel<float><<<blocks, threads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace dfqkern::cuda
