// AMX-INT8 packed GEMM on the cpu-panel-v1 layout (Intel Xeon Sapphire Rapids and later): one tdpbsud
// multiplies 16 activation rows x 64 k (signed a') by 64 k x 16 weight rows (unsigned codes) into a
// 16 x 16 int32 tile, 16 K multiply-adds per instruction against vpdpbusd's 64.
//
// A cpu-panel-v1 K block of an 8-bit weight (16 weight rows x 4 consecutive k, 64 bytes) is exactly
// one row of the B tile operand, so 8-bit panels are read in place. A 2/3/4-bit block holds one such
// row per slot (slot s = bits [s * b, s * b + b) of every byte = k 4s..4s+3 of the block); those
// panels are unpacked per call into a thread-local int8 copy (one byte per code, same row order),
// shared by every 16-row block of the call (calls of fewer rows go to the VNNI kernel); convs and Linear
// layers read a prepacked one-byte-per-code copy instead.
// K runs in the activation rows' segments (implicit-GEMM convolution: one per kernel row; otherwise
// one segment of the whole row); per segment, 64-k steps and one tail step of the remainder (a
// multiple of 4 k), each with its own tile shape. The int32 sums go through the AVX-512 panel
// epilogue (finish_panels_zmm), so every output is the VNNI kernels' bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "gemm.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")

namespace dfqkern::cpu::gemm {
namespace {

// ldtilecfg's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tile registers (the tile intrinsics take literal numbers, so panels_amx spells them out): accumulators of the
// two panels 0 / 1, A 2 (64 k) / 3 (tail), B 4 / 5 (64 k of the two panels) and 6 / 7 (tail).
enum : int { kC0 = 0, kC1 = 1, kA = 2, kAt = 3, kB0 = 4, kB1 = 5, kBt0 = 6, kBt1 = 7 };

// Loads the tile shapes for mr activation rows and a K tail of `tail` bytes, unless the thread's tiles hold
// them already (ldtilecfg costs ~50 ns, reading the configuration back ~7; a conv calls the GEMM once per
// output row). Compared with the live configuration, not a remembered one: other code on this thread (oneDNN)
// may have configured the tiles since.
void configure(int mr, int tail) {
  TileConfig c, now;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  const auto set = [&c](int t, int rows, int bytes) {
    c.rows[t] = static_cast<uint8_t>(rows);
    c.colsb[t] = static_cast<uint16_t>(bytes);
  };
  set(kC0, mr, 64);
  set(kC1, mr, 64);
  set(kA, mr, 64);
  set(kB0, 16, 64);
  set(kB1, 16, 64);
  if (tail) {
    set(kAt, mr, tail);
    set(kBt0, tail / 4, 64);
    set(kBt1, tail / 4, 64);
  }
  _tile_storeconfig(&now);
  if (std::memcmp(&c, &now, sizeof c) != 0) _tile_loadconfig(&c);
}

// Grow-only per-thread buffer for the unpacked panels (kept across calls: no allocation per call).
uint8_t* unpack_buffer(size_t bytes) {
  thread_local std::unique_ptr<uint8_t[]> buf;
  thread_local size_t cap = 0;
  if (bytes > cap) {
    buf.reset(new uint8_t[bytes]);
    cap = bytes;
  }
  return buf.get();
}

// Panel p's weight as B tile rows (64 bytes = 16 weight rows x 4 k each, row r = k 4r..4r+3).
const uint8_t* panel_rows_b(const Args& g, int64_t p, uint8_t* dst) {
  const uint8_t* w = g.w + p * g.nchunks * kBlockBytes;
  if (g.wbits == 8) return w;
  const int sb = slot_bits(g.wbits), slots = 8 / sb;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << sb) - 1));
  uint8_t* o = dst;
  for (int64_t b = 0; b < g.nchunks; ++b) {
    const __m512i v = _mm512_loadu_si512(w + b * kBlockBytes);
    // a 16-bit shift moves the next byte's low bits in above bit 8 - s * sb; the mask keeps sb bits
    for (int s = 0; s < slots; ++s, o += kBlockBytes)
      _mm512_storeu_si512(o, _mm512_and_si512(s ? _mm512_srli_epi16(v, s * sb) : v, mask));
  }
  return dst;
}

}  // namespace

