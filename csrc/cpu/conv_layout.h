// The packed conv's activation layout step (see conv.cpp): a block of quantized codes, channel-major
// as the NCHW quantize pass produces them, becomes NHWC kernel elements (code ^ 0x80 = code - 128)
// plus per-pixel, per-group code sums. Portable and AVX2 builds (chosen at run time) give identical
// bytes and sums. Declarations and PODs only (see common.h).
#pragma once

#include <cstdint>

namespace dfqkern::cpu::cl {

struct NhwcBlock {
  const uint8_t* codes;  // codes[c * ld + i]: channel c, pixel i of the block
  int64_t ld;            // >= n rounded up to 16 (the AVX2 kernel reads whole 16-pixel rows)
  int64_t c, n;          // channels, pixels
  int64_t groups;        // pixsum has one value per pixel and group (C / groups channels each)
  int8_t* dst;           // dst[i * cs + c] = codes[c * ld + i] ^ 0x80; bytes [c, cs) of a pixel may be
                         // overwritten (the caller fills them after)
  int64_t cs;            // pixel stride of dst (>= c)
  int32_t* pixsum;       // pixsum[i * groups + g] = sum of pixel i's codes over group g (assigned)
};

void to_nhwc_portable(const NhwcBlock& b);
void to_nhwc_avx2(const NhwcBlock& b);

// Pixel-major codes (a chained conv's requantized NHWC input, see conv2d_chain) -> the same kernel elements
// and sums as to_nhwc.
struct PixelRows {
  const uint8_t* codes;  // codes[i * c + j]: pixel i, channel j
  int64_t c, n;          // channels, pixels
  int64_t groups;        // pixsum has one value per pixel and group (C / groups channels each)
  uint8_t lo;            // codes below lo count as lo: a ReLU before the quantizer, q(relu(v)) = max(q(v), q(0))
  int8_t* dst;           // dst[i * cs + j] = max(code, lo) ^ 0x80; bytes [c, cs) of a pixel = -128 (code 0)
  int64_t cs;            // pixel stride of dst (>= c)
  int32_t* pixsum;       // pixsum[i * groups + g] = sum of pixel i's codes (raised to lo) over group g
};

void pixel_rows_portable(const PixelRows& b);
void pixel_rows_avx2(const PixelRows& b);

}  // namespace dfqkern::cpu::cl
