// Tensor-core packed GEMM / implicit-GEMM conv for W2/W4 x A4/A8 (one template, three paths).
//
// Math. Activations are unsigned codes a in [0, 2^abits) with zero point za (per tensor or per
// token), weights unsigned codes w with per-row zero point zw. The exact result is
//     acc[m, n] = sum_k (a[m, k] - za[m]) * (w[n, k] - zw[n]).
// * A8 and A4I8 paths: A enters the mma as u8, B as s8 (w - zw, exact: |w - zw| <= 15), so
//       acc = sum_k a * (w - zw) - za[m] * w_sum[n],   w_sum[n] = sum_k (w[n, k] - zw[n]).
// * A4I4 path: A enters as u4, B as s4 (w - c) with the slot's center c (8 for 4-bit slots, 2 for
//   2-bit slots; w - zw itself may not fit s4), so additionally
//       acc += (c - zw[n]) * rowsum_a[m]        (w_cdelta = c - zw; zero for symmetric weights)
//   with rowsum_a summed in-kernel from the very fragments fed to the mma.
// Padding never needs a correction: weight slots past K hold zw (they decode to w - zw = 0, and in
// the A4I4 identity above any finite a cancels), conv taps outside the image are filled with za.
//
// Weight layouts (built once per weight by dfqkern/kernels/cuda.py, cached in pw.cache["cuda"]).
// The padded weight [ceil(N/8)*8, Kp] (Kp a multiple of the chunk KC = 512 / slot_bits) is stored
// as [N/8 n-tiles][Kp/KC chunks][32 lanes][16 bytes]: lane (g, q) of a warp owns row 8*tile + g and
// its 16 bytes hold, as four little-endian 32-bit words of LSB-first slots, exactly the B-fragment
// codes it needs for the whole chunk, ordered so every operand register is one shift + one mask:
//   "i8" layout (A8, m16n8k32), chunk = 4 (W4) or 8 (W2) k32-steps:
//     W4: word w = step w, nibble 2b+j  = k 32w + 16j + 4q + b     (reg j = (word >> 4j) & 0x0F0F0F0F)
//     W2: word w = steps 2w, 2w+1, slot 4b+j = k 32(2w + j/2) + 16(j%2) + 4q + b
//                                                                  (reg of step 2w+t, half h = (word >> 2(2t+h)) & 0x03030303)
//   "i4" layout (A4, m16n8k64 or two m16n8k32), chunk = 2 (W4) or 4 (W2) k64-steps:
//     W4: word w: nibble p = k 64(w/2) + 32(w%2) + 8q + p          (b0 = word[2s], b1 = word[2s+1])
//     W2: word w = step w, slot 2p+h = k 64w + 32h + 8q + p        (b_h nibbles = (word >> 2h) & 0x33333333)
//   The A4I8 path reads the same "i4" words as bytes: (word >> 4t) & 0x0F0F0F0F (W4) or
//   (word >> 2j) & 0x03030303 (W2) give the codes of k = 8q + 2b + t (and 32 + ...), which is the
//   order in which it unpacks the activation nibbles (low nibbles first mma, high nibbles second).
//
// Tiling: block tile BM x BN, K stage = one chunk; A (and the conv's im2col gather) and B are
// copied global -> shared with cp.async in a STAGES-deep ring; A fragments come from ldmatrix.x4
// (row stride padded by 16 bytes: conflict-free), B from one 16-byte shared load per n-tile per
// stage. Split-K over gridDim.z accumulates int32 atomically into a workspace.
#pragma once

#include "common.cuh"
#include "launch.h"

namespace dfqkern::cuda {

template <int BM_, int BN_, int WM_, int WN_, int STAGES_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int THREADS = 32 * WM * WN;
  static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
  static constexpr int MT = WTM / 16, NT = WTN / 8;   // mma tiles per warp
  static_assert(WTM % 16 == 0 && WTN % 8 == 0, "warp tile must be whole m16n8 tiles");
};

// Small M (decode-like, <= 16 rows): 4 warps side by side along N, deep pipeline.
using SmallTile = TileConfig<16, 64, 1, 4, 4>;
// Everything else: 8 warps, 32x32 warp tiles.
using LargeTile = TileConfig<64, 128, 2, 4, 3>;

template <int PATH, int SB>
struct PathTraits {
  static_assert(SB == 2 || SB == 4, "weight slot bits must be 2 or 4");
  static constexpr int ABITS = PATH == kPathA8 ? 8 : 4;
  static constexpr int KC = 512 / SB;                        // K elements per chunk (= per stage)
  static constexpr int A_ROW_BYTES = KC * ABITS / 8;          // activation bytes per row per stage
  static constexpr int A_STRIDE = A_ROW_BYTES + 16;          // shared row stride: (odd) x 16 bytes
  static constexpr int K_STEP = PATH == kPathA8 ? 32 : 64;   // K per ldmatrix.x4 (32 bytes per row)
  static constexpr int STEPS = KC / K_STEP;
};

