// aarch64 packed GEMM micro-kernels with the dot-product instruction sdot (Armv8.2-A DotProd, run
// only where the CPU reports it): ISA "dotprod". Shared headers come first, so that only this file's
// own kernels are compiled for the extension (see common.h).
#include <algorithm>
#include <cstring>
#include <utility>

#include "gemm.h"

#pragma GCC target("arch=armv8.2-a+dotprod")
#define DFQ_NEON_DOT 1
#define DFQ_NEON_NAME(base) base##_dotprod
#include "gemm_neon_impl.h"
