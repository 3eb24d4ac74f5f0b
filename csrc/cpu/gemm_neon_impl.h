// Body of the aarch64 packed GEMM micro-kernels, compiled twice (like depthwise_impl.h):
//   gemm_neon.cpp      DFQ_NEON_DOT 0: NEON widening multiplies (smull / smlal -> int16, sadalp -> int32),
//                      for every AArch64 CPU (Advanced SIMD is baseline);
//   gemm_neon_dot.cpp  DFQ_NEON_DOT 1: sdot (vdotq_s32), 4 int8 products summed into each int32 lane,
//                      under `#pragma GCC target("arch=armv8.2-a+dotprod")`, run only where the CPU
//                      reports HWCAP_ASIMDDP (Cortex-A55/A76/A78AE, Jetson Orin, Raspberry Pi 5, ...).
// Both read the x86 layouts unchanged (gemm.h): a cpu-panel-v1 block row is 4 rows x 4 bytes = one
// 128-bit register, exactly sdot's operand; cpu-tile-v1 chunks are 2 x 16 bytes per row.
//
// Operands are signed bytes on both sides. 2/3/4-bit codes (<= 15) are already valid int8; 8-bit codes
// (0..255) enter as c ^ 0x80 = c - 128 and the dot product gets 128 * sum(a') back in the driver below,
// with sum(a') over the L activation bytes a kernel read = a_sum - 128 * L (padding bytes hold -128).
// All integer sums wrap mod 2^32 like the portable kernel's, so the int32 results are identical; the
// epilogues are the portable finish_tile / finish_panels (the reference's fp32 order of operations).
//
// Included only by those two files, inside their own target settings; the including file defines
// DFQ_NEON_DOT and DFQ_NEON_NAME(base) (the entry points' names).
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "gemm.h"

namespace dfqkern::cpu::gemm {
namespace {

// f(std::integral_constant<int, 0>{}) ... f(<N - 1>): compile-time slot indices for the shift immediates.
template <int N, class F>
inline void static_for(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

// Slot S of SB-bit codes in each byte, as int8 (8-bit codes: c - 128).
template <int SB, int S>
inline int8x16_t slot_codes(uint8x16_t v) {
  if constexpr (SB == 8) {
    return vreinterpretq_s8_u8(veorq_u8(v, vdupq_n_u8(0x80)));
  } else {
    if constexpr (S > 0) v = vshrq_n_u8(v, S * SB);
    return vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8((1 << SB) - 1)));
  }
}

inline int8x16_t bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

#if !DFQ_NEON_DOT
// sum of w[i] * a[i] over 16 lanes, pairwise into acc's 4 int32 lanes (lane i: bytes 4i..4i+3 of the
// int16 products' pairs, i.e. the same grouping sdot uses). Int16 holds two products: |w| <= 15 for
// 2/4-bit codes; 8-bit codes (|w| <= 128) take the one-product variant.
inline int32x4_t dot16_pairs(int32x4_t acc, int8x16_t w, int8x16_t a, bool one_product) {
  if (one_product) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(a)));
    return vpadalq_s16(acc, vmull_high_s8(w, a));
  }
  return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(a)), w, a));
}
#endif

// 128 * sum(a') over the first L activation bytes of row m (see the header comment), mod 2^32.
inline uint32_t w8_fix(const Args& g, int64_t m, int64_t L) {
  return 128u * (static_cast<uint32_t>(g.a_sum[m]) - 128u * static_cast<uint32_t>(L));
}

// ---------------------------------------------------------------------------- cpu-tile-v1