// One K step for all (mt, nt) tiles of a warp: decode the B registers from the chunk words and
// issue the mma(s). `s` is a compile-time constant after unrolling, so bw[] stays in registers.
template <int PATH, int SB, int MT, int NT>
__device__ __forceinline__ void mma_step(int (&acc)[MT][NT][4], const uint32_t (&a)[MT][4],
                                         const uint32_t (&bw)[NT][4], const uint32_t (&zero4)[NT], int s) {
  if constexpr (PATH == kPathA8) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b0, b1;
      if constexpr (SB == 4) {
        const uint32_t w = bw[nt][s];
        b0 = codes_minus_zero(w & 0x0F0F0F0Fu, zero4[nt]);
        b1 = codes_minus_zero((w >> 4) & 0x0F0F0F0Fu, zero4[nt]);
      } else {
        const uint32_t w = bw[nt][s >> 1];
        const int sh = 4 * (s & 1);
        b0 = codes_minus_zero((w >> sh) & 0x03030303u, zero4[nt]);
        b1 = codes_minus_zero((w >> (sh + 2)) & 0x03030303u, zero4[nt]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_u8s8(acc[mt][nt], a[mt], b0, b1);
    }
  } else if constexpr (PATH == kPathA4I4) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b0, b1;
      if constexpr (SB == 4) {  // code ^ 8 is the s4 two's complement of code - 8
        b0 = bw[nt][2 * s] ^ 0x88888888u;
        b1 = bw[nt][2 * s + 1] ^ 0x88888888u;
      } else {
        const uint32_t w = bw[nt][s];
        b0 = u2_nibbles_to_s4_centered(w & 0x33333333u);
        b1 = u2_nibbles_to_s4_centered((w >> 2) & 0x33333333u);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_u4s4(acc[mt][nt], a[mt], b0, b1);
    }
  } else {  // kPathA4I8: the k64 step becomes two k32 mmas over low and high nibbles
    uint32_t alo[MT][4], ahi[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        alo[mt][r] = a[mt][r] & 0x0F0F0F0Fu;
        ahi[mt][r] = (a[mt][r] >> 4) & 0x0F0F0F0Fu;
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t lo0, lo1, hi0, hi1;
      if constexpr (SB == 4) {
        const uint32_t w0 = bw[nt][2 * s], w1 = bw[nt][2 * s + 1];
        lo0 = codes_minus_zero(w0 & 0x0F0F0F0Fu, zero4[nt]);
        lo1 = codes_minus_zero(w1 & 0x0F0F0F0Fu, zero4[nt]);
        hi0 = codes_minus_zero((w0 >> 4) & 0x0F0F0F0Fu, zero4[nt]);
        hi1 = codes_minus_zero((w1 >> 4) & 0x0F0F0F0Fu, zero4[nt]);
      } else {
        const uint32_t w = bw[nt][s];
        lo0 = codes_minus_zero(w & 0x03030303u, zero4[nt]);
        lo1 = codes_minus_zero((w >> 2) & 0x03030303u, zero4[nt]);
        hi0 = codes_minus_zero((w >> 4) & 0x03030303u, zero4[nt]);
        hi1 = codes_minus_zero((w >> 6) & 0x03030303u, zero4[nt]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_u8s8(acc[mt][nt], alo[mt], lo0, lo1);
        mma_u8s8(acc[mt][nt], ahi[mt], hi0, hi1);
      }
    }
  }
}

// The activation mark of GEMM row `row` (see GemmArgs::a_mark): 0, or NaN when the row (dense) or the
// output pixel's window (conv) held a NaN / Inf.
__device__ __forceinline__ float row_mark(const GemmArgs& p, int row) {
  if (!p.conv) return p.a_mark[row];
  const int ow = row % p.OW, t = row / p.OW, oh = t % p.OH, n = t / p.OH;
  return window_mark(p.a_mark, n, oh, ow, p.H, p.W, p.KH, p.KW, p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dil_h,
                     p.dil_w);
}

