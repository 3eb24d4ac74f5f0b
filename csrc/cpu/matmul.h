// Activation x activation integer matmul (attention's q.k^T and attn.v) on the packed-GEMM
// micro-kernels: B^T is packed per call as an 8-bit "weight" (one weight row per output column, its
// zero point per column), A as kernel activation rows, and the active ISA's tile or panel kernels
// (gemm.h) run the product with the same exact zero-point corrections as the packed Linear. On AVX2
// both operands go to the int16 layout below instead (its own kernel, matmul_avx2.cpp).
// Torch-free (the standalone kernel checks link it); the ATen driver is matmul.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "gemm.h"

namespace dfqkern::cpu::matmul {

// One batch element: out[m][n] = sum_k (A[m][k] - za[m]) * (B[k][n] - zb[n]) in wrapping int32
// arithmetic (exact whenever the true result fits in int32). A and B are uint8 codes read through
// element strides, so transposed or sliced views need no copy.
struct Problem {
  const uint8_t* a;
  int64_t a_sm, a_sk;  // A[m][k] = a[m * a_sm + k * a_sk]
  const uint8_t* b;
  int64_t b_sk, b_sn;  // B[k][n] = b[k * b_sk + n * b_sn]
  const int32_t* za;
  int64_t za_step;     // za[m * za_step]: 0 = one zero point for every row
  const int32_t* zb;
  int64_t zb_step;     // zb[n * zb_step]
  int64_t m, n, k;
  int32_t* out;        // [m][n] row-major
};

// Buffers of the packed operands, reused across the calls of one thread.
struct Scratch {
  std::vector<int8_t> a_rows;
  std::vector<int32_t> a_sum;
  std::vector<uint8_t> codes, b_packed;
  std::vector<int32_t> b_corr, b_sum;
  std::vector<int16_t> a16, b16;
};

// Packs the operands for `fn`'s layout (group_rows: gemm::kTileRows = cpu-tile-v1, gemm::kPanel =
// cpu-panel-v1) and runs fn over the whole product. k >= 1.
void run(const Problem& p, gemm::Kernel fn, int group_rows, Scratch& s);

// The int16 layout, for ISAs without a byte dot product that takes two full 8-bit codes (AVX2's
// vpmaddubsw would saturate): codes widened to int16, A as rows of kpairs * 2 values (zero padded), B^T in
// panels of kI16Panel columns x 2 k (vpmaddwd pairs: panel p, pair j, column c, t at
// ((p * kpairs + j) * kI16Panel + c) * 2 + t). Raw codes: a pair sums to at most 2 * 255^2, a dot to
// K * 255^2 < 2^31; the zero points enter in the epilogue, out = dot - zb * a_sum - za * q with
// q[n] = sum_k B[k][n] - K * zb[n] (wrapping int32, like the GEMM's corrections).
constexpr int kI16Panel = 16;
struct I16Args {
  const int16_t* a;
  int64_t lda;               // 2 * kpairs
  const int16_t* b;
  int64_t kpairs;
  const int32_t* a_sum;      // [m]
  const int32_t* za;
  int64_t za_step;
  const int32_t* zb;         // [panels * kI16Panel], zero padded
  const int32_t* q;          // [panels * kI16Panel], zero padded
  int64_t m, n;
  int32_t* out;              // [m][n] row-major
};
using I16Kernel = void (*)(const I16Args& g);
void i16_avx2(const I16Args& g);  // x86 builds only (matmul_avx2.cpp)

// Packs the operands in the int16 layout and runs fn. k >= 1.
void run_i16(const Problem& p, I16Kernel fn, Scratch& s);

// One product on the active ISA's choice of layout and kernel (matmul.cpp, the ATen side: it reads the ISA).
void run_active(const Problem& p, Scratch& s);

}  // namespace dfqkern::cpu::matmul
