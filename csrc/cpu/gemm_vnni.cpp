// AVX512-VNNI packed GEMM micro-kernels on the cpu-tile-v1 layout: vpdpbusd accumulates
// sum of 4 (unsigned weight code x signed a') into int32 lanes, so there is no int16 intermediate,
// no saturation bound and no flush; 8-bit codes need no unpacking. 512-bit registers hold two
// 32-byte tile rows each (activations broadcast to both halves). Used when the CPU has
// AVX512F/BW/VL + AVX512_VNNI; everything else stays on the AVX2 kernels.
#include <algorithm>
#include <cstring>

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

// ---------------------------------------------------------------------------- cpu-panel-v1

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// MR activation rows x NV panels (16 weight rows each): acc[m][v] holds the 16 dot products of row m
// with panel v, one per lane. Per K block: NV 64-byte weight loads, a shift / mask per slot, and for
// each slot and row one 4-byte activation broadcast feeding NV vpdpbusd.
template <int MR, int NV, int SB>
void panel_kernel(const int8_t* a, int64_t lda, const uint8_t* w, int64_t pstride, int64_t nblocks, SegWalk seg,
                  int32_t* dots) {
  constexpr int kSlots = 8 / SB;
  __m512i acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_si512();
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << SB) - 1));
  for (int64_t b = 0; b < nblocks; ++b, w += kBlockBytes, a += 4 * kSlots) {
    __m512i wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(w + v * pstride);
#pragma GCC unroll 4
    for (int s = 0; s < kSlots; ++s) {
      __m512i ws[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        ws[v] = wv[v];
        if constexpr (SB != 8) ws[v] = _mm512_and_si512(s ? _mm512_srli_epi16(wv[v], s * SB) : wv[v], mask);
      }
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512i av = bcast4(a + m * lda + 4 * s);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], ws[v], av);
      }
    }
    a += seg.next();
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_si512(dots + (m * NV + v) * kPanel, acc[m][v]);
}

// 16 x 16 fp32 transpose in registers (r[i] lane j -> r[j] lane i).
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // now r[4q + c] holds, per 128-bit lane L, rows (4L..4L+3) of column group q, column c ... of each
  // 4 x 4 block; two rounds of 128-bit shuffles finish the transpose
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

}  // namespace

// Epilogue of mr (<= 16) rows x nv panels, 16 weight rows per vector; same operations and order as
// finish_panels. Row-major output: masked 16-wide stores; channel-major (NCHW conv, ldo_m == 1):
// 16 x 16 transposes so each weight row stores mr consecutive pixels.
void finish_panels_zmm(const Args& g, int64_t m0, int mr, int64_t p0, int nv, const int32_t* dots) {
  const bool cmajor = g.ldo_n != 1;
  if (cmajor && g.ldo_m != 1) return finish_panels(g, m0, mr, p0, nv, dots, nv * kPanel);
  for (int v = 0; v < nv; ++v) {
    const int64_t row0 = (p0 + v) * kPanel;
    const int nvalid = static_cast<int>(std::min<int64_t>(kPanel, g.n - row0));
    if (nvalid <= 0) break;
    const __mmask16 nmask = static_cast<__mmask16>((1u << nvalid) - 1);
    const int32_t* c = g.corr + (p0 + v) * 3 * kPanel;
    const __m512i P = _mm512_loadu_si512(c), ZW = _mm512_loadu_si512(c + kPanel), Q = _mm512_loadu_si512(c + 2 * kPanel);
    // per-tensor activation zero point / scale: their terms are the same for every row (int32 wraps, so the
    // sum's order does not change it; the fp32 product is the one the row loop would form)
    const bool za_const = g.a_zp_step == 0, as_const = g.a_scale_step == 0;
    const __m512i PQ = za_const ? _mm512_sub_epi32(P, _mm512_mullo_epi32(_mm512_set1_epi32(g.a_zp[0]), Q)) : P;
    __m512 ws = _mm512_setzero_ps(), bias = _mm512_setzero_ps(), sc = _mm512_setzero_ps();
    if (g.out_f) {
      ws = _mm512_maskz_loadu_ps(nmask, g.w_scale + row0);
      if (g.bias) bias = _mm512_maskz_loadu_ps(nmask, g.bias + row0);
      if (as_const) sc = _mm512_mul_ps(_mm512_set1_ps(g.a_scale[0]), ws);
    }
    const bool post = g.out_f && (g.residual || g.relu);
    const __m512 zero = _mm512_setzero_ps();
    // Epilogue::residual / relu of conv.cpp's post_block, on one vector (mask: the valid lanes, residual at r)
    const auto post_ops = [&](__m512 v, __mmask16 mask, const float* r) {
      if (g.residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, r));
      if (g.relu) v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero);
      return v;
    };
    __m512 y[16];
    for (int i = 0; i < mr; ++i) {
      const int64_t m = m0 + i;
      const __m512i d = _mm512_loadu_si512(dots + (i * nv + v) * kPanel);
      __m512i acc = _mm512_sub_epi32(_mm512_add_epi32(d, PQ), _mm512_mullo_epi32(ZW, _mm512_set1_epi32(g.a_sum[m])));
      if (!za_const) acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(g.a_zp[m * g.a_zp_step]), Q));
      if (g.out_f) {
        y[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(acc),
                             as_const ? sc : _mm512_mul_ps(_mm512_set1_ps(g.a_scale[m * g.a_scale_step]), ws));
        if (g.bias) y[i] = _mm512_add_ps(y[i], bias);
      } else {
        y[i] = _mm512_castsi512_ps(acc);
      }
      if (!cmajor) {
        const int64_t o = m * g.ldo_m + row0;
        if (post) y[i] = post_ops(y[i], nmask, g.residual + o);
        _mm512_mask_storeu_ps(g.out_f ? g.out_f + o : reinterpret_cast<float*>(g.out_i + o), nmask, y[i]);
      }
    }
    if (cmajor) {
      for (int i = mr; i < 16; ++i) y[i] = _mm512_setzero_ps();
      transpose16(y);
      const __mmask16 mmask = static_cast<__mmask16>((1u << mr) - 1);
      for (int j = 0; j < nvalid; ++j) {
        const int64_t o = m0 + (row0 + j) * g.ldo_n;
        if (post) y[j] = post_ops(y[j], mmask, g.residual + o);
        _mm512_mask_storeu_ps(g.out_f ? g.out_f + o : reinterpret_cast<float*>(g.out_i + o), mmask, y[j]);
      }
    }
  }
}

