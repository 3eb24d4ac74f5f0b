// Instantiations of the packed GEMM / conv kernels for the kPathA4I8 path (see gemm.cuh).
#include "gemm.cuh"

namespace dfqkern::cuda {

cudaError_t launch_gemm_a4i8(const GemmArgs& p, int slot_bits, cudaStream_t stream) {
  return slot_bits == 2 ? run_gemm_path<kPathA4I8, 2>(p, stream) : run_gemm_path<kPathA4I8, 4>(p, stream);
}

}  // namespace dfqkern::cuda
