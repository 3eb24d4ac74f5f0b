// AVX2 packed GEMM micro-kernels: MR activation rows x one 4-row weight tile, int32 lanes.
//   2/3/4-bit: vpand / vpsrlw unpack, vpmaddubsw(weight code, a') -> int16 pairs (<= 2*15*128, no
//              saturation), accumulated in int16 for several slots, then vpmaddwd(., 1) -> int32.
//   8-bit:     vpmovzxbw weights, vpmovsxbw activations, vpmaddwd.
#include <algorithm>
#include <cstring>

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

// 2/3/4-bit weights. For each 32-k slot of a chunk: unpack the slot of each tile row (one vpand,
// plus a vpsrlw for the upper slots), vpmaddubsw it with each activation row and add the int16
// pairs into int16 accumulators; every kFlush slots the int16 sums are widened (vpmaddwd by 1)
// into int32 partial sums kept on the stack. A pair is at most 2 * qmax * 128 in magnitude, so
// kFlush * 2 * qmax * 128 < 2^15 keeps the int16 sums exact.
template <int MR, int SLOT_BITS>
void tile_low(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nchunks, int32_t (*dots)[kTileRows]) {
  constexpr int kSlots = 8 / SLOT_BITS;
  constexpr int kFlush = SLOT_BITS == 2 ? 32 : 8;  // 32*2*3*128 = 24576, 8*2*15*128 = 30720
  // int32 partial sums live in memory (touched once per kFlush slots) so that the MR x 4 int16
  // accumulators, one weight slot and the mask fit the 16 ymm registers.
  alignas(32) int32_t acc32[MR][kTileRows][8] = {};
  __m256i acc16[MR][kTileRows];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) acc16[m][r] = _mm256_setzero_si256();
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << SLOT_BITS) - 1));
  int pending = 0;
  auto flush = [&]() {
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int r = 0; r < kTileRows; ++r) {
        __m256i* p = reinterpret_cast<__m256i*>(acc32[m][r]);
        _mm256_store_si256(p, _mm256_add_epi32(_mm256_load_si256(p), _mm256_madd_epi16(acc16[m][r], ones)));
        acc16[m][r] = _mm256_setzero_si256();
      }
  };
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 32 * kSlots) {
#pragma GCC unroll 4
    for (int j = 0; j < kSlots; ++j) {
#pragma GCC unroll 4
      for (int r = 0; r < kTileRows; ++r) {
        __m256i wv = ld(w + r * kChunkBytes);
        if (j) wv = _mm256_srli_epi16(wv, j * SLOT_BITS);
        wv = _mm256_and_si256(wv, mask);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m)
          acc16[m][r] = _mm256_add_epi16(acc16[m][r], _mm256_maddubs_epi16(wv, ld(a + m * lda + 32 * j)));
      }
    }
    pending += kSlots;
    if (pending >= kFlush) {
      flush();
      pending = 0;
    }
  }
  flush();
  for (int m = 0; m < MR; ++m) {
    const auto v = [&](int r) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(acc32[m][r])); };
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[m]), hsum4_epi32(v(0), v(1), v(2), v(3)));
  }
}

// 8-bit weights: codes up to 255 would saturate vpmaddubsw, so both sides are widened to int16
// (vpmovzxbw / vpmovsxbw) and multiplied with vpmaddwd. MR <= 2 keeps everything in registers.
template <int MR>
void tile_w8(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nchunks, int32_t (*dots)[kTileRows]) {
  __m256i acc[MR][kTileRows];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) acc[m][r] = _mm256_setzero_si256();
  const auto ld16 = [](const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); };
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 32) {
    __m256i a0[MR], a1[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      a0[m] = _mm256_cvtepi8_epi16(ld16(a + m * lda));
      a1[m] = _mm256_cvtepi8_epi16(ld16(a + m * lda + 16));
    }
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m256i w0 = _mm256_cvtepu8_epi16(ld16(w + r * kChunkBytes));
      const __m256i w1 = _mm256_cvtepu8_epi16(ld16(w + r * kChunkBytes + 16));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m)
        acc[m][r] = _mm256_add_epi32(acc[m][r],
                                     _mm256_add_epi32(_mm256_madd_epi16(w0, a0[m]), _mm256_madd_epi16(w1, a1[m])));
    }
  }
  store_dots<MR>(acc, dots);
}

