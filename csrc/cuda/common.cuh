// Device helpers shared by the dfqkern CUDA kernels: PTX wrappers (cp.async, ldmatrix, mma.sync),
// the register-level weight decoders and IEEE-exact float helpers.
//
// ---------------------------------------------------------------------------------------------
// Fragment layouts relied on (PTX ISA, "Matrix Fragments for mma.m16n8k32" / "mma.m16n8k64").
// lane = threadIdx.x % 32, g = lane >> 2 ("groupID"), q = lane & 3 ("threadID_in_group").
//
// m16n8k32, .u8/.s8 (A 16x32 row-major, B 32x8 column-major, four 8-bit elements per .b32):
//   A: a[0] = A[g   ][4q .. 4q+3]      a[1] = A[g+8][4q .. 4q+3]
//      a[2] = A[g   ][16+4q .. 16+4q+3] a[3] = A[g+8][16+4q .. 16+4q+3]
//   B: b[0] = B[4q .. 4q+3][g]         b[1] = B[16+4q .. 16+4q+3][g]
// m16n8k64, .u4/.s4 (eight 4-bit elements per .b32):
//   A: a[0] = A[g   ][8q .. 8q+7]       a[1] = A[g+8][8q .. 8q+7]
//      a[2] = A[g   ][32+8q .. 32+8q+7] a[3] = A[g+8][32+8q .. 32+8q+7]
//   B: b[0] = B[8q .. 8q+7][g]          b[1] = B[32+8q .. 32+8q+7][g]
// C/D (s32, both shapes): c[0] = C[g][2q], c[1] = C[g][2q+1], c[2] = C[g+8][2q], c[3] = C[g+8][2q+1].
// Within a register the element with the lower index sits in the lower bits, for A and B alike;
// the kernels only rely on A and B using the *same* convention (a consistent permutation of k
// inside one mma cancels in the dot product).
//
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j .. 8j+7 give the row addresses (16 bytes
// each) of matrix j; thread t receives, in register j, the 32-bit word (t % 4) of row (t / 4) of
// matrix j. With lane l pointing at tile row (l & 15), byte column 16 * (l >> 4), thread t gets
// reg0 = row g bytes 4q..4q+3, reg1 = row g+8 (same bytes), reg2 = row g bytes 16+4q.., reg3 =
// row g+8 bytes 16+4q.. of a 16-row x 32-byte tile: exactly the A fragment of m16n8k32 (u8, one
// byte per element) and of m16n8k64 (u4, two elements per byte, low nibble = lower k, which is
// the kpack-lsb-v1 activation layout).
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/lowbias32.h"
#include "launch.h"

namespace dfqkern::cuda {

// ---------------------------------------------------------------- async copies and ldmatrix

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg); both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void st_shared16(void* smem, uint32_t fill) {
  *reinterpret_cast<uint4*>(smem) = make_uint4(fill, fill, fill, fill);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// ---------------------------------------------------------------- tensor-core mma

// D += A(16x32 u8, row) * B(32x8 s8, col)
__device__ __forceinline__ void mma_u8s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D += A(16x64 u4, row) * B(64x8 s4, col). Native on sm_80/86/87/89; sm_90 emulates it (slowly)
// with 8-bit IMMA, which is why A4 on sm_90 takes the unpack-to-int8 path instead.
__device__ __forceinline__ void mma_u4s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------- register-level decoders
// The weight layouts (see gemm.cuh) put each thread's codes in 32-bit words so that every
// operand register comes out of one shift and one mask.

// Four 4-bit codes in the low nibbles of each byte minus the row's zero point, per byte:
// unsigned codes -> signed int8 (w - z) for the u8 x s8 mma. zero4 = z * 0x01010101.
__device__ __forceinline__ uint32_t codes_minus_zero(uint32_t bytes, uint32_t zero4) {
  return __vsub4(bytes, zero4);
}

// Eight 2-bit codes held one per nibble (values 0..3) -> s4 nibbles of (code - 2).
// (code ^ 2) is the 2-bit two's complement of code - 2; its bit 1 is the sign, copied to bits 2, 3.
__device__ __forceinline__ uint32_t u2_nibbles_to_s4_centered(uint32_t u) {
  const uint32_t v = u ^ 0x22222222u;
  const uint32_t sign = (v >> 1) & 0x11111111u;
  return v | (sign * 12u);  // sign * 0b1100 per nibble; no carries (each nibble product <= 12)
}

// Sum of the eight 4-bit fields of x (0 .. 120).
__device__ __forceinline__ int nibble_sum(uint32_t x) {
  const uint32_t pairs = (x & 0x0F0F0F0Fu) + ((x >> 4) & 0x0F0F0F0Fu);  // four bytes, each <= 30
  return __dp4a(pairs, 0x01010101u, 0u);
}

// ---------------------------------------------------------------- IEEE-exact float helpers
// The build uses --use_fast_math (contraction, approximate division); the quantizer math must
// match torch bit for bit, so it spells every rounding out.

__device__ __forceinline__ float quant_code(float x, float inv_scale, float zp, float qmax) {
  const float q = __fadd_rn(rintf(__fmul_rn(x, inv_scale)), zp);  // round half even, then + zp
  return fminf(fmaxf(q, 0.0f), qmax);
}

// NaN or +-Inf (exponent bits all set); a bit test, immune to --use_fast_math.
__device__ __forceinline__ bool nonfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// Sum of (mark - mark) over the input pixels of output pixel (n, oh, ow)'s window: 0, or NaN when the
// window covers a pixel marked NaN (marks: fp32 [N*H*W], 0 or NaN). Padding taps are skipped.
__device__ __forceinline__ float window_mark(const float* mark, int n, int oh, int ow, int H, int W, int KH, int KW,
                                             int sh, int sw, int ph, int pw, int dh, int dw) {
  float s = 0.0f;
  for (int kh = 0; kh < KH; ++kh) {
    const int iy = oh * sh - ph + kh * dh;
    if (iy < 0 || iy >= H) continue;
    for (int kw = 0; kw < KW; ++kw) {
      const int ix = ow * sw - pw + kw * dw;
      if (ix < 0 || ix >= W) continue;
      const float m = mark[(int64_t(n) * H + iy) * W + ix];
      s = __fadd_rn(s, __fsub_rn(m, m));
    }
  }
  return s;
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ void store_out(void* out, int64_t idx, float v, int out_type) {
  switch (out_type) {
    case kOutF16: static_cast<__half*>(out)[idx] = __float2half_rn(v); break;
    case kOutBF16: static_cast<__nv_bfloat16*>(out)[idx] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(out)[idx] = v; break;
  }
}

// y = acc * (a_scale * w_scale) + bias, in the reference's order of float32 roundings.
__device__ __forceinline__ float dequant_epilogue(int acc, float a_scale, float w_scale, const float* bias, int n) {
  float y = __fmul_rn(__int2float_rn(acc), __fmul_rn(a_scale, w_scale));
  if (bias != nullptr) y = __fadd_rn(y, bias[n]);
  return y;
}

// ---------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); result valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* scratch /* >= 32 floats */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.0f;
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Per-channel reductions view a contiguous tensor as [outer, channels, inner]; block (c, y) walks
// elements j = y * blockDim + t, += gridDim.y * blockDim of channel c.
__device__ __forceinline__ int64_t channel_element(int64_t j, int c, int channels, int64_t inner) {
  const int64_t o = j / inner;
  return (o * channels + c) * inner + (j - o * inner);
}

inline dim3 per_channel_grid(int64_t numel, int channels, int threads) {
  const int64_t per_channel = numel / channels;
  const int64_t items = int64_t(threads) * 8;  // >= 8 elements per thread before one atomic per block
  const int64_t y = (per_channel + items - 1) / items;
  return dim3(static_cast<unsigned>(channels), static_cast<unsigned>(y < 1 ? 1 : (y > 65535 ? 65535 : y)), 1);
}

// QDrop's counter hash, identical to dfqkern.kernels.reference.hash32 ("lowbias32").
__device__ __forceinline__ uint32_t hash32(uint64_t index, uint32_t seed_mul) {
  return lowbias32(static_cast<uint32_t>(index), seed_mul);
}

}  // namespace dfqkern::cuda
