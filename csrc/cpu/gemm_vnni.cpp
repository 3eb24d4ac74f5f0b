// AVX512-VNNI packed GEMM micro-kernels on the cpu-tile-v1 layout: vpdpbusd accumulates
// sum of 4 (unsigned weight code x signed a') into int32 lanes, so there is no int16 intermediate,
// no saturation bound and no flush; 8-bit codes need no unpacking. 512-bit registers hold two
// 32-byte tile rows each (activations broadcast to both halves). Used when the CPU has
// AVX512F/BW/VL + AVX512_VNNI; everything else stays on the AVX2 kernels.
#include <algorithm>

#include "gemm.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include "avx2_math.h"

namespace dfqkern::cpu::gemm {
namespace {

using avx2::hsum4_epi32;

inline __m256i ld(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// One activation row (M = 1, or the last row of a block). The slots are isolated by a mask alone,
// without shifting: slot j of a byte enters as code << (j * SLOT_BITS), with its own accumulator,
// scaled back (exactly: the sums are multiples of the scale) when the tile is finished. The 4 rows
// of a chunk are 128 contiguous bytes, i.e. two zmm loads of 2 rows each; the 32 activation bytes
// of a slot are broadcast to both halves.
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

// MR activation rows x one tile with 512-bit registers: a chunk's rows (0,1) and (2,3) are one zmm
// each, an activation slot is broadcast to both halves. Fewer instructions per multiply-add than
// 256-bit registers (measured ~10% faster for 197x768x3072 on a Zen 4 core, which splits 512-bit
// ops internally: instruction issue, not the multipliers, is the limit).
template <int MR, int SLOT_BITS>
void tile_zmm(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nchunks, int32_t (*dots)[kTileRows]) {
  constexpr int kSlots = 8 / SLOT_BITS;
  __m512i acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << SLOT_BITS) - 1));
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 32 * kSlots) {
    const __m512i w01 = _mm512_loadu_si512(w), w23 = _mm512_loadu_si512(w + 64);
#pragma GCC unroll 4
    for (int j = 0; j < kSlots; ++j) {
      __m512i s01 = w01, s23 = w23;
      if constexpr (SLOT_BITS != 8) {
        if (j) {
          s01 = _mm512_srli_epi16(s01, j * SLOT_BITS);
          s23 = _mm512_srli_epi16(s23, j * SLOT_BITS);
        }
        s01 = _mm512_and_si512(s01, mask);
        s23 = _mm512_and_si512(s23, mask);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512i av = _mm512_broadcast_i64x4(ld(a + m * lda + 32 * j));
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], s01, av);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], s23, av);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[m]),
                     hsum4_epi32(_mm512_castsi512_si256(acc[m][0]), _mm512_extracti64x4_epi64(acc[m][0], 1),
                                 _mm512_castsi512_si256(acc[m][1]), _mm512_extracti64x4_epi64(acc[m][1], 1)));
}

template <int MR>
inline void tile_any(const Args& g, int64_t m, int64_t t, int32_t (*dots)[kTileRows]) {
  const uint8_t* w = g.w + t * g.nchunks * kTileRows * kChunkBytes;
  const int8_t* a = g.a + m * g.lda;
  if constexpr (MR == 1) {
    if (g.wbits == 2) return tile_row_zmm<2>(a, w, g.nchunks, dots[0]);
    if (g.wbits != 8) return tile_row_zmm<4>(a, w, g.nchunks, dots[0]);
  }
  if (g.wbits == 8) tile_zmm<MR, 8>(a, g.lda, w, g.nchunks, dots);
  else if (g.wbits == 2) tile_zmm<MR, 2>(a, g.lda, w, g.nchunks, dots);
  else tile_zmm<MR, 4>(a, g.lda, w, g.nchunks, dots);
}

// 6 activation rows x 2 zmm (4 weight rows) = 12 accumulators of the 32 zmm registers.
constexpr int kMR = 6;

}  // namespace

void run_avx512vnni(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  int32_t dots[kMR][kTileRows];
  for (int64_t m = m0; m < m1; m += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
    for (int64_t t = t0; t < t1; ++t) {
      switch (mr) {
        case 6: tile_any<6>(g, m, t, dots); break;
        case 5: tile_any<5>(g, m, t, dots); break;
        case 4: tile_any<4>(g, m, t, dots); break;
        case 3: tile_any<3>(g, m, t, dots); break;
        case 2: tile_any<2>(g, m, t, dots); break;
        default: tile_any<1>(g, m, t, dots); break;
      }
      // the epilogue takes up to 4 rows at a time (4 x 4 transposed stores)
      finish_tile_avx2(g, m, std::min(mr, 4), t, dots);
      if (mr > 4) finish_tile_avx2(g, m + 4, mr - 4, t, dots + 4);
    }
  }
}

}  // namespace dfqkern::cpu::gemm
