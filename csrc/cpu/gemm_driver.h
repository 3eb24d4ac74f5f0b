// Helpers shared by the GEMM and conv drivers (portable code; includes ATen).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common.h"
#include "elementwise.h"
#include "gemm.h"

namespace dfqkern::cpu::gemm {

inline int64_t num_chunks(int64_t k, int wbits) { return (k + chunk_k(wbits) - 1) / chunk_k(wbits); }

// Which prepacked layout a correction table belongs to: kTileRows (cpu-tile-v1, [tiles, 3, 4]) or
// kPanel (cpu-panel-v1, [panels, 3, 16]).
inline int layout_rows(const at::Tensor& corr) { return corr.size(2) == kPanel ? kPanel : kTileRows; }

// Args::nchunks for the layout: 32-byte row chunks (tiles) or 64-byte K blocks (panels).
inline int64_t weight_blocks(int64_t k, int wbits, int group_rows) {
  return group_rows == kPanel ? (k + panel_k(wbits) - 1) / panel_k(wbits) : num_chunks(k, wbits);
}

// codes_to_act_row: gemm.h (gemm_pack.cpp).

// Quantizes `k` fp32 values with (inv, zp, qmax) into unsigned codes (ISA-dispatched ew::quantize);
// returns true when the values held a NaN or an Inf (detected in the same pass).
bool quantize_codes(const float* x, uint8_t* q, int64_t k, const ew::FqParams& p);

// The micro-kernel family of `isa` for one layout (tiles or panels).
Kernel pick_kernel(Isa isa, bool panels);
// Whether that family's epilogue applies Args::residual / relu (else the caller must run them after the kernel).
bool epilogue_applies_post(Isa isa, bool panels);

// Runs g over rows [0, m) and tiles [0, tiles) on torch's threads.
void run(const Args& g, int64_t m, int64_t tiles);

}  // namespace dfqkern::cpu::gemm
