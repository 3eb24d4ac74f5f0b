// Host-side launchers of the dfqkern CUDA kernels: plain pointers and sizes, no torch types, so
// the .cu files compile without the torch headers. ops_cuda.cpp checks arguments and calls these.
// Each returns the launch's cudaError_t (cudaSuccess when nothing went wrong).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dfqkern::cuda {

// Element types of kernel inputs / outputs.
enum OutType : int { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2, kOutI32 = 3 };

// Which tensor-core instruction a packed GEMM uses (see gemm.cuh).
enum GemmPath : int {
  kPathA8 = 0,    // A8: u8 x s8 m16n8k32; weights in the "i8" layout
  kPathA4I4 = 1,  // A4: u4 x s4 m16n8k64 (sm_80/86/87/89); weights in the "i4" layout
  kPathA4I8 = 2,  // A4: nibbles unpacked to u8, u8 x s8 m16n8k32 (sm_90+); weights in the "i4" layout
};

struct GemmArgs {
  // Activations: dense rows (a[m * lda + byte], lda % 16 == 0, lda readable bytes per row), or an
  // NHWC image a[((img * H + y) * W + x) * pixel_bytes + byte] for the implicit-GEMM conv.
  const uint8_t* a = nullptr;
  int64_t lda = 0;
  const int32_t* a_zp = nullptr;  // [1] or [M] (per-token) zero points
  int a_zp_per_row = 0;
  const float* a_scale = nullptr;  // [1] or [M]; nullptr -> exact int32 output
  int a_scale_per_row = 0;
  // Weights in a fragment-ordered layout (dfqkern/kernels/cuda.py builds it).
  const uint8_t* w = nullptr;
  const uint32_t* w_zero4 = nullptr;  // [N] z * 0x01010101 (decode of the exact u8 x s8 paths)
  const int32_t* w_sum = nullptr;     // [N] sum_k (w_k - z)
  const int32_t* w_cdelta = nullptr;  // [N] center - z (A4I4 path: corrects the centered weights)
  int need_row_sums = 0;              // A4I4 path: any w_cdelta != 0
  const float* w_scale = nullptr;     // [N]
  const float* bias = nullptr;        // [N] float32 or nullptr
  void* out = nullptr;                // [M, N] row-major (conv: NHWC)
  int out_type = 0;                   // OutType
  int32_t* workspace = nullptr;       // [M, N] int32 zeros when split_k > 1
  int M = 0, N = 0;
  int k_chunks = 0;  // padded K / chunk (chunk = 512 / weight slot bits elements)
  int split_k = 1;
  // Implicit-GEMM conv geometry (conv = 0 for dense rows).
  int conv = 0;
  int H = 0, W = 0, OH = 0, OW = 0, KH = 1, KW = 1;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  int c_padded = 0;     // channels per pixel in the activation image (multiple of 16 bytes' worth)
  int pixel_bytes = 0;  // bytes per pixel; the activation zero point a_zp[0] must be a valid code
  // Non-finite inputs (optional): fp32 0 / NaN per activation row (dense) or per input pixel [N*H*W]
  // (conv); NaN marks a row / pixel that held NaN or Inf. The epilogue adds the row's mark (dense) or
  // its window's marks minus themselves (conv) to the activation scale, so those outputs become NaN.
  const float* a_mark = nullptr;
};

// Packed GEMM / implicit-GEMM conv. path: GemmPath; slot_bits: 2 or 4 (weight storage slot).
// With args.split_k > 1, args.workspace must be a zeroed int32 [M, N] buffer (it *is* the output
// when args.a_scale is null); the launcher then also runs the scaling epilogue.
cudaError_t launch_packed_gemm(const GemmArgs& args, int path, int slot_bits, cudaStream_t stream);

// How many K splits to use so that small-M problems still fill the GPU's SMs.
int choose_split_k(int M, int N, int k_chunks, int num_sms);

// Dense activation rows [M, K] (row stride ldx elements) -> codes packed along K into out [M, out_bytes]
// (kpack-lsb-v1 in the first packed_width(K) bytes, zeros after). Per-token: scale/zp per row computed
// here and written to out_scale/out_zp; per-tensor: inv_scale[0], zp[0] given.
struct QuantRowsArgs {
  const void* x = nullptr;
  int dtype = 0;  // OutType of x: kOutF32, kOutF16 or kOutBF16
  int64_t ldx = 0;
  int M = 0, K = 0, bits = 8;
  int per_token = 0, symmetric = 0;
  const float* inv_scale = nullptr;
  const int32_t* zp = nullptr;
  uint8_t* out = nullptr;
  int64_t out_bytes = 0;
  float* out_scale = nullptr;
  int32_t* out_zp = nullptr;
  float* out_mark = nullptr;  // optional [M]: 0, or NaN for a row holding NaN / Inf
};
cudaError_t launch_quantize_rows(const QuantRowsArgs& args, cudaStream_t stream);

