// AVX2 build of the direct depthwise kernel (the compiler vectorizes the column loops).
#include <cstdint>

#include "depthwise.h"

#pragma GCC target("avx2,fma,f16c")
#include "depthwise_impl.h"

namespace dfqkern::cpu::dw {
void conv_avx2(const Plane& p, int32_t* out) { conv_body(p, out); }
}  // namespace dfqkern::cpu::dw
