// Packed GEMM entry point: path dispatch, split-K choice and the split-K scaling epilogue.
#include <algorithm>

#include "gemm.cuh"

namespace dfqkern::cuda {

namespace {

// int32 [M, N] (split-K workspace) -> scaled output, same float ops as the fused epilogue.
__global__ void dequant_epilogue_kernel(const GemmArgs p) {
  const int64_t total = int64_t(p.M) * p.N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(i / p.N), col = static_cast<int>(i - int64_t(row) * p.N);
    float sa = p.a_scale[p.a_scale_per_row ? row : 0];
    if (p.a_mark != nullptr) sa = __fadd_rn(sa, row_mark(p, row));
    store_out(p.out, i, dequant_epilogue(p.workspace[i], sa, p.w_scale[col], p.bias, col), p.out_type);
  }
}

}  // namespace

int choose_split_k(int M, int N, int k_chunks, int num_sms) {
  const int bm = use_small_tile(M) ? SmallTile::BM : LargeTile::BM;
  const int bn = use_small_tile(M) ? SmallTile::BN : LargeTile::BN;
  const long tiles = long((M + bm - 1) / bm) * ((N + bn - 1) / bn);
  if (tiles >= num_sms || k_chunks < 4) return 1;
  int split = static_cast<int>(std::min<long>((num_sms + tiles - 1) / tiles, k_chunks / 2));  // >= 2 chunks each
  split = std::max(split, 1);
  const int per_split = (k_chunks + split - 1) / split;
  return (k_chunks + per_split - 1) / per_split;  // no empty splits
}

cudaError_t launch_packed_gemm(const GemmArgs& p, int path, int slot_bits, cudaStream_t stream) {
  cudaError_t err;
  switch (path) {
    case kPathA8: err = launch_gemm_a8(p, slot_bits, stream); break;
    case kPathA4I4: err = launch_gemm_a4i4(p, slot_bits, stream); break;
    case kPathA4I8: err = launch_gemm_a4i8(p, slot_bits, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || p.split_k <= 1 || p.a_scale == nullptr) return err;
  const int64_t total = int64_t(p.M) * p.N;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
  dequant_epilogue_kernel<<<blocks, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dfqkern::cuda
