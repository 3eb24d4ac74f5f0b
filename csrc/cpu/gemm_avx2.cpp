// AVX2 packed GEMM micro-kernels: MR activation rows x one 4-row weight tile, int32 lanes.
//   2/3/4-bit: vpand / vpsrlw unpack, vpmaddubsw(weight code, a') -> int16 pairs (<= 2*15*128, no
//              saturation), summed in int16 within a chunk, vpmaddwd(., 1) -> int32 accumulators.
//   8-bit:     vpmovzxbw weights, vpmaddwd with int16 activation codes.
#include <algorithm>

#include "gemm.h"

#pragma GCC target("avx2,fma,f16c")
#include "avx2_math.h"

namespace dfqkern::cpu::gemm {
namespace {

using avx2::hsum4_epi32;

inline __m256i ld(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

template <int MR>
inline void store_dots(__m256i (&acc)[MR][kTileRows], int32_t (*dots)[kTileRows]) {
  for (int m = 0; m < MR; ++m)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[m]), hsum4_epi32(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
}

template <int MR>
void tile_w4(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nchunks, int32_t (*dots)[kTileRows]) {
  __m256i acc[MR][kTileRows];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) acc[m][r] = _mm256_setzero_si256();
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 64) {
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m256i wv = ld(w + r * kChunkBytes);
      const __m256i lo = _mm256_and_si256(wv, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, ld(a + m * lda)),
                                           _mm256_maddubs_epi16(hi, ld(a + m * lda + 32)));
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(p, ones));
      }
    }
  }
  store_dots<MR>(acc, dots);
}

template <int MR>
void tile_w2(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nchunks, int32_t (*dots)[kTileRows]) {
  __m256i acc[MR][kTileRows];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) acc[m][r] = _mm256_setzero_si256();
  const __m256i mask = _mm256_set1_epi8(0x03), ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 128) {
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m256i wv = ld(w + r * kChunkBytes);
      const __m256i s0 = _mm256_and_si256(wv, mask);
      const __m256i s1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), mask);
      const __m256i s2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
      const __m256i s3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), mask);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const int8_t* am = a + m * lda;
        const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(s0, ld(am)), _mm256_maddubs_epi16(s1, ld(am + 32)));
        const __m256i p23 =
            _mm256_add_epi16(_mm256_maddubs_epi16(s2, ld(am + 64)), _mm256_maddubs_epi16(s3, ld(am + 96)));
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones));
      }
    }
  }
  store_dots<MR>(acc, dots);
}

template <int MR>
void tile_w8(const int16_t* a, int64_t lda, const uint8_t* w, int64_t nchunks, int32_t (*dots)[kTileRows]) {
  __m256i acc[MR][kTileRows];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) acc[m][r] = _mm256_setzero_si256();
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 32) {
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * kChunkBytes)));
      const __m256i w1 =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * kChunkBytes + 16)));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const int16_t* am = a + m * lda;
        acc[m][r] = _mm256_add_epi32(
            acc[m][r], _mm256_add_epi32(_mm256_madd_epi16(w0, ld(am)), _mm256_madd_epi16(w1, ld(am + 16))));
      }
    }
  }
  store_dots<MR>(acc, dots);
}

template <int MR>
inline void tile(const Args& g, int64_t m, int64_t t, int32_t (*dots)[kTileRows]) {
  const uint8_t* w = g.w + t * g.nchunks * kTileRows * kChunkBytes;
  if (g.wbits == 8)
    tile_w8<MR>(static_cast<const int16_t*>(g.a) + m * g.lda, g.lda, w, g.nchunks, dots);
  else if (g.wbits == 2)
    tile_w2<MR>(static_cast<const int8_t*>(g.a) + m * g.lda, g.lda, w, g.nchunks, dots);
  else
    tile_w4<MR>(static_cast<const int8_t*>(g.a) + m * g.lda, g.lda, w, g.nchunks, dots);
}

constexpr int kMR = 2;  // activation rows per micro-kernel call (MR x 4 int32 accumulators in registers)

}  // namespace

void run_avx2(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  int32_t dots[kMR][kTileRows];
  for (int64_t m = m0; m < m1; m += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
    for (int64_t t = t0; t < t1; ++t) {
      if (mr == 2)
        tile<2>(g, m, t, dots);
      else
        tile<1>(g, m, t, dots);
      finish_tile(g, m, mr, t, dots);
    }
  }
}

void minmax_avx2(const float* x, int64_t n, float& lo, float& hi) {
  int64_t i = 0;
  float l = x[0], h = x[0];
  if (n >= 8) {
    __m256 vl = _mm256_loadu_ps(x), vh = vl;
    for (i = 8; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      vl = _mm256_min_ps(vl, v);
      vh = _mm256_max_ps(vh, v);
    }
    alignas(32) float bl[8], bh[8];
    _mm256_store_ps(bl, vl);
    _mm256_store_ps(bh, vh);
    for (int j = 0; j < 8; ++j) {
      l = std::min(l, bl[j]);
      h = std::max(h, bh[j]);
    }
  }
  for (; i < n; ++i) {
    l = std::min(l, x[i]);
    h = std::max(h, x[i]);
  }
  lo = l;
  hi = h;
}

}  // namespace dfqkern::cpu::gemm
