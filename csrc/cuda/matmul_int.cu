// Exact int32 batched (a - za) @ (b - zb) of two uint8 code tensors: attention's q.k^T and attn.v.
// A plain shared-memory tiled kernel (no tensor cores): attention matmuls are small (K = head dim) and
// exactness comes first. Each block computes a 64 x 64 output tile of one batch element; its 256
// threads hold 4 x 4 outputs each, strided by 16 so a warp's shared reads of B are conflict-free.
// Centred values and sums are uint32: wrapping arithmetic is defined there, and the result is exact
// modulo 2^32, hence exact whenever it fits in int32 (contract.MATMUL_MAX_K, zero points in [0, 255]).
#include <algorithm>

#include "launch.h"

namespace dfqkern::cuda {

namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kThreads = 256, kPerThread = 4;
static_assert(kTileM == kTileN && kTileM == 16 * kPerThread && kThreads == 16 * 16, "16 x 16 threads, 4 x 4 each");
constexpr int kLoads = kTileM * kTileK / kThreads;  // elements of each operand one thread stages per K tile

__global__ void __launch_bounds__(kThreads) matmul_int_kernel(const MatmulIntArgs p) {
  // +1: the k-fast staging writes a column; unpadded, its 16 k's would share one bank
  __shared__ uint32_t as[kTileK][kTileM + 1];
  __shared__ uint32_t bs[kTileK][kTileN + 1];
  __shared__ uint32_t zas[kTileM];
  __shared__ uint32_t zbs[kTileN];
  const int tiles_n = (p.N + kTileN - 1) / kTileN;
  const int64_t tiles = int64_t((p.M + kTileM - 1) / kTileM) * tiles_n;
  const int64_t batch = blockIdx.x / tiles;
  const int64_t tile = blockIdx.x % tiles;
  const int row0 = int(tile / tiles_n) * kTileM, col0 = int(tile % tiles_n) * kTileN;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const uint8_t* a = p.a + batch * p.stride_ab;
  const uint8_t* b = p.b + batch * p.stride_bb;
  if (tid < kTileM) {
    const int r = row0 + tid;
    zas[tid] = r < p.M ? uint32_t(p.za[batch * p.stride_zab + r * p.stride_zam]) : 0u;
  } else if (tid < kTileM + kTileN) {
    const int c = col0 + tid - kTileM;
    zbs[tid - kTileM] = c < p.N ? uint32_t(p.zb[batch * p.stride_zbb + c * p.stride_zbn]) : 0u;
  }
  uint32_t acc[kPerThread][kPerThread] = {};
  __syncthreads();
  for (int k0 = 0; k0 < p.K; k0 += kTileK) {
    // Stage (code - zero point), 0 outside the matrices. The fast index follows the unit stride so a
    // warp's global reads coalesce for row-major and transposed operands alike.
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int e = tid + i * kThreads;
      const int m = p.a_k_fast ? e / kTileK : e % kTileM, k = p.a_k_fast ? e % kTileK : e / kTileM;
      const int r = row0 + m, kk = k0 + k;
      as[k][m] = r < p.M && kk < p.K ? uint32_t(a[r * p.stride_am + kk * p.stride_ak]) - zas[m] : 0u;
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int e = tid + i * kThreads;
      const int n = p.b_n_fast ? e % kTileN : e / kTileK, k = p.b_n_fast ? e / kTileN : e % kTileK;
      const int c = col0 + n, kk = k0 + k;
      bs[k][n] = c < p.N && kk < p.K ? uint32_t(b[kk * p.stride_bk + c * p.stride_bn]) - zbs[n] : 0u;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      uint32_t av[kPerThread], bv[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        av[i] = as[k][ty + 16 * i];
        bv[i] = bs[k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
  int32_t* out = p.out + batch * p.M * p.N;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int r = row0 + ty + 16 * i;
    if (r >= p.M) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int c = col0 + tx + 16 * j;
      if (c < p.N) out[int64_t(r) * p.N + c] = int32_t(acc[i][j]);
    }
  }
}

}  // namespace

int64_t matmul_int_blocks(int64_t batch, int M, int N) {
  return batch * ((M + kTileM - 1) / kTileM) * ((N + kTileN - 1) / kTileN);
}

cudaError_t launch_matmul_int(const MatmulIntArgs& p, cudaStream_t stream) {
  const int64_t blocks = matmul_int_blocks(p.batch, p.M, p.N);
  if (blocks == 0) return cudaSuccess;
  matmul_int_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dfqkern::cuda
