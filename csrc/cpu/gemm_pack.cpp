// Torch-free layout builders of the packed GEMM (cpu-tile-v1, cpu-panel-v1, activation rows; see
// gemm.h). The ATen drivers (gemm.cpp) and the standalone kernel checks both build layouts here.
#include <algorithm>

#include "gemm.h"

namespace dfqkern::cpu::gemm {

namespace {

// Zero-point corrections of one weight row: P = act_offset * sum, zw, Q = sum - k * zw.
inline void store_corr(int32_t* c3, int stride, int64_t sum, int64_t k, int32_t zp) {
  c3[0] = static_cast<int32_t>(kActOffset * sum);
  c3[stride] = zp;
  c3[2 * stride] = static_cast<int32_t>(sum - k * static_cast<int64_t>(zp));
}

inline int kernel_bits(int bits) { return bits == 3 ? 4 : bits; }

}  // namespace

void pack_tile_row(const uint8_t* row, int bits, int64_t k, int32_t zp, int64_t t, int r, int64_t nchunks,
                   uint8_t* w, int32_t* corr) {
  const int wb = kernel_bits(bits), slot = slot_bits(bits), ck = chunk_k(wb);
  int64_t sum = 0;
  for (int64_t kk = 0; kk < k; ++kk) {
    const uint8_t c = kpack_code(row, kk, slot);
    sum += c;
    const int64_t chunk = kk / ck, within = kk % ck;
    uint8_t* chunk_row = w + ((t * nchunks + chunk) * kTileRows + r) * kChunkBytes;
    if (wb == 8) chunk_row[within] = c;
    else if (wb == 2) chunk_row[within % 32] |= static_cast<uint8_t>(c << (2 * (within / 32)));
    else chunk_row[within % 32] |= static_cast<uint8_t>(c << (4 * (within / 32)));
  }
  store_corr(corr + t * 3 * kTileRows + r, kTileRows, sum, k, zp);
}

void pack_panel_row(const uint8_t* row, int bits, int64_t k, int32_t zp, int64_t p, int r, int64_t nblocks,
                    uint8_t* w, int32_t* corr) {
  const int wb = kernel_bits(bits), slot = slot_bits(bits), kb = panel_k(wb);
  uint8_t* prow = w + p * nblocks * kBlockBytes + 4 * r;
  int64_t sum = 0;
  for (int64_t kk = 0; kk < k; ++kk) {
    const uint8_t c = kpack_code(row, kk, slot);
    sum += c;
    const int64_t within = kk % kb;  // slot within / 4, byte within % 4
    prow[(kk / kb) * kBlockBytes + within % 4] |= static_cast<uint8_t>(c << (wb * (within / 4)));
  }
  store_corr(corr + p * 3 * kPanel + r, kPanel, sum, k, zp);
}

int32_t codes_to_act_row(const uint8_t* codes, int64_t k, int64_t kp, int8_t* dst) {
  int32_t sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    dst[i] = static_cast<int8_t>(codes[i] ^ 0x80);  // code - 128
    sum += codes[i];
  }
  std::fill(dst + k, dst + kp, int8_t(-128));  // code 0
  return sum;
}

}  // namespace dfqkern::cpu::gemm