template <int MR>
inline void tile(const Args& g, int64_t m, int64_t t, int32_t (*dots)[kTileRows]) {
  const uint8_t* w = g.w + t * g.nchunks * kTileRows * kChunkBytes;
  const int8_t* a = g.a + m * g.lda;
  if (g.wbits == 8) {
    if constexpr (MR == 3) {
      tile_w8<2>(a, g.lda, w, g.nchunks, dots);
      tile_w8<1>(a + 2 * g.lda, g.lda, w, g.nchunks, dots + 2);
    } else {
      tile_w8<MR>(a, g.lda, w, g.nchunks, dots);
    }
  } else if (g.wbits == 2) {
    tile_low<MR, 2>(a, g.lda, w, g.nchunks, dots);
  } else {
    tile_low<MR, 4>(a, g.lda, w, g.nchunks, dots);
  }
}

// cpu-panel-v1, MR activation rows x one panel (two ymm halves of 8 weight rows x 4 k). Per K block
// and slot: one 4-byte activation broadcast per row, vpmaddubsw(weight codes, a') -> int16 pairs per
// weight row, added into int16 accumulators (the lanes are already the output rows: no horizontal
// sums) and widened into int32 partial sums on the stack every kFlush blocks. 8-bit weights are split
// into nibbles (vpmaddubsw of a full code could saturate): dot = lo . a' + 16 * hi . a'.
template <int MR, int SB>
void panel_kernel(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nblocks, SegWalk seg, int32_t* dots) {
  constexpr bool kW8 = SB == 8;
  constexpr int kSlots = kW8 ? 1 : 8 / SB;  // activation dwords per block
  constexpr int kParts = kW8 ? 2 : 1;       // nibbles of an 8-bit code
  // int16 bound per lane: adds per flush x 2 x qmax x 128 < 2^15
  constexpr int kFlush = SB == 4 ? 4 : 8;   // 4-bit: 8 x 3840; 2-bit: 32 x 768; 8-bit: 8 x 3840 per part
  alignas(32) int32_t acc32[MR][2][8] = {};
  __m256i acc16[kParts][MR][2];
  const auto zero16 = [&]() {
#pragma GCC unroll 2
    for (int q = 0; q < kParts; ++q)
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc16[q][m][0] = acc16[q][m][1] = _mm256_setzero_si256();
  };
  const auto flush = [&]() {
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256i* p = reinterpret_cast<__m256i*>(acc32[m][h]);
        __m256i v = _mm256_add_epi32(_mm256_load_si256(p), _mm256_madd_epi16(acc16[0][m][h], _mm256_set1_epi16(1)));
        if constexpr (kW8) v = _mm256_add_epi32(v, _mm256_madd_epi16(acc16[kParts - 1][m][h], _mm256_set1_epi16(16)));
        _mm256_store_si256(p, v);
      }
    zero16();
  };
  zero16();
  const __m256i mask = _mm256_set1_epi8(static_cast<char>(kW8 ? 15 : (1 << SB) - 1));
  int pending = 0;
  for (int64_t b = 0; b < nblocks; ++b, w += kBlockBytes, a += 4 * kSlots) {
    const __m256i w0 = ld(w), w1 = ld(w + 32);
#pragma GCC unroll 4
    for (int s = 0; s < kSlots; ++s)
#pragma GCC unroll 2
      for (int q = 0; q < kParts; ++q) {
        const int shift = kW8 ? 4 * q : s * SB;
        const __m256i s0 = _mm256_and_si256(shift ? _mm256_srli_epi16(w0, shift) : w0, mask);
        const __m256i s1 = _mm256_and_si256(shift ? _mm256_srli_epi16(w1, shift) : w1, mask);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          int32_t v;
          std::memcpy(&v, a + m * lda + 4 * s, 4);
          const __m256i av = _mm256_set1_epi32(v);
          acc16[q][m][0] = _mm256_add_epi16(acc16[q][m][0], _mm256_maddubs_epi16(s0, av));
          acc16[q][m][1] = _mm256_add_epi16(acc16[q][m][1], _mm256_maddubs_epi16(s1, av));
        }
      }
    if (++pending == kFlush) {
      flush();
      pending = 0;
    }
    a += seg.next();
  }
  flush();
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + m * kPanel + 8 * h),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(acc32[m][h])));
}

template <int MR>
void panel_any(const Args& g, int64_t m, int64_t p, int32_t* dots) {
  const uint8_t* w = g.w + p * g.nchunks * kBlockBytes;
  const int8_t* a = g.a + m * g.lda;
  const SegWalk seg(g);
  if (g.wbits == 8) panel_kernel<MR, 8>(a, g.lda, w, g.nchunks, seg, dots);
  else if (g.wbits == 2) panel_kernel<MR, 2>(a, g.lda, w, g.nchunks, seg, dots);
  else panel_kernel<MR, 4>(a, g.lda, w, g.nchunks, seg, dots);
}

