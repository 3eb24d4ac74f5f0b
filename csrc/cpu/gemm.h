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
//
// Weight layout "cpu-panel-v1" (prepack_panels; cached in PackedWeight.cache["cpu"] next to the tile
// layout; never saved), used for M > 1 (Linear with several rows, every GEMM-path conv):
//   * rows in panels of kPanel = 16 consecutive rows (per conv group, padded with code-0 rows);
//   * K in blocks of panel_k(bits) = 4 * slots values; a block is 64 bytes, 4 bytes per panel row:
//       byte 4 * row + j holds k = 4 * s + j (block-relative) in bits [s * b, s * b + b), s = 0..8/b-1
//     so one 64-byte load, shift and mask give a zmm of 16 rows x 4 consecutive k (vpdpbusd's operand),
//     matching 4 consecutive activation bytes broadcast to every lane; K is padded up to whole blocks;
//   * memory order panels[panel][block][row in panel][4 bytes];
//   * corr[panel] = {P[16], zw[16], Q[16]} as for the tiles (the width of corr's last dimension, 4 or
//     16, tells the two layouts apart).
// The accumulators are then one int32 lane per (activation row, weight row): no horizontal sums and
// a 16-wide epilogue (the tile layout needs a horizontal sum per tile and activation row, which
// costs ~25% at K = 768). Activation rows are the same as above (kp is a multiple of panel_k).
#pragma once

#include <cstdint>

namespace dfqkern::cpu::gemm {

constexpr int kTileRows = 4;
constexpr int kChunkBytes = 32;
constexpr int kPanel = 16;        // cpu-panel-v1 rows per panel
constexpr int kBlockBytes = 64;   // cpu-panel-v1 bytes per K block of a panel

inline int chunk_k(int wbits) { return wbits == 2 ? 128 : (wbits == 8 ? 32 : 64); }
inline int panel_k(int wbits) { return wbits == 2 ? 16 : (wbits == 8 ? 4 : 8); }
constexpr int kActOffset = 128;  // activation rows hold code - 128
inline int slot_bits(int64_t bits) { return bits == 2 ? 2 : (bits == 8 ? 8 : 4); }  // kpack-lsb-v1 slot width

// Unsigned code k of a kpack-lsb-v1 row of `slot`-bit slots.
inline uint8_t kpack_code(const uint8_t* row, int64_t k, int slot) {
  const int per = 8 / slot;
  return static_cast<uint8_t>((row[k / per] >> ((k % per) * slot)) & ((1 << slot) - 1));
}

// Layout builders (gemm_pack.cpp, torch-free: prepack_weight / prepack_panels and the standalone
// kernel checks share them). Row `row` (k codes of `bits` bits, kpack-lsb-v1, zero point zp) of a
// weight goes to tile / panel `t`, row `r` in it, of zero-filled buffers w (nchunks chunks or K
// blocks per tile / panel) and corr ([tiles][3][4] or [panels][3][16]).
void pack_tile_row(const uint8_t* row, int bits, int64_t k, int32_t zp, int64_t t, int r, int64_t nchunks,
                   uint8_t* w, int32_t* corr);
void pack_panel_row(const uint8_t* row, int bits, int64_t k, int32_t zp, int64_t p, int r, int64_t nblocks,
                    uint8_t* w, int32_t* corr);
// Writes one activation row (kp int8 a' = code - 128, padded with code 0) from `k` unsigned codes;
// returns the sum of the codes.
int32_t codes_to_act_row(const uint8_t* codes, int64_t k, int64_t kp, int8_t* dst);

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
  int64_t nchunks;        // tile layout: 32-byte chunks per row; panel layout: 64-byte K blocks per panel
  int wbits;
  int group_rows;         // layout: kTileRows (cpu-tile-v1) or kPanel (cpu-panel-v1)
  const int32_t* corr;    // [tiles][3][4] or [panels][3][16]
  const float* w_scale;   // [n]
  const float* bias;      // [n] or null
  int64_t n;              // real rows; rows >= n in the last tile are padding
  // output: exactly one of out_i (exact int32) / out_f (fp32 epilogue); element (m, row) at m*ldo_m + row*ldo_n
  int32_t* out_i;
  float* out_f;
  int64_t ldo_m, ldo_n;
  // K in segments (implicit-GEMM convolution, cpu-panel-v1 only: one segment per kernel row, read in
  // place from a padded NHWC image): after every seg_blocks K blocks the activation pointer moves
  // seg_skip bytes beyond the blocks read. seg_blocks 0: one contiguous row (every other caller).
  int64_t seg_blocks, seg_skip;
  // fp32 output only, honoured by finish_panels / finish_panels_zmm (the conv driver sets them only for the
  // VNNI / AMX panel kernels): y = y + residual (element (m, row) at m*ldo_m + row*ldo_n, the same fp32 add as
  // torch's) and / or y = relu(y) (y < 0 ? 0 : y: NaN and -0 kept, as torch.relu), in the epilogue that writes y.
  const float* residual;
  bool relu;
};

// The activation step of the segments above, taken after each K block of a panel kernel's loop.
struct SegWalk {
  int64_t blocks, skip, left;
  explicit SegWalk(const Args& g) : blocks(g.seg_blocks), skip(g.seg_skip), left(g.seg_blocks) {}
  int64_t next() {
    if (--left != 0) return 0;
    left = blocks;
    return skip;
  }
};
// Offset of K block b of an activation row (the scalar kernels' form of SegWalk).
inline int64_t seg_offset(const Args& g, int64_t b) { return g.seg_blocks ? b / g.seg_blocks * g.seg_skip : 0; }

// A micro-kernel family's entry: rows [m0, m1) x tiles (or panels) [t0, t1).
using Kernel = void (*)(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);

// Rows [m0, m1) x tiles [t0, t1) of the product.
void run_portable(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
void run_avx2(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
void run_avx512vnni(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
void run_neon(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);     // aarch64 builds only
void run_dotprod(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1);  // aarch64 builds only

// cpu-panel-v1: rows [m0, m1) x panels [p0, p1).
void panels_portable(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void panels_avx2(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void panels_avx512vnni(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void panels_neon(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void panels_dotprod(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void panels_amx(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1);  // x86 with AMX-INT8 only
// The AVX-512 epilogue of mr (<= 16) rows x nv (<= 2) panels, dots[(i * nv + v) * kPanel + j] (x86 only).
void finish_panels_zmm(const Args& g, int64_t m0, int mr, int64_t p0, int nv, const int32_t* dots);
// Shared epilogue of mr activation rows x np panels (dots[i * ldd + j] for weight row j of panel p0's
// first row); scalar, the reference order of operations.
void finish_panels(const Args& g, int64_t m0, int mr, int64_t p0, int np, const int32_t* dots, int ldd);

// Row min / max of fp32 values (per-token activation ranges).
void minmax_portable(const float* x, int64_t n, float& lo, float& hi);
void minmax_avx2(const float* x, int64_t n, float& lo, float& hi);

// Shared epilogue for one tile: dots[m][r] of rows m0.. (count mr) and tile t (scalar / 4-wide SSE).
void finish_tile(const Args& g, int64_t m0, int mr, int64_t t, const int32_t (*dots)[kTileRows]);
void finish_tile_avx2(const Args& g, int64_t m0, int mr, int64_t t, const int32_t (*dots)[kTileRows]);

}  // namespace dfqkern::cpu::gemm
