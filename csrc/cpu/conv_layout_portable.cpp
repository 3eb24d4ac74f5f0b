// Portable NCHW codes block -> NHWC kernel elements + pixel sums (the reference for the AVX2 build).
#include "conv_layout.h"

namespace dfqkern::cpu::cl {

void to_nhwc_portable(const NhwcBlock& b) {
  const int64_t cg = b.c / b.groups;
  for (int64_t i = 0; i < b.n * b.groups; ++i) b.pixsum[i] = 0;
  for (int64_t c = 0; c < b.c; ++c) {
    const uint8_t* codes = b.codes + c * b.ld;
    int8_t* dst = b.dst + c;
    int32_t* ps = b.pixsum + c / cg;
    for (int64_t i = 0; i < b.n; ++i) dst[i * b.cs] = static_cast<int8_t>(codes[i] ^ 0x80);
    for (int64_t i = 0; i < b.n; ++i) ps[i * b.groups] += codes[i];
  }
}

void pixel_rows_portable(const PixelRows& b) {
  const int64_t cg = b.c / b.groups;
  for (int64_t i = 0; i < b.n; ++i) {
    const uint8_t* codes = b.codes + i * b.c;
    int8_t* dst = b.dst + i * b.cs;
    for (int64_t g = 0; g < b.groups; ++g) {
      int32_t sum = 0;
      for (int64_t j = g * cg; j < (g + 1) * cg; ++j) {
        const uint8_t q = codes[j] < b.lo ? b.lo : codes[j];
        dst[j] = static_cast<int8_t>(q ^ 0x80);
        sum += q;
      }
      b.pixsum[i * b.groups + g] = sum;
    }
    for (int64_t j = b.c; j < b.cs; ++j) dst[j] = int8_t(-128);
  }
}

}  // namespace dfqkern::cpu::cl