// NCHW (any strides) float image -> NHWC codes: packed two per byte (bits 4, pack) or one per byte,
// channels padded to c_padded with the zero point.
struct QuantImageArgs {
  const void* x = nullptr;
  int dtype = 0;
  int64_t stride_n = 0, stride_c = 0, stride_h = 0, stride_w = 0;
  int N = 0, C = 0, H = 0, W = 0, c_padded = 0, bits = 8, pack = 0;
  const float* inv_scale = nullptr;
  const int32_t* zp = nullptr;
  uint8_t* out = nullptr;
  float* out_mark = nullptr;  // optional [N*H*W], zero-filled by the caller: NaN stored at pixels holding NaN / Inf
};
cudaError_t launch_quantize_image(const QuantImageArgs& args, cudaStream_t stream);

// Depthwise conv on NHWC byte codes with int8 weights [KH * KW, C] holding (w - z).
struct DepthwiseArgs {
  const uint8_t* x = nullptr;
  const int32_t* a_zp = nullptr;
  const float* a_scale = nullptr;  // nullptr -> int32 output
  const int8_t* w = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  int out_type = 0;
  int N = 0, C = 0, H = 0, W = 0, OH = 0, OW = 0, KH = 1, KW = 1;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  const float* a_mark = nullptr;  // optional per input pixel [N*H*W] (see GemmArgs::a_mark)
};
cudaError_t launch_depthwise(const DepthwiseArgs& args, cudaStream_t stream);

// Elementwise quantizer ops over a contiguous tensor viewed as [outer, channels, inner]
// (per-tensor: channels = 1, inner = numel).
struct FakeQuantArgs {
  const void* x = nullptr;
  const void* grad = nullptr;  // backward only
  void* out = nullptr;         // forward output / grad_x, dtype of x
  int dtype = 0;
  int64_t numel = 0, inner = 1;
  int channels = 1;
  const float* scale = nullptr;
  const float* inv_scale = nullptr;
  const int32_t* zp = nullptr;
  int bits = 8;
  uint64_t drop_threshold = 0;  // 0: no QDrop
  uint32_t seed_mul = 0;        // (seed * 0x9E3779B9) mod 2**32
  float* grad_scale = nullptr;  // [channels] zero-initialised, backward only
  float* grad_zp = nullptr;
};
cudaError_t launch_fake_quant_forward(const FakeQuantArgs& args, cudaStream_t stream);
cudaError_t launch_fake_quant_backward(const FakeQuantArgs& args, cudaStream_t stream);

struct AdaRoundArgs {
  const float* base = nullptr;
  const void* v = nullptr;
  const void* grad = nullptr;  // backward only
  void* out = nullptr;         // w_hat (forward) or grad_v (backward), dtype of v
  int dtype = 0;
  int64_t numel = 0, inner = 1;
  int channels = 1;
  const float* scale = nullptr;
  const int32_t* zp = nullptr;
  int bits = 4;
  float beta = 2.0f, reg_grad = 0.0f;
  int hard = 0;
  float* reg = nullptr;         // forward: [1] zero-initialised
  float* grad_scale = nullptr;  // backward: [channels] zero-initialised
};
cudaError_t launch_adaround_forward(const AdaRoundArgs& args, cudaStream_t stream);
cudaError_t launch_adaround_backward(const AdaRoundArgs& args, cudaStream_t stream);

// Exact int32 batched matmul of uint8 codes, out[b] = (a[b] - za[b]) @ (b[b] - zb[b]) (attention).
// a [batch, M, K] and b [batch, K, N] are read through element strides (any, including 0); za [batch, M]
// and zb [batch, N] int32 likewise; out is contiguous [batch, M, N]. a_k_fast / b_n_fast: which index
// has the unit stride (the staging loads follow it so they coalesce).
struct MatmulIntArgs {
  const uint8_t* a = nullptr;
  const uint8_t* b = nullptr;
  const int32_t* za = nullptr;
  const int32_t* zb = nullptr;
  int32_t* out = nullptr;
  int64_t batch = 0;
  int M = 0, N = 0, K = 0;
  int64_t stride_ab = 0, stride_am = 0, stride_ak = 0, stride_bb = 0, stride_bk = 0, stride_bn = 0;
  int64_t stride_zab = 0, stride_zam = 0, stride_zbb = 0, stride_zbn = 0;
  int a_k_fast = 1, b_n_fast = 1;
};
// Thread blocks launch_matmul_int starts (one grid axis: the caller checks it fits in 2^31 - 1).
int64_t matmul_int_blocks(int64_t batch, int M, int N);
cudaError_t launch_matmul_int(const MatmulIntArgs& args, cudaStream_t stream);

}  // namespace dfqkern::cuda