// MR activation rows x one 4-row tile. Per chunk and slot: the slot's 32 codes of each tile row (two
// registers), multiplied with the matching 32 activation bytes of each row; one horizontal sum per
// (row, tile row) at the end.
template <int MR, int SB>
void tile_kernel(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nchunks, int32_t (*dots)[kTileRows]) {
  constexpr int kSlots = 8 / SB;
  int32x4_t acc[MR][kTileRows];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kTileRows; ++r) acc[m][r] = vdupq_n_s32(0);
  for (int64_t c = 0; c < nchunks; ++c, w += kTileRows * kChunkBytes, a += 32 * kSlots) {
    static_for<kSlots>([&](auto s) {
      int8x16_t a0[MR], a1[MR];
      for (int m = 0; m < MR; ++m) {
        a0[m] = vld1q_s8(a + m * lda + 32 * s);
        a1[m] = vld1q_s8(a + m * lda + 32 * s + 16);
      }
      for (int r = 0; r < kTileRows; ++r) {
        const int8x16_t w0 = slot_codes<SB, decltype(s)::value>(vld1q_u8(w + r * kChunkBytes));
        const int8x16_t w1 = slot_codes<SB, decltype(s)::value>(vld1q_u8(w + r * kChunkBytes + 16));
        for (int m = 0; m < MR; ++m) {
#if DFQ_NEON_DOT
          acc[m][r] = vdotq_s32(vdotq_s32(acc[m][r], w0, a0[m]), w1, a1[m]);
#else
          acc[m][r] = dot16_pairs(dot16_pairs(acc[m][r], w0, a0[m], SB == 8), w1, a1[m], SB == 8);
#endif
        }
      }
    });
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kTileRows; ++r) dots[m][r] = vaddvq_s32(acc[m][r]);
}

template <int MR>
void tile_any(const Args& g, int64_t m, int64_t t, int32_t (*dots)[kTileRows]) {
  const uint8_t* w = g.w + t * g.nchunks * kTileRows * kChunkBytes;
  const int8_t* a = g.a + m * g.lda;
  if (g.wbits == 8) {
    tile_kernel<MR, 8>(a, g.lda, w, g.nchunks, dots);
    for (int i = 0; i < MR; ++i) {
      const uint32_t fix = w8_fix(g, m + i, g.nchunks * chunk_k(8));
      for (int r = 0; r < kTileRows; ++r) dots[i][r] = static_cast<int32_t>(static_cast<uint32_t>(dots[i][r]) + fix);
    }
  } else if (g.wbits == 2) {
    tile_kernel<MR, 2>(a, g.lda, w, g.nchunks, dots);
  } else {
    tile_kernel<MR, 4>(a, g.lda, w, g.nchunks, dots);
  }
}

constexpr int kTileMR = 4;  // 4 rows x 4 tile rows = 16 int32x4 accumulators of the 32 registers

// ---------------------------------------------------------------------------- cpu-panel-v1

// MR activation rows x one 16-row panel (4 registers of 4 rows x 4 k). Per K block and slot: the 4
// activation bytes of the slot broadcast to every lane group, multiplied with each register.
// dotprod: acc[m][v] lane i is weight row 4v + i directly. NEON: the pairwise sums leave two int32 per
// weight row (lo: rows 4v, 4v + 1; hi: rows 4v + 2, 4v + 3), folded by one addp at the end. 2/4-bit
// products of all slots of a block are summed in int16 first (<= 4 slots x 2 x 15 x 128 < 2^15).
template <int MR, int SB>
void panel_kernel(const int8_t* a, int64_t lda, const uint8_t* w, int64_t nblocks, SegWalk seg, int32_t* dots) {
  constexpr int kSlots = 8 / SB;
#if DFQ_NEON_DOT
  int32x4_t acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 4; ++v) acc[m][v] = vdupq_n_s32(0);
#else
  int32x4_t lo[MR][4], hi[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 4; ++v) lo[m][v] = hi[m][v] = vdupq_n_s32(0);