template <class Cfg, int PATH, int SB, bool CONV>
__global__ void __launch_bounds__(Cfg::THREADS) packed_gemm_kernel(const GemmArgs p) {
  using T = PathTraits<PATH, SB>;
  constexpr int MT = Cfg::MT, NT = Cfg::NT;
  constexpr int A_STAGE = Cfg::BM * T::A_STRIDE;
  constexpr int B_STAGE = (Cfg::BN / 8) * 512;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* sA = smem;
  uint8_t* sB = smem + Cfg::STAGES * A_STAGE;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % Cfg::WM, warp_n = warp / Cfg::WM;
  const int m0 = blockIdx.x * Cfg::BM, n0 = blockIdx.y * Cfg::BN;
  const int n_tiles = (p.N + 7) / 8;

  const int per_split = (p.k_chunks + p.split_k - 1) / p.split_k;
  const int kc_begin = blockIdx.z * per_split;
  const int num_kc = max(0, min(p.k_chunks, kc_begin + per_split) - kc_begin);
  // Conv taps outside the image hold the zero point (so a - za = 0), replicated per byte / nibble.
  uint32_t pad_fill = 0;
  if constexpr (CONV) {
    const uint32_t za = static_cast<uint32_t>(p.a_zp[0]);
    pad_fill = (T::ABITS == 8 ? za : (za | (za << 4))) * 0x01010101u;
  }

  // Issue the cp.async copies (and direct fills) of K chunk `kc` into ring slot `slot`.
  auto load_stage = [&](int slot, int kc) {
    uint8_t* a_dst = sA + slot * A_STAGE;
    constexpr int CPR = T::A_ROW_BYTES / 16;  // 16-byte chunks per row
    for (int i = tid; i < Cfg::BM * CPR; i += Cfg::THREADS) {
      const int r = i / CPR, c = i % CPR, m = m0 + r;
      uint8_t* dst = a_dst + r * T::A_STRIDE + c * 16;
      if constexpr (!CONV) {
        const int64_t kb = int64_t(kc) * T::A_ROW_BYTES + c * 16;
        if (m < p.M && kb < p.lda)
          cp_async16(dst, p.a + int64_t(m) * p.lda + kb);
        else
          st_shared16(dst, 0u);
      } else {
        // im2col on the fly: K runs over (kh, kw, channel); a 16-byte chunk never straddles a tap
        // because c_padded * abits / 8 is a multiple of 16.
        const int k = kc * T::KC + c * (128 / T::ABITS);
        const int tap = k / p.c_padded;
        if (m >= p.M || tap >= p.KH * p.KW) {
          st_shared16(dst, 0u);
          continue;
        }
        const int ch = k - tap * p.c_padded;
        const int kh = tap / p.KW, kw = tap - kh * p.KW;
        const int ohw = p.OH * p.OW;
        const int img = m / ohw, rem = m - img * ohw;
        const int oh = rem / p.OW, ow = rem - oh * p.OW;
        const int iy = oh * p.stride_h - p.pad_h + kh * p.dil_h;
        const int ix = ow * p.stride_w - p.pad_w + kw * p.dil_w;
        if (iy < 0 || iy >= p.H || ix < 0 || ix >= p.W) {
          st_shared16(dst, pad_fill);  // zero padding of (a - za) means a = za
          continue;
        }
        cp_async16(dst, p.a + ((int64_t(img) * p.H + iy) * p.W + ix) * p.pixel_bytes + ch * T::ABITS / 8);
      }
    }
    uint8_t* b_dst = sB + slot * B_STAGE;
    for (int i = tid; i < (Cfg::BN / 8) * 32; i += Cfg::THREADS) {
      const int nt = n0 / 8 + (i >> 5);
      uint8_t* dst = b_dst + i * 16;
      if (nt < n_tiles)
        cp_async16(dst, p.w + (int64_t(nt) * p.k_chunks + kc) * 512 + (i & 31) * 16);
      else
        st_shared16(dst, 0u);
    }
  };

  int acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0;
  int rowsum[MT][2];  // A4I4: this thread's share of sum_k a[row][k] for rows g and g+8
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) rowsum[mt][0] = rowsum[mt][1] = 0;

  uint32_t zero4[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int n = n0 + (warp_n * NT + nt) * 8 + (lane >> 2);
    zero4[nt] = (PATH != kPathA4I4 && n < p.N) ? p.w_zero4[n] : 0u;
  }

