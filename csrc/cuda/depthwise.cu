// Depthwise Conv2d (groups == channels) on NHWC byte codes: a direct int32 loop per output, which
// is memory-bound anyway (kh * kw MACs per output); the grouped GEMM tiles would sit idle here.
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace dfqkern::cuda {

namespace {

// One thread per output (n, oh, ow, c), channel fastest so loads and stores coalesce.
__global__ void depthwise_kernel(const DepthwiseArgs p) {
  const int64_t total = int64_t(p.N) * p.OH * p.OW * p.C;
  const int za = p.a_zp[0];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % p.C);
    const int64_t pix = i / p.C;
    const int ow = static_cast<int>(pix % p.OW);
    const int64_t nh = pix / p.OW;
    const int oh = static_cast<int>(nh % p.OH);
    const int n = static_cast<int>(nh / p.OH);
    int acc = 0;
    for (int kh = 0; kh < p.KH; ++kh) {
      const int iy = oh * p.stride_h - p.pad_h + kh * p.dil_h;
      if (iy < 0 || iy >= p.H) continue;  // zero padding of (a - za)
      for (int kw = 0; kw < p.KW; ++kw) {
        const int ix = ow * p.stride_w - p.pad_w + kw * p.dil_w;
        if (ix < 0 || ix >= p.W) continue;
        const int a = p.x[((int64_t(n) * p.H + iy) * p.W + ix) * p.C + c];
        acc += (a - za) * int(p.w[(kh * p.KW + kw) * p.C + c]);
      }
    }
    if (p.a_scale == nullptr)
      static_cast<int32_t*>(p.out)[i] = acc;
    else
    {
      float sa = p.a_scale[0];
      if (p.a_mark != nullptr)  // NaN when the window covers a pixel holding NaN / Inf
        sa = __fadd_rn(sa, window_mark(p.a_mark, n, oh, ow, p.H, p.W, p.KH, p.KW, p.stride_h, p.stride_w, p.pad_h,
                                       p.pad_w, p.dil_h, p.dil_w));
      store_out(p.out, i, dequant_epilogue(acc, sa, p.w_scale[c], p.bias, c), p.out_type);
    }
  }
}

}  // namespace

cudaError_t launch_depthwise(const DepthwiseArgs& p, cudaStream_t stream) {
  const int64_t total = int64_t(p.N) * p.OH * p.OW * p.C;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 1 << 20));
  depthwise_kernel<<<blocks, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dfqkern::cuda
