// Baseline build of the direct depthwise kernel.
#include "depthwise_impl.h"

namespace dfqkern::cpu::dw {
void conv_portable(const Plane& p, int32_t* out) { conv_body(p, out); }
}  // namespace dfqkern::cpu::dw
