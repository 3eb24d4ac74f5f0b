// What the CPU supports, asked once (torch-free, so the standalone kernel checks share it).
#include "common.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace dfqkern::cpu {

bool vnni_level(Isa isa) { return isa == Isa::avx512vnni || isa == Isa::amx; }

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512vnni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
#else
  return false;
#endif
}

bool cpu_has_amx() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
  static const bool ok = [] {
    if (!cpu_has_avx512vnni()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;  // AMX-TILE, AMX-INT8
    // Linux hands out the tile data state only on request (else the first tile instruction faults)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool cpu_has_neon() {
#if defined(__aarch64__) && defined(__linux__)
  static const bool ok = (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
  return ok;
#elif defined(__aarch64__)
  return true;  // Advanced SIMD is part of the AArch64 baseline
#else
  return false;
#endif
}

bool cpu_has_dotprod() {
#if defined(__aarch64__) && defined(__linux__)
  static const bool ok = cpu_has_neon() && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
  return ok;
#else
  return false;  // without the kernel's answer, stay on instructions every AArch64 CPU has
#endif
}

}  // namespace dfqkern::cpu
