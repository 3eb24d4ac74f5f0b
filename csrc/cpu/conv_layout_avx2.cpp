// AVX2 build of the conv layout step (conv_layout.h): 16 channels x 16 pixels of codes are transposed
// in registers (four rounds of byte / word / dword / qword unpacks) and stored as 16-byte pixel rows;
// pixel sums are vertical adds of the channel rows (16 pixels per register, int16 lanes).
#include <algorithm>
#include <cstring>

#include "conv_layout.h"

#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

namespace dfqkern::cpu::cl {
namespace {

// r[k] = 16 pixels of channel k  ->  r[p] = 16 channels of pixel p.
inline void transpose16(__m128i r[16]) {
  __m128i a[16], b[16], d[16];
  for (int k = 0; k < 8; ++k) {  // a[8h + k]: pixels 8h..8h+7, channels 2k, 2k+1
    a[k] = _mm_unpacklo_epi8(r[2 * k], r[2 * k + 1]);
    a[8 + k] = _mm_unpackhi_epi8(r[2 * k], r[2 * k + 1]);
  }
  for (int h = 0; h < 2; ++h)  // b[4q + k]: pixels 4q..4q+3, channels 4k..4k+3
    for (int k = 0; k < 4; ++k) {
      b[4 * (2 * h) + k] = _mm_unpacklo_epi16(a[8 * h + 2 * k], a[8 * h + 2 * k + 1]);
      b[4 * (2 * h + 1) + k] = _mm_unpackhi_epi16(a[8 * h + 2 * k], a[8 * h + 2 * k + 1]);
    }
  for (int q = 0; q < 4; ++q)  // d[2 pp + k]: pixels 2pp, 2pp+1, channels 8k..8k+7
    for (int k = 0; k < 2; ++k) {
      d[2 * (2 * q) + k] = _mm_unpacklo_epi32(b[4 * q + 2 * k], b[4 * q + 2 * k + 1]);
      d[2 * (2 * q + 1) + k] = _mm_unpackhi_epi32(b[4 * q + 2 * k], b[4 * q + 2 * k + 1]);
    }
  for (int pp = 0; pp < 8; ++pp) {
    r[2 * pp] = _mm_unpacklo_epi64(d[2 * pp], d[2 * pp + 1]);
    r[2 * pp + 1] = _mm_unpackhi_epi64(d[2 * pp], d[2 * pp + 1]);
  }
}

// Channels [c0, c0 + cn) (cn <= 16) of pixels [i0, i0 + np) into dst. A pixel's 16-byte store may run
// past its cn channels into bytes that a later store of this call rewrites (the caller's order: for
// each 16 pixels the partial channel block first, then the whole ones; pixels ascending); stores that
// would pass the end of the call's pixels (`limit`) write exactly cn bytes.
inline void store_block(const NhwcBlock& b, int64_t i0, int64_t np, int64_t c0, int64_t cn, int64_t limit) {
  __m128i v[16];
  for (int k = 0; k < 16; ++k)
    v[k] = k < cn ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.codes + (c0 + k) * b.ld + i0))
                  : _mm_setzero_si128();
  transpose16(v);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t p = 0; p < np; ++p) {
    const int64_t off = (i0 + p) * b.cs + c0;
    const __m128i e = _mm_xor_si128(v[p], flip);
    if (off + 16 <= limit) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(b.dst + off), e);
    } else {
      alignas(16) int8_t t[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), e);
      std::memcpy(b.dst + off, t, static_cast<size_t>(cn));
    }
  }
}

// out[p] = sum over channels [c0, c1) of pixel i0 + p's codes, p < 16. int16 lanes hold up to 257
// codes of 255; flushed into int32 every 256 channels.
inline void sums16(const NhwcBlock& b, int64_t i0, int64_t c0, int64_t c1, int32_t* out) {
  __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
  for (int64_t cb = c0; cb < c1; cb += 256) {
    const int64_t ce = std::min(c1, cb + 256);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t c = cb; c < ce; ++c)
      acc = _mm256_add_epi16(acc, _mm256_cvtepu8_epi16(
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.codes + c * b.ld + i0))));
    lo = _mm256_add_epi32(lo, _mm256_cvtepu16_epi32(_mm256_castsi256_si128(acc)));
    hi = _mm256_add_epi32(hi, _mm256_cvtepu16_epi32(_mm256_extracti128_si256(acc, 1)));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), hi);
}

}  // namespace

void to_nhwc_avx2(const NhwcBlock& b) {
  const int64_t whole = b.c / 16 * 16, rest = b.c - whole, limit = b.n * b.cs, cg = b.c / b.groups;
  alignas(32) int32_t s[16];
  for (int64_t i0 = 0; i0 < b.n; i0 += 16) {
    const int64_t np = std::min<int64_t>(16, b.n - i0);
    if (rest) store_block(b, i0, np, whole, rest, limit);
    for (int64_t c0 = 0; c0 < whole; c0 += 16) store_block(b, i0, np, c0, 16, limit);
    for (int64_t g = 0; g < b.groups; ++g) {
      sums16(b, i0, g * cg, (g + 1) * cg, s);
      int32_t* ps = b.pixsum + i0 * b.groups + g;
      for (int64_t p = 0; p < np; ++p) ps[p * b.groups] = s[p];
    }
  }
}

// 16 channels at a time (group widths that are multiples of 16; others take the portable loop): max with lo,
// xor 0x80, and the code sum by vpsadbw against zero.
void pixel_rows_avx2(const PixelRows& b) {
  const int64_t cg = b.c / b.groups;
  if (cg % 16 != 0) return pixel_rows_portable(b);
  const __m128i lo = _mm_set1_epi8(static_cast<char>(b.lo)), flip = _mm_set1_epi8(static_cast<char>(0x80));
  const __m128i zero = _mm_setzero_si128();
  for (int64_t i = 0; i < b.n; ++i) {
    const uint8_t* codes = b.codes + i * b.c;
    int8_t* dst = b.dst + i * b.cs;
    for (int64_t g = 0; g < b.groups; ++g) {
      __m128i acc = zero;
      for (int64_t j = g * cg; j < (g + 1) * cg; j += 16) {
        const __m128i q = _mm_max_epu8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j)), lo);
        acc = _mm_add_epi64(acc, _mm_sad_epu8(q, zero));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm_xor_si128(q, flip));
      }
      b.pixsum[i * b.groups + g] = static_cast<int32_t>(_mm_cvtsi128_si64(acc) + _mm_extract_epi64(acc, 1));
    }
    for (int64_t j = b.c; j < b.cs; ++j) dst[j] = int8_t(-128);
  }
}

}  // namespace dfqkern::cpu::cl
