// Direct depthwise convolution (C/groups == 1) on one zero-padded int16 plane of (code - zero_point).
// The same source (depthwise_impl.h) is compiled twice: baseline and AVX2 (auto-vectorized over
// output columns), chosen at run time like the other kernels.
#pragma once

#include <cstdint>

namespace dfqkern::cpu::dw {

struct Plane {
  const int16_t* x;  // padded plane [hp][wp]
  int64_t wp;
  const int16_t* w;  // [kh * kw], code - zero_point
  int64_t kh, kw, sh, sw, dh, dw, oh, ow;
};

// out[oh][ow] = sum_{i,j} w[i][j] * x[oh*sh + i*dh][ow*sw + j*dw]  (int32, exact)
void conv_portable(const Plane& p, int32_t* out);
void conv_avx2(const Plane& p, int32_t* out);

}  // namespace dfqkern::cpu::dw