// One K step of panels_amx: A tile TA (activation rows at `as`), B tiles TB0 / TB1 (the two panels' rows from
// `brow`) into accumulators 0 / 1. A macro because the tile intrinsics stringify their tile numbers: an outer
// macro's arguments are substituted as literals first, a function's or template's would not be.
#define DFQKERN_AMX_STEP(TA, TB0, TB1)      \
  do {                                      \
    _tile_loadd(TA, as, lda);               \
    _tile_loadd(TB0, b0 + brow * 64, 64);   \
    _tile_dpbsud(0, TA, TB0);               \
    if (nv == 2) {                          \
      _tile_loadd(TB1, b1 + brow * 64, 64); \
      _tile_dpbsud(1, TA, TB1);             \
    }                                       \
  } while (0)

void panels_amx(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m0 >= m1 || p0 >= p1) return;
  // Unpacking 2/3/4-bit panels for one 16-row block costs about what the tiles save on it (the callers that
  // care read the one-byte-per-code copy instead, see dfqkern.kernels.cpu.byte_panel_weight).
  constexpr int64_t kUnpackMinRows = 2 * kPanel;
  if (g.wbits != 8 && m1 - m0 < kUnpackMinRows) return panels_avx512vnni(g, m0, m1, p0, p1);
  const int64_t kp = g.nchunks * panel_k(g.wbits);  // activation bytes a row reads
  const int64_t seg_len = g.seg_blocks ? g.seg_blocks * panel_k(g.wbits) : kp;
  const int64_t nseg = (kp + seg_len - 1) / seg_len, last_len = kp - (nseg - 1) * seg_len;  // last may be short
  const int64_t seg_step = seg_len + (g.seg_blocks ? g.seg_skip : 0);  // activation bytes segment to segment
  // One tail shape per call (reconfiguring the tiles would clear the accumulators): a short last segment
  // whose remainder differs from the others' goes to the VNNI kernel (the convs' segments are all equal).
  const int seg_tail = static_cast<int>(seg_len % 64), last_tail = static_cast<int>(last_len % 64);
  if (seg_tail && last_tail && seg_tail != last_tail) return panels_avx512vnni(g, m0, m1, p0, p1);
  const int tail = seg_tail ? seg_tail : last_tail;
  const int64_t panel_b_bytes = kp * kPanel;  // one panel's unpacked B rows
  uint8_t* const buf = g.wbits == 8 ? nullptr : unpack_buffer(static_cast<size_t>(2 * panel_b_bytes));
  const int64_t lda = g.lda;
  alignas(64) int32_t dots[kPanel * 2 * kPanel];
  int shape = -1;
  for (int64_t p = p0; p < p1; p += 2) {
    const int nv = p + 2 <= p1 ? 2 : 1;
    const uint8_t* const b0 = panel_rows_b(g, p, buf);
    const uint8_t* const b1 = nv == 2 ? panel_rows_b(g, p + 1, buf ? buf + panel_b_bytes : nullptr) : nullptr;
    for (int64_t m = m0; m < m1; m += kPanel) {
      const int mr = static_cast<int>(std::min<int64_t>(kPanel, m1 - m));
      if (mr != shape) {
        configure(mr, tail);
        shape = mr;
      }
      _tile_zero(0);
      _tile_zero(1);
      const int8_t* const a = g.a + m * lda;
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t len = s + 1 < nseg ? seg_len : last_len;
        const int8_t* as = a + s * seg_step;
        int64_t brow = s * seg_len / 4;  // B row of the segment's first k
        for (int64_t f = 0; f < len / 64; ++f, as += 64, brow += 16) DFQKERN_AMX_STEP(2, 4, 5);
        if (len % 64) DFQKERN_AMX_STEP(3, 6, 7);
      }
      _tile_stored(0, dots, nv * kPanel * 4);
      if (nv == 2) _tile_stored(1, dots + kPanel, nv * kPanel * 4);
      finish_panels_zmm(g, m, mr, p, nv, dots);
    }
  }
  // The tiles stay configured (see configure); their 8 KiB of state is saved at a context switch, which
  // costs less than configuring them again in every call.
}

#undef DFQKERN_AMX_STEP

}  // namespace dfqkern::cpu::gemm
