// aarch64 packed GEMM micro-kernels with plain NEON widening multiplies (every AArch64 CPU): ISA "neon".
#include <algorithm>
#include <cstring>
#include <utility>

#include "gemm.h"

#define DFQ_NEON_DOT 0
#define DFQ_NEON_NAME(base) base##_neon
#include "gemm_neon_impl.h"