// Epilogue of mr (<= 4) rows x one panel, 8 weight rows per vector; same operations and order as
// finish_panels. Channel-major output (NCHW conv) with 4 rows: 4 x 4 transposes, 4 pixels per store.
void finish_panel_avx2(const Args& g, int64_t m0, int mr, int64_t p, const int32_t* dots) {
  const int64_t row0 = p * kPanel;
  const bool cmajor = g.ldo_n != 1;
  if (row0 + kPanel > g.n || (cmajor && (g.ldo_m != 1 || mr != 4))) return finish_panels(g, m0, mr, p, 1, dots, kPanel);
  const int32_t* c = g.corr + p * 3 * kPanel;
  for (int h = 0; h < 2; ++h) {
    const __m256i P = ld(c + 8 * h), ZW = ld(c + kPanel + 8 * h), Q = ld(c + 2 * kPanel + 8 * h);
    __m256 ws = _mm256_setzero_ps(), bias = _mm256_setzero_ps();
    if (g.out_f) {
      ws = _mm256_loadu_ps(g.w_scale + row0 + 8 * h);
      if (g.bias) bias = _mm256_loadu_ps(g.bias + row0 + 8 * h);
    }
    __m256 y[4];
    for (int i = 0; i < mr; ++i) {
      const int64_t m = m0 + i;
      const __m256i d = ld(dots + i * kPanel + 8 * h);
      const __m256i acc = _mm256_sub_epi32(
          _mm256_sub_epi32(_mm256_add_epi32(d, P), _mm256_mullo_epi32(ZW, _mm256_set1_epi32(g.a_sum[m]))),
          _mm256_mullo_epi32(_mm256_set1_epi32(g.a_zp[m * g.a_zp_step]), Q));
      if (g.out_f) {
        y[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(_mm256_set1_ps(g.a_scale[m * g.a_scale_step]), ws));
        if (g.bias) y[i] = _mm256_add_ps(y[i], bias);
      } else {
        y[i] = _mm256_castsi256_ps(acc);
      }
      if (!cmajor) {
        const int64_t o = m * g.ldo_m + row0 + 8 * h;
        _mm256_storeu_ps(g.out_f ? g.out_f + o : reinterpret_cast<float*>(g.out_i + o), y[i]);
      }
    }
    if (cmajor) {
      for (int half = 0; half < 2; ++half) {
        __m128 v0 = half ? _mm256_extractf128_ps(y[0], 1) : _mm256_castps256_ps128(y[0]);
        __m128 v1 = half ? _mm256_extractf128_ps(y[1], 1) : _mm256_castps256_ps128(y[1]);
        __m128 v2 = half ? _mm256_extractf128_ps(y[2], 1) : _mm256_castps256_ps128(y[2]);
        __m128 v3 = half ? _mm256_extractf128_ps(y[3], 1) : _mm256_castps256_ps128(y[3]);
        _MM_TRANSPOSE4_PS(v0, v1, v2, v3);
        const int64_t r = row0 + 8 * h + 4 * half;
        float* o = g.out_f ? g.out_f + m0 + r * g.ldo_n : reinterpret_cast<float*>(g.out_i + m0 + r * g.ldo_n);
        _mm_storeu_ps(o, v0);
        _mm_storeu_ps(o + g.ldo_n, v1);
        _mm_storeu_ps(o + 2 * g.ldo_n, v2);
        _mm_storeu_ps(o + 3 * g.ldo_n, v3);
      }
    }
  }
}

constexpr int kPanelMR = 4;  // 4 rows x 2 halves = 8 int16 accumulators of the 16 ymm

constexpr int kMR = 2;  // activation rows per micro-kernel call: 2 x 4 int16 accumulators stay in the 16 ymm registers

}  // namespace