#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < num_kc) load_stage(s, kc_begin + s);
    cp_async_commit();
  }

  for (int it = 0; it < num_kc; ++it) {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();  // chunk `it` landed for everyone; slot of chunk it-1 is free again
    const int pf = it + Cfg::STAGES - 1;
    if (pf < num_kc) load_stage(pf % Cfg::STAGES, kc_begin + pf);
    cp_async_commit();

    const int slot = it % Cfg::STAGES;
    const uint8_t* a_buf = sA + slot * A_STAGE;
    const uint8_t* b_buf = sB + slot * B_STAGE;
    uint32_t bw[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4 v = *reinterpret_cast<const uint4*>(b_buf + ((warp_n * NT + nt) * 32 + lane) * 16);
      bw[nt][0] = v.x;
      bw[nt][1] = v.y;
      bw[nt][2] = v.z;
      bw[nt][3] = v.w;
    }
#pragma unroll
    for (int s = 0; s < T::STEPS; ++s) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], a_buf + (warp_m * Cfg::WTM + mt * 16 + (lane & 15)) * T::A_STRIDE + s * 32 + (lane >> 4) * 16);
      if constexpr (PATH == kPathA4I4) {
        if (p.need_row_sums) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            rowsum[mt][0] += nibble_sum(a[mt][0]) + nibble_sum(a[mt][2]);
            rowsum[mt][1] += nibble_sum(a[mt][1]) + nibble_sum(a[mt][3]);
          }
        }
      }
      mma_step<PATH, SB, MT, NT>(acc, a, bw, zero4, s);
    }
  }
  cp_async_wait<0>();

  if constexpr (PATH == kPathA4I4) {  // the quad (q = 0..3) together covers every k of a row
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        rowsum[mt][h] += __shfl_xor_sync(0xffffffffu, rowsum[mt][h], 1);
        rowsum[mt][h] += __shfl_xor_sync(0xffffffffu, rowsum[mt][h], 2);
      }
  }

  // Epilogue: corrections, then int32 / scaled float stores (or int32 atomics for split-K).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_m * Cfg::WTM + mt * 16 + (lane >> 2) + 8 * h;
      if (row >= p.M) continue;
      const int za = p.a_zp[p.a_zp_per_row ? row : 0];
      float sa = p.a_scale != nullptr ? p.a_scale[p.a_scale_per_row ? row : 0] : 0.0f;
      if (p.a_scale != nullptr && p.a_mark != nullptr) sa = __fadd_rn(sa, row_mark(p, row));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = n0 + (warp_n * NT + nt) * 8 + 2 * (lane & 3) + j;
          if (col >= p.N) continue;
          int v = acc[mt][nt][2 * h + j];
          if constexpr (PATH == kPathA4I4) {
            if (p.need_row_sums) v += p.w_cdelta[col] * rowsum[mt][h];
          }
          if (blockIdx.z == 0) v -= za * p.w_sum[col];
          const int64_t idx = int64_t(row) * p.N + col;
          if (p.split_k > 1)
            atomicAdd(p.workspace + idx, v);
          else if (p.a_scale == nullptr)
            static_cast<int32_t*>(p.out)[idx] = v;
          else
            store_out(p.out, idx, dequant_epilogue(v, sa, p.w_scale[col], p.bias, col), p.out_type);
        }
      }
    }
  }
}

template <class Cfg, int PATH, int SB>
constexpr int gemm_smem_bytes() {
  using T = PathTraits<PATH, SB>;
  return Cfg::STAGES * (Cfg::BM * T::A_STRIDE + (Cfg::BN / 8) * 512);
}

template <class Cfg, int PATH, int SB, bool CONV>
cudaError_t run_gemm(const GemmArgs& p, cudaStream_t stream) {
  constexpr int smem = gemm_smem_bytes<Cfg, PATH, SB>();
  auto kernel = packed_gemm_kernel<Cfg, PATH, SB, CONV>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.M + Cfg::BM - 1) / Cfg::BM, (p.N + Cfg::BN - 1) / Cfg::BN, p.split_k);
  kernel<<<grid, Cfg::THREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

// The tile used for M rows (shared by the launcher and the split-K choice).
inline bool use_small_tile(int M) { return M <= SmallTile::BM; }

template <int PATH, int SB>
cudaError_t run_gemm_path(const GemmArgs& p, cudaStream_t stream) {
  if (use_small_tile(p.M))
    return p.conv ? run_gemm<SmallTile, PATH, SB, true>(p, stream) : run_gemm<SmallTile, PATH, SB, false>(p, stream);
  return p.conv ? run_gemm<LargeTile, PATH, SB, true>(p, stream) : run_gemm<LargeTile, PATH, SB, false>(p, stream);
}

// One translation unit per path (gemm_a8.cu, gemm_a4i4.cu, gemm_a4i8.cu) so the build parallelises.
cudaError_t launch_gemm_a8(const GemmArgs& p, int slot_bits, cudaStream_t stream);
cudaError_t launch_gemm_a4i4(const GemmArgs& p, int slot_bits, cudaStream_t stream);
cudaError_t launch_gemm_a4i8(const GemmArgs& p, int slot_bits, cudaStream_t stream);

}  // namespace dfqkern::cuda
