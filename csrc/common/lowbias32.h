// QDrop's counter hash ("lowbias32"), identical to dfqkern.kernels.reference.hash32: the one
// scalar implementation, shared by the CPU kernels and the CUDA device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DFQKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DFQKERN_HOST_DEVICE inline
#endif

namespace dfqkern {

// index + seed_mix wraps mod 2**32, as the reference does.
DFQKERN_HOST_DEVICE uint32_t lowbias32(uint32_t index, uint32_t seed_mix) {
  uint32_t x = index + seed_mix;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

}  // namespace dfqkern
