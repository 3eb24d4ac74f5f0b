// Body of the direct depthwise kernel; included by depthwise_portable.cpp and depthwise_avx2.cpp
// (inside an anonymous namespace, so each copy stays in its own translation unit).
#pragma once

#include "depthwise.h"

namespace {

using dfqkern::cpu::dw::Plane;

inline void conv_body(const Plane& p, int32_t* out) {
  for (int64_t y = 0; y < p.oh; ++y) {
    int32_t* o = out + y * p.ow;
    for (int64_t x = 0; x < p.ow; ++x) o[x] = 0;
    for (int64_t i = 0; i < p.kh; ++i) {
      const int16_t* row = p.x + (y * p.sh + i * p.dh) * p.wp;
      for (int64_t j = 0; j < p.kw; ++j) {
        const int32_t wv = p.w[i * p.kw + j];
        const int16_t* src = row + j * p.dw;
        if (p.sw == 1) {
          for (int64_t x = 0; x < p.ow; ++x) o[x] += wv * src[x];
        } else if (p.sw == 2) {
          for (int64_t x = 0; x < p.ow; ++x) o[x] += wv * src[2 * x];
        } else {
          for (int64_t x = 0; x < p.ow; ++x) o[x] += wv * src[x * p.sw];
        }
      }
    }
  }
}

}  // namespace
