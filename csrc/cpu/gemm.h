// Packed integer GEMM of the CPU backend: layouts and kernel entry points (POD only, see common.h).
//
// Weight layout "cpu-tile-v1" (derived once from kpack-lsb-v1 by prepack_weight, cached by Python in
// PackedWeight.cache["cpu"]; never saved):
//   * rows (output channels) are grouped in tiles of kTileRows = 4 consecutive rows; each conv group
//     gets its own tiles (rows padded up to a multiple of 4 with code-0 rows);
//   * K is cut into chunks of chunk_k(bits) values = 32 bytes per row:
//       2-bit codes: 128 values per chunk, byte j holds k = 32*s + j in bits [2s, 2s+2)   (s = 0..3)
//       3/4-bit:      64 values per chunk, byte j holds k = j (low nibble) and k = 32 + j (high nibble)
//       8-bit:        32 values per chunk, byte j holds k = j
//     so one 32-byte load plus shift / mask yields 32 consecutive k per slot, matching a contiguous
//     32-byte run of activations; K is padded up to whole chunks with code 0;
//   * memory order tiles[tile][chunk][row in tile][32 bytes]: a tile's rows are streamed together.
//   * corr[tile] = {P[4], zw[4], Q[4]} (int32, one value per tile row): P = act_offset * sum_k code,
//     zw = the row's zero point, Q = sum_k (code - zw) over the real K; act_offset = 128.
//
// Activation rows (built per call from float x or packed codes), Kp = nchunks * chunk_k elements:
//   int8 a' = code - 128 (unsigned codes become signed bytes, so that vpmaddubsw(unsigned weight
//   code <= 15, signed a') can never saturate: 2 * 15 * 128 < 2^15, and vpdpbusd(weight, a') applies
//   to every width); padding a' = -128 (code 0) meets weight code 0; a_sum[m] = sum of the row's
//   codes over the real K.
// Integer result (exact, wrapping int32 arithmetic like the int32 reference):
//   sum_k (a - za)(w - zw) = dot(a', w) + P - zw * a_sum - za * Q.
#pragma once

#include <cstdint>

namespace dfqkern::cpu::gemm {

constexpr int kTileRows = 4;
constexpr int kChunkBytes = 32;

inline int chunk_k(int wbits) { return wbits == 2 ? 128 : (wbits == 8 ? 32 : 64); }
constexpr int kActOffset = 128;  // activation rows hold code - 128

struct Args {
  // activations: int8 a' rows, row stride lda
  const int8_t* a;
  int64_t lda;
  const int32_t* a_sum;
  const int32_t* a_zp;
  int64_t a_zp_step;  // 0: one zero point for all rows (per-tensor), 1: per row
  const float* a_scale;
  int64_t a_scale_step;
  // weights: this GEMM's tiles (a conv group's slice), nchunks chunks each
  const uint8_t* w;
  int64_t nchunks;
  int wbits;
  const int32_t* corr;    // [tiles][3][4]
  const float* w_scale;   // [n]
  const float* bias;      // [n] or null
  int64_t n;              // real rows; rows >= n in the last tile are padding
  // output: exactly one of out_i (exact int32) / out_f (fp32 epilogue); element (m, row) at m*ldo_m + row*ldo_n
  int32_t* out_i;
  float* out_f;
  int64_t ldo_m, ldo_n;
};

// Rows [m0, m1) x tiles [t0, t1) of the product.
void run_portable(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
void run_avx2(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
void run_avx512vnni(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);

// Row min / max of fp32 values (per-token activation ranges).
void minmax_portable(const float* x, int64_t n, float& lo, float& hi);
void minmax_avx2(const float* x, int64_t n, float& lo, float& hi);

// Shared epilogue for one tile: dots[m][r] of rows m0.. (count mr) and tile t (scalar / 4-wide SSE).
void finish_tile(const Args& g, int64_t m0, int mr, int64_t t, const int32_t (*dots)[kTileRows]);
void finish_tile_avx2(const Args& g, int64_t m0, int mr, int64_t t, const int32_t (*dots)[kTileRows]);

}  // namespace dfqkern::cpu::gemm
