// Run-time ISA choice, the thread splitter and the threads' scratch memory (see common.h).
#include "common.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <memory>

namespace dfqkern::cpu {

namespace {

Isa parse(const std::string& name) {
  if (name == "portable") return Isa::portable;
#if defined(__aarch64__)
  if (name == "dotprod") {
    TORCH_CHECK_VALUE(cpu_has_dotprod(),
                      "dfqkern CPU ISA 'dotprod' requested but this CPU lacks the dot-product extension");
    return Isa::dotprod;
  }
  if (name == "neon") {
    TORCH_CHECK_VALUE(cpu_has_neon(), "dfqkern CPU ISA 'neon' requested but this CPU lacks Advanced SIMD");
    return Isa::neon;
  }
  TORCH_CHECK_VALUE(name == "auto" || name.empty(),
                    "dfqkern CPU ISA must be one of 'auto', 'dotprod', 'neon', 'portable', got '", name, "'");
  return cpu_has_dotprod() ? Isa::dotprod : (cpu_has_neon() ? Isa::neon : Isa::portable);
#else
  if (name == "amx") {
    TORCH_CHECK_VALUE(cpu_has_amx(),
                      "dfqkern CPU ISA 'amx' requested but this CPU (or the OS) does not offer AMX-INT8 with AVX512-VNNI");
    return Isa::amx;
  }
  if (name == "avx512vnni") {
    TORCH_CHECK_VALUE(cpu_has_avx512vnni(), "dfqkern CPU ISA 'avx512vnni' requested but this CPU lacks AVX512-VNNI/VL");
    return Isa::avx512vnni;
  }
  if (name == "avx2") {
    TORCH_CHECK_VALUE(cpu_has_avx2(), "dfqkern CPU ISA 'avx2' requested but this CPU lacks AVX2/FMA/F16C");
    return Isa::avx2;
  }
  TORCH_CHECK_VALUE(name == "auto" || name.empty(),
                    "dfqkern CPU ISA must be one of 'auto', 'amx', 'avx512vnni', 'avx2', 'portable', got '", name, "'");
  if (cpu_has_amx()) return Isa::amx;
  return cpu_has_avx512vnni() ? Isa::avx512vnni : (cpu_has_avx2() ? Isa::avx2 : Isa::portable);
#endif
}

std::atomic<int>& isa_state() {
  static std::atomic<int> state{[] {
    const char* env = std::getenv("DFQKERN_CPU_ISA");
    return static_cast<int>(parse(env ? env : "auto"));
  }()};
  return state;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(isa_state().load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) { isa_state().store(static_cast<int>(parse(name))); }

bool uses_avx2() {
  const Isa isa = active_isa();
  return isa == Isa::avx2 || vnni_level(isa);
}

std::string isa_name() {
  switch (active_isa()) {
    case Isa::amx: return "amx";
    case Isa::avx512vnni: return "avx512vnni";
    case Isa::avx2: return "avx2";
    case Isa::dotprod: return "dotprod";
    case Isa::neon: return "neon";
    default: return "portable";
  }
}

namespace {
std::atomic<int64_t>& min_cost_state() {
  static std::atomic<int64_t> cost{kParallelMinCost};
  return cost;
}
}  // namespace

int64_t parallel_min_cost() { return min_cost_state().load(std::memory_order_relaxed); }

int64_t set_parallel_min_cost(int64_t cost) {
  TORCH_CHECK_VALUE(cost >= 1, "parallel min cost must be >= 1, got ", cost);
  return min_cost_state().exchange(cost);
}

int64_t gemm_cost(int64_t macs) {
  // AMX tiles: ResNet-20-size convs (16-64 ch, K 144-576) run ~1.2x faster and large ones 2-3x than on vpdpbusd,
  // and at the VNNI units their work items split onto a second thread that then mostly waited (2 threads slower
  // than 1, Xeon Sapphire Rapids class). 32 keeps those convs on one thread (tried 4: still split, still slower)
  // while the 56x56 / 28x28 ones of ResNet-18 still split (1.7x from 2 threads there).
  constexpr int64_t kAmxMacsPerUnit = 32;
  return active_isa() == Isa::amx ? macs / kAmxMacsPerUnit : macs;
}

void parallel_range(int64_t n, int64_t item_cost, void (*fn)(void*, int64_t, int64_t), void* ctx) {
  if (n <= 0) return;
  const int64_t cost = std::max<int64_t>(1, item_cost);
  const int64_t grain = std::max<int64_t>(1, (parallel_min_cost() + cost - 1) / cost);
  if (n < 2 * grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    fn(ctx, 0, n);
    return;
  }
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

void* thread_scratch(Scratch slot, size_t bytes) {
  struct Buf {
    std::unique_ptr<uint8_t[]> p;
    size_t n = 0;
  };
  thread_local std::array<Buf, static_cast<size_t>(Scratch::count)> bufs;
  Buf& b = bufs[static_cast<size_t>(slot)];
  if (b.n < bytes || !b.p) {
    b.p.reset(new uint8_t[std::max<size_t>(bytes, 64)]);
    b.n = bytes;
  }
  return b.p.get();
}

int64_t parallel_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

}  // namespace dfqkern::cpu