// Epilogue of one full tile (4 real rows) for mr activation rows, 4 outputs per vector; partial
// tiles take the scalar finish_tile. Same operations and order as finish_tile.
void finish_tile_avx2(const Args& g, int64_t m0, int mr, int64_t t, const int32_t (*dots)[kTileRows]) {
  const int64_t row0 = t * kTileRows;
  if (row0 + kTileRows > g.n) return finish_tile(g, m0, mr, t, dots);
  const __m128i* c = reinterpret_cast<const __m128i*>(g.corr + t * 3 * kTileRows);
  const __m128i P = _mm_loadu_si128(c), ZW = _mm_loadu_si128(c + 1), Q = _mm_loadu_si128(c + 2);
  __m128 ws = _mm_setzero_ps(), bias = _mm_setzero_ps();
  if (g.out_f) {
    ws = _mm_loadu_ps(g.w_scale + row0);
    if (g.bias) bias = _mm_loadu_ps(g.bias + row0);
  }
  // one 4-vector (the tile's rows) per activation row
  __m128 y[4];
  __m128i acc[4];
  for (int i = 0; i < mr; ++i) {
    const int64_t m = m0 + i;
    const __m128i sa = _mm_set1_epi32(g.a_sum[m]), za = _mm_set1_epi32(g.a_zp[m * g.a_zp_step]);
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(dots[i]));
    acc[i & 3] = _mm_sub_epi32(_mm_sub_epi32(_mm_add_epi32(d, P), _mm_mullo_epi32(ZW, sa)), _mm_mullo_epi32(za, Q));
    if (g.out_f) {
      y[i & 3] = _mm_mul_ps(_mm_cvtepi32_ps(acc[i & 3]), _mm_mul_ps(_mm_set1_ps(g.a_scale[m * g.a_scale_step]), ws));
      if (g.bias) y[i & 3] = _mm_add_ps(y[i & 3], bias);
    }
    const int64_t o = m * g.ldo_m + row0 * g.ldo_n;
    if (g.ldo_n == 1) {  // row-major output (Linear): the 4 values are contiguous
      if (g.out_i) _mm_storeu_si128(reinterpret_cast<__m128i*>(g.out_i + o), acc[i & 3]);
      else _mm_storeu_ps(g.out_f + o, y[i & 3]);
    } else if (!(mr == 4 && g.ldo_m == 1)) {  // strided, not transposable below: scalar stores
      alignas(16) float yv[kTileRows];
      alignas(16) int32_t iv[kTileRows];
      _mm_store_ps(yv, y[i & 3]);
      _mm_store_si128(reinterpret_cast<__m128i*>(iv), acc[i & 3]);
      for (int r = 0; r < kTileRows; ++r) {
        if (g.out_i) g.out_i[o + r * g.ldo_n] = iv[r];
        else g.out_f[o + r * g.ldo_n] = yv[r];
      }
    }
  }
  if (g.ldo_n != 1 && mr == 4 && g.ldo_m == 1) {
    // channel-major output (NCHW conv): transpose the 4 x 4 block so each row stores 4 pixels at once
    if (g.out_i) {
      __m128 v0 = _mm_castsi128_ps(acc[0]), v1 = _mm_castsi128_ps(acc[1]), v2 = _mm_castsi128_ps(acc[2]),
             v3 = _mm_castsi128_ps(acc[3]);
      _MM_TRANSPOSE4_PS(v0, v1, v2, v3);
      int32_t* o = g.out_i + m0 + row0 * g.ldo_n;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_castps_si128(v0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + g.ldo_n), _mm_castps_si128(v1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * g.ldo_n), _mm_castps_si128(v2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 3 * g.ldo_n), _mm_castps_si128(v3));
    } else {
      _MM_TRANSPOSE4_PS(y[0], y[1], y[2], y[3]);
      float* o = g.out_f + m0 + row0 * g.ldo_n;
      for (int r = 0; r < 4; ++r) _mm_storeu_ps(o + r * g.ldo_n, y[r]);
    }
  }
}

void run_avx2(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  // Micro-kernels of kMR rows, two of them per step so the epilogue sees 4 rows (4 x 4 transposed
  // stores for NCHW conv outputs).
  int32_t dots[2 * kMR][kTileRows];
  for (int64_t m = m0; m < m1; m += 2 * kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(2 * kMR, m1 - m));
    for (int64_t t = t0; t < t1; ++t) {
      for (int i = 0; i < mr; i += kMR) {
        if (mr - i >= 2) tile<2>(g, m + i, t, dots + i);
        else tile<1>(g, m + i, t, dots + i);
      }
      finish_tile_avx2(g, m, mr, t, dots);
    }
  }
}

void panels_avx2(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  alignas(32) int32_t dots[kPanelMR * kPanel];
  // 8-bit codes keep two int16 accumulator sets (nibbles): 2 rows per call keep them in registers
  const int mr_max = g.wbits == 8 ? 2 : kPanelMR;
  for (int64_t m = m0; m < m1; m += kPanelMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kPanelMR, m1 - m));
    for (int64_t p = p0; p < p1; ++p) {
      for (int i = 0; i < mr; i += mr_max) {
        const int r = std::min(mr - i, mr_max);
        int32_t* d = dots + i * kPanel;
        if (r == 4) panel_any<4>(g, m + i, p, d);
        else if (r == 3) panel_any<3>(g, m + i, p, d);
        else if (r == 2) panel_any<2>(g, m + i, p, d);
        else panel_any<1>(g, m + i, p, d);
      }
      finish_panel_avx2(g, m, mr, p, dots);
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
