// Shared pieces of the CPU backend: ISA choice, work splitting, small POD parameter blocks.
//
// Every kernel family has two implementations with identical integer results:
//   *_avx2.cpp      explicit AVX2/FMA/F16C intrinsics, compiled with `#pragma GCC target` so the
//                   rest of the library stays baseline x86-64;
//   *_portable.cpp  plain C++ (what runs on CPUs without AVX2, and what tests compare against).
//   gemm_vnni.cpp   the GEMM micro-kernels with AVX512-VNNI vpdpbusd on 256-bit registers, where
//                   the CPU has it; elementwise_vnni.cpp the AdaRound kernels in 512-bit registers
//                   (the other kernels then use their AVX2 versions).
//   gemm_amx.cpp    the panel GEMM with AMX-INT8 tiles (level amx = avx512vnni + this GEMM), where the
//                   CPU and the OS offer it (Xeon Sapphire Rapids and later, Linux).
//   gemm_neon*.cpp  aarch64 only: the GEMM micro-kernels with NEON widening multiplies (neon) or the
//                   dot-product instruction sdot (dotprod); the other kernels use their portable
//                   versions there (compiled for the aarch64 baseline, which includes NEON).
// The choice is made at run time (`active_isa()`), from the CPU's features and the environment
// variable DFQKERN_CPU_ISA = auto | amx | avx512vnni | avx2 | portable on x86, auto | dotprod | neon |
// portable on aarch64 (or `set_isa` from Python, for tests). csrc/sources.py compiles each
// architecture's files only for that architecture.
//
// Headers included by the *_avx2.cpp files must only contain declarations and PODs: an inline
// function compiled under the AVX2 target could be merged by the linker into portable callers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dfqkern::cpu {

// x86: avx512vnni = AVX2 kernels + VNNI GEMM + AVX-512 AdaRound, amx = avx512vnni with the panel GEMM on
// AMX tiles; aarch64: dotprod = neon + sdot GEMM.
enum class Isa { portable = 0, avx2 = 1, avx512vnni = 2, neon = 3, dotprod = 4, amx = 5 };
// Whether the level includes everything of avx512vnni (the VNNI / AVX-512 kernels and layouts).
bool vnni_level(Isa isa);  // (cpu_features.cpp: no inline code in this header, see above)

Isa active_isa();
// CPU features (cpu_features.cpp, torch-free: also linked by the standalone kernel checks); false on
// other architectures.
bool cpu_has_avx2();        // AVX2 + FMA + F16C, as reported by the CPU
bool cpu_has_avx512vnni();  // AVX2 level + AVX512F/BW/VL + AVX512_VNNI (vpdpbusd on ymm registers)
// avx512vnni level + AMX-TILE / AMX-INT8, and (Linux) the process's permission to use the tile data,
// requested once here (arch_prctl ARCH_REQ_XCOMP_PERM): false where the kernel refuses it.
bool cpu_has_amx();
bool cpu_has_neon();        // aarch64 Advanced SIMD (HWCAP_ASIMD)
bool cpu_has_dotprod();     // neon + the SDOT/UDOT dot-product instructions (HWCAP_ASIMDDP)
// "auto" | "amx" | "avx512vnni" | "avx2" | "portable" (x86), "auto" | "dotprod" | "neon" | "portable"
// (aarch64); throws when unsupported.
void set_isa(const std::string& name);
std::string isa_name();
// Whether the *_avx2.cpp kernels run (x86 levels avx2, avx512vnni and amx); pick one with DFQKERN_AVX2_OR_PORTABLE.
bool uses_avx2();

// ns::fn##_avx2 where the AVX2 kernels run, else ns::fn##_portable. Non-x86 builds have no *_avx2.cpp.
#if defined(__x86_64__) || defined(__i386__)
#define DFQKERN_AVX2_OR_PORTABLE(ns, fn) (::dfqkern::cpu::uses_avx2() ? ns::fn##_avx2 : ns::fn##_portable)
#else
#define DFQKERN_AVX2_OR_PORTABLE(ns, fn) (ns::fn##_portable)
#endif

// Float element types the kernels accept (x, grad, v, ...).
enum class FType { f32 = 0, f16 = 1, bf16 = 2 };

// Work estimates for the thread splitter, in "cost units" of about one int8 multiply-add of the GEMM
// micro-kernels; a float element of a quantize / fake-quant pass or a packed byte costs ~kElementCost.
constexpr int64_t kElementCost = 8;
// Default least cost of one thread's share: work below ~1-2 us of one core (a tiny layer, a short
// quantize pass) runs on the calling thread, since waking torch's OpenMP workers costs about that on an
// idle machine and far more on a loaded one. Measured (bench/test_bench_cpu.py shapes, 2 threads, Xeon
// VNNI): 1 << 20 made conv3x3 64ch 56x56 25 % slower (its quantize pass ran serially); 1 << 16 is as
// fast as splitting everything on every benchmark shape.
constexpr int64_t kParallelMinCost = int64_t{1} << 16;
int64_t parallel_min_cost();
// Sets the least cost per thread (>= 1; tests use 1 to force splitting); returns the previous value.
int64_t set_parallel_min_cost(int64_t cost);

// Calls fn(begin, end) over [0, n) split across torch's intra-op threads (OpenMP) in chunks of at
// least parallel_min_cost() / item_cost items; work below that runs serially. Defined in isa.cpp (the
// only place that touches ATen's thread pool).
void parallel_range(int64_t n, int64_t item_cost, void (*fn)(void* ctx, int64_t begin, int64_t end), void* ctx);
// Threads parallel_range may use now (1 inside a parallel region): for splitting work into enough items.
int64_t parallel_threads();

// Grow-only scratch memory of the calling thread, one buffer per slot, for the parallel work items' buffers
// (contents are not kept between uses). Allocating them per item made OpenMP workers malloc / free on every
// call, which turned slow once glibc raised its dynamic mmap threshold (any large free in the process does):
// a CIFAR ResNet-20 b1 on 2 threads went from 316 to 650 us after a 64 MiB weight was freed (Zen 4). A slot is
// used by one kind of item only, and never while another use of it on the same thread is live.
// Cost units of `macs` multiply-adds of the active ISA's packed GEMM: AMX tiles run them several times
// faster than the VNNI / AVX2 kernels the units were measured on (isa.cpp: kAmxMacsPerUnit).
int64_t gemm_cost(int64_t macs);

enum class Scratch : int {
  act_codes, act_floats, im2col_rows, row_sums, dw_plane, dw_codes, dw_floats, dw_acc,
  // a GEMM-path conv's per-call buffers, taken by the calling thread (conv.cpp CallBuf)
  conv_xs, conv_pixsum, conv_hsum, conv_xpad, chain_mid,
  count
};
void* thread_scratch(Scratch slot, size_t bytes);
template <class T>
inline T* scratch_of(Scratch slot, int64_t n) {
  return static_cast<T*>(thread_scratch(slot, static_cast<size_t>(n) * sizeof(T)));
}

template <class F>
inline void parallel_for(int64_t n, int64_t item_cost, const F& f) {
  parallel_range(n, item_cost, [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
                 const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace dfqkern::cpu