namespace {

template <int MR, int NV>
void panel_any(const Args& g, int64_t m, int64_t p, int32_t* dots) {
  const uint8_t* w = g.w + p * g.nchunks * kBlockBytes;
  const int8_t* a = g.a + m * g.lda;
  const int64_t ps = g.nchunks * kBlockBytes;
  const SegWalk seg(g);
  if (g.wbits == 8) panel_kernel<MR, NV, 8>(a, g.lda, w, ps, g.nchunks, seg, dots);
  else if (g.wbits == 2) panel_kernel<MR, NV, 2>(a, g.lda, w, ps, g.nchunks, seg, dots);
  else panel_kernel<MR, NV, 4>(a, g.lda, w, ps, g.nchunks, seg, dots);
}

template <int NV>
void panel_rows(const Args& g, int64_t m, int mr, int64_t p, int32_t* dots) {
  switch (mr) {
    case 12: return panel_any<12, NV>(g, m, p, dots);
    case 11: return panel_any<11, NV>(g, m, p, dots);
    case 10: return panel_any<10, NV>(g, m, p, dots);
    case 9: return panel_any<9, NV>(g, m, p, dots);
    case 8: return panel_any<8, NV>(g, m, p, dots);
    case 7: return panel_any<7, NV>(g, m, p, dots);
    case 6: return panel_any<6, NV>(g, m, p, dots);
    case 5: return panel_any<5, NV>(g, m, p, dots);
    case 4: return panel_any<4, NV>(g, m, p, dots);
    case 3: return panel_any<3, NV>(g, m, p, dots);
    case 2: return panel_any<2, NV>(g, m, p, dots);
    default: return panel_any<1, NV>(g, m, p, dots);
  }
}

// 12 rows x 2 panels = 24 accumulators + 2 weight vectors + 2 unpacked slots + mask of 32 zmm.
constexpr int kPanelMR = 12;

}  // namespace

void panels_avx512vnni(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  alignas(64) int32_t dots[kPanelMR * 2 * kPanel];
  for (int64_t m = m0; m < m1; m += kPanelMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kPanelMR, m1 - m));
    for (int64_t p = p0; p < p1; p += 2) {
      const int nv = p + 2 <= p1 ? 2 : 1;
      if (nv == 2) panel_rows<2>(g, m, mr, p, dots);
      else panel_rows<1>(g, m, mr, p, dots);
      finish_panels_zmm(g, m, mr, p, nv, dots);
    }
  }
}

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
