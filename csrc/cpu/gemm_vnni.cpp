// AVX512-VNNI packed GEMM micro-kernels (EVEX vpdpbusd on 256-bit registers, so the cpu-tile-v1
// layout and the AVX2 unpacking carry over): acc_int32 += sum of 4 (unsigned weight code x signed a').
// No int16 intermediate, hence no saturation bound and no flushes; 8-bit codes need no unpacking.
// Used when the CPU has AVX512F/BW/VL + AVX512_VNNI; everything else stays on the AVX2 kernels.
#include <algorithm>

#include "gemm.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include "avx2_math.h"

namespace dfqkern::cpu::gemm {
namespace {

using avx2::hsum4_epi32;

inline __m256i ld(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// SLOT_BITS = 2 / 4: kSlots 32-k slots per 32-byte chunk row; 8: whole bytes, one slot.
template <int MR, int SLOT_BITS>
void tile(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nchunks, int32_t (*dots)[kTileRows]) {
  constexpr int kSlots = 8 / SLOT_BITS;
  __m256i acc[MR][kTileRows];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) acc[m][r] = _mm256_setzero_si256();
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << SLOT_BITS) - 1));
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 32 * kSlots) {
#pragma GCC unroll 4
    for (int j = 0; j < kSlots; ++j) {
#pragma GCC unroll 4
      for (int r = 0; r < kTileRows; ++r) {
        __m256i wv = ld(w + r * kChunkBytes);
        if constexpr (SLOT_BITS != 8) {
          if (j) wv = _mm256_srli_epi16(wv, j * SLOT_BITS);
          wv = _mm256_and_si256(wv, mask);
        }
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_dpbusd_epi32(acc[m][r], wv, ld(a + m * lda + 32 * j));
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[m]), hsum4_epi32(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
}

// One activation row (M = 1, or the last row of a block): the slots are isolated by a mask alone,
// without shifting: slot j of a byte enters as code << (j * SLOT_BITS), with its own accumulator,
// scaled back (exactly: the sums are multiples of the scale) when the tile is finished.
template <int SLOT_BITS>
void tile_row(const int8_t* a, const uint8_t* w, int64_t nchunks, int32_t* dots) {
  constexpr int kSlots = 8 / SLOT_BITS;
  __m256i acc[kSlots][kTileRows];
#pragma GCC unroll 4
  for (int j = 0; j < kSlots; ++j)
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) acc[j][r] = _mm256_setzero_si256();
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 32 * kSlots) {
#pragma GCC unroll 4
    for (int j = 0; j < kSlots; ++j) {
      const __m256i mask = _mm256_set1_epi8(static_cast<char>(((1 << SLOT_BITS) - 1) << (j * SLOT_BITS)));
      const __m256i av = ld(a + 32 * j);
#pragma GCC unroll 4
      for (int r = 0; r < kTileRows; ++r)
        acc[j][r] = _mm256_dpbusd_epi32(acc[j][r], _mm256_and_si256(ld(w + r * kChunkBytes), mask), av);
    }
  }
  __m128i total = _mm_setzero_si128();
#pragma GCC unroll 4
  for (int j = 0; j < kSlots; ++j)
    total = _mm_add_epi32(total, _mm_srai_epi32(hsum4_epi32(acc[j][0], acc[j][1], acc[j][2], acc[j][3]), j * SLOT_BITS));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dots), total);
}

// The same with 512-bit registers: the 4 rows of a chunk are 128 contiguous bytes, i.e. two zmm
// loads of 2 rows each; the 32 activation bytes of a slot are broadcast to both halves. Half the
// instructions of tile_row for M = 1, where instruction issue (not memory) is the limit.
template <int SLOT_BITS>
void tile_row_zmm(const int8_t* a, const uint8_t* w, int64_t nchunks, int32_t* dots) {
  constexpr int kSlots = 8 / SLOT_BITS;
  __m512i acc[kSlots][2];
#pragma GCC unroll 4
  for (int j = 0; j < kSlots; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_si512();
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 32 * kSlots) {
    const __m512i w01 = _mm512_loadu_si512(w), w23 = _mm512_loadu_si512(w + 64);
#pragma GCC unroll 4
    for (int j = 0; j < kSlots; ++j) {
      const __m512i mask = _mm512_set1_epi8(static_cast<char>(((1 << SLOT_BITS) - 1) << (j * SLOT_BITS)));
      const __m512i av = _mm512_broadcast_i64x4(ld(a + 32 * j));
      acc[j][0] = _mm512_dpbusd_epi32(acc[j][0], _mm512_and_si512(w01, mask), av);
      acc[j][1] = _mm512_dpbusd_epi32(acc[j][1], _mm512_and_si512(w23, mask), av);
    }
  }
  __m128i total = _mm_setzero_si128();
#pragma GCC unroll 4
  for (int j = 0; j < kSlots; ++j) {
    const __m128i s = hsum4_epi32(_mm512_castsi512_si256(acc[j][0]), _mm512_extracti64x4_epi64(acc[j][0], 1),
                                  _mm512_castsi512_si256(acc[j][1]), _mm512_extracti64x4_epi64(acc[j][1], 1));
    total = _mm_add_epi32(total, _mm_srai_epi32(s, j * SLOT_BITS));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dots), total);
}

template <int MR>
inline void tile_any(const Args& g, int64_t m, int64_t t, int32_t (*dots)[kTileRows]) {
  const uint8_t* w = g.w + t * g.nchunks * kTileRows * kChunkBytes;
  const int8_t* a = g.a + m * g.lda;
  if constexpr (MR == 1) {
    if (g.wbits == 2) return tile_row_zmm<2>(a, w, g.nchunks, dots[0]);
    if (g.wbits != 8) return tile_row_zmm<4>(a, w, g.nchunks, dots[0]);
  }
  if (g.wbits == 8) tile<MR, 8>(a, g.lda, w, g.nchunks, dots);
  else if (g.wbits == 2) tile<MR, 2>(a, g.lda, w, g.nchunks, dots);
  else tile<MR, 4>(a, g.lda, w, g.nchunks, dots);
}

// 4 activation rows x 4 weight rows = 16 accumulators; EVEX code can use all 32 ymm registers.
constexpr int kMR = 4;

}  // namespace

void run_avx512vnni(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  int32_t dots[kMR][kTileRows];
  for (int64_t m = m0; m < m1; m += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
    for (int64_t t = t0; t < t1; ++t) {
      switch (mr) {
        case 4: tile_any<4>(g, m, t, dots); break;
        case 3: tile_any<3>(g, m, t, dots); break;
        case 2: tile_any<2>(g, m, t, dots); break;
        default: tile_any<1>(g, m, t, dots); break;
      }
      finish_tile_avx2(g, m, mr, t, dots);
    }
  }
}

}  // namespace dfqkern::cpu::gemm