#endif
  for (int64_t b = 0; b < nblocks; ++b, w += kBlockBytes, a += 4 * kSlots) {
    uint8x16_t wv[4];
    for (int v = 0; v < 4; ++v) wv[v] = vld1q_u8(w + 16 * v);
#if DFQ_NEON_DOT
    static_for<kSlots>([&](auto s) {
      int8x16_t ws[4];
      for (int v = 0; v < 4; ++v) ws[v] = slot_codes<SB, decltype(s)::value>(wv[v]);
      for (int m = 0; m < MR; ++m) {
        const int8x16_t av = bcast4(a + m * lda + 4 * s);
        for (int v = 0; v < 4; ++v) acc[m][v] = vdotq_s32(acc[m][v], ws[v], av);
      }
    });
#else
    if constexpr (SB == 8) {  // one slot; products up to 128 * 128: widen each one
      for (int m = 0; m < MR; ++m) {
        const int8x16_t av = bcast4(a + m * lda);
        for (int v = 0; v < 4; ++v) {
          const int8x16_t ws = slot_codes<8, 0>(wv[v]);
          lo[m][v] = vpadalq_s16(lo[m][v], vmull_s8(vget_low_s8(ws), vget_low_s8(av)));
          hi[m][v] = vpadalq_s16(hi[m][v], vmull_high_s8(ws, av));
        }
      }
    } else {
      int16x8_t plo[MR][4], phi[MR][4];
      static_for<kSlots>([&](auto s) {
        for (int v = 0; v < 4; ++v) {
          const int8x16_t ws = slot_codes<SB, decltype(s)::value>(wv[v]);
          for (int m = 0; m < MR; ++m) {
            const int8x16_t av = bcast4(a + m * lda + 4 * s);
            if constexpr (decltype(s)::value == 0) {
              plo[m][v] = vmull_s8(vget_low_s8(ws), vget_low_s8(av));
              phi[m][v] = vmull_high_s8(ws, av);
            } else {
              plo[m][v] = vmlal_s8(plo[m][v], vget_low_s8(ws), vget_low_s8(av));
              phi[m][v] = vmlal_high_s8(phi[m][v], ws, av);
            }
          }
        }
      });
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < 4; ++v) {
          lo[m][v] = vpadalq_s16(lo[m][v], plo[m][v]);
          hi[m][v] = vpadalq_s16(hi[m][v], phi[m][v]);
        }
    }
#endif
    a += seg.next();
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 4; ++v) {
#if DFQ_NEON_DOT
      vst1q_s32(dots + m * kPanel + 4 * v, acc[m][v]);
#else
      vst1q_s32(dots + m * kPanel + 4 * v, vpaddq_s32(lo[m][v], hi[m][v]));
#endif
    }
}

template <int MR>
void panel_any(const Args& g, int64_t m, int64_t p, int32_t* dots) {
  const uint8_t* w = g.w + p * g.nchunks * kBlockBytes;
  const int8_t* a = g.a + m * g.lda;
  if (g.wbits == 8) {
    panel_kernel<MR, 8>(a, g.lda, w, g.nchunks, SegWalk(g), dots);
    for (int i = 0; i < MR; ++i) {
      const uint32_t fix = w8_fix(g, m + i, g.nchunks * panel_k(8));
      for (int j = 0; j < kPanel; ++j)
        dots[i * kPanel + j] = static_cast<int32_t>(static_cast<uint32_t>(dots[i * kPanel + j]) + fix);
    }
  } else if (g.wbits == 2) {
    panel_kernel<MR, 2>(a, g.lda, w, g.nchunks, SegWalk(g), dots);
  } else {
    panel_kernel<MR, 4>(a, g.lda, w, g.nchunks, SegWalk(g), dots);
  }
}

// dotprod: 4 rows x 4 accumulators; NEON: 2 rows x 8 (lo / hi pairs) + int16 partials.
constexpr int kPanelMR = DFQ_NEON_DOT ? 4 : 2;

}  // namespace

void DFQ_NEON_NAME(run)(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  int32_t dots[kTileMR][kTileRows];
  for (int64_t m = m0; m < m1; m += kTileMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kTileMR, m1 - m));
    for (int64_t t = t0; t < t1; ++t) {
      switch (mr) {
        case 4: tile_any<4>(g, m, t, dots); break;
        case 3: tile_any<3>(g, m, t, dots); break;
        case 2: tile_any<2>(g, m, t, dots); break;
        default: tile_any<1>(g, m, t, dots); break;
      }
      finish_tile(g, m, mr, t, dots);
    }
  }
}

void DFQ_NEON_NAME(panels)(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  int32_t dots[kPanelMR * kPanel];
  for (int64_t m = m0; m < m1; m += kPanelMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kPanelMR, m1 - m));
    for (int64_t p = p0; p < p1; ++p) {
      switch (mr) {
#if DFQ_NEON_DOT
        case 4: panel_any<4>(g, m, p, dots); break;
        case 3: panel_any<3>(g, m, p, dots); break;
#endif
        case 2: panel_any<2>(g, m, p, dots); break;
        default: panel_any<1>(g, m, p, dots); break;
      }
      finish_panels(g, m, mr, p, 1, dots, kPanel);
    }
  }
}

}  // namespace dfqkern::cpu::gemm
