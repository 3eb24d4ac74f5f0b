// Standalone C++ tests of the CPU kernels (built by CMakeLists.txt, run by ctest):
//   * the packed GEMM at every ISA level this CPU supports equals a naive int64 dot product
//     (awkward M, K, N; every weight width; per-row activation zero points);
//   * the QDrop hash matches values computed by dfqkern.kernels.reference.hash32;
//   * the AVX2 fake-quant kernels equal the portable ones element for element.
// Exit code 0 on success; every failure prints what differed.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/common.h"
#include "cpu/elementwise.h"
#include "cpu/elementwise_scalar.h"
#include "cpu/gemm.h"
#include "cpu/gemm_driver.h"
#include "cpu/kernels.h"

namespace {

using namespace dfqkern::cpu;

int failures = 0;

#define EXPECT(cond, ...)                         \
  do {                                            \
    if (!(cond)) {                                \
      ++failures;                                 \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                   \
      std::printf("\n");                          \
    }                                             \
  } while (0)

// kpack-lsb-v1 rows of `bits`-bit codes (padding = the row's zero point), as formats.pack_codes.
std::vector<uint8_t> kpack(const std::vector<int>& codes, int64_t n, int64_t k, int bits, const std::vector<int>& zp) {
  const int slot = bits == 2 ? 2 : (bits == 8 ? 8 : 4), per = 8 / slot;
  const int64_t width = (k + per - 1) / per;
  std::vector<uint8_t> out(n * width, 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < width * per; ++j) {
      const int c = j < k ? codes[r * k + j] : zp[r];
      out[r * width + j / per] |= static_cast<uint8_t>(c << ((j % per) * slot));
    }
  return out;
}

void test_gemm(std::mt19937& rng, Isa isa, int wbits, int64_t m, int64_t k, int64_t n) {
  std::uniform_int_distribution<int> wcode(0, (1 << wbits) - 1), acode(0, 255);
  std::vector<int> w(n * k), wz(n), a(m * k), az(m);
  for (auto& v : w) v = wcode(rng);
  for (auto& v : wz) v = wcode(rng);
  for (auto& v : a) v = acode(rng);
  for (auto& v : az) v = acode(rng);
  const std::vector<uint8_t> packed = kpack(w, n, k, wbits, wz);
  at::Tensor data = at::from_blob(const_cast<uint8_t*>(packed.data()), {n, static_cast<int64_t>(packed.size()) / n},
                                  at::kByte).clone();
  at::Tensor zpt = at::from_blob(wz.data(), {n}, at::kInt).clone();
  auto [tiles, corr] = prepack_weight(data, zpt, wbits, k, 1);

  const int kb = wbits == 3 ? 4 : wbits;
  const int64_t kp = gemm::num_chunks(k, kb) * gemm::chunk_k(kb);
  std::vector<int8_t> rows(m * kp);
  std::vector<int32_t> sums(m), out(m * n, 0);
  for (int64_t i = 0; i < m; ++i) {
    std::vector<uint8_t> codes(a.begin() + i * k, a.begin() + (i + 1) * k);
    sums[i] = gemm::codes_to_act_row(codes.data(), k, kp, rows.data() + i * kp);
  }
  gemm::Args g{};
  g.a = rows.data();
  g.lda = kp;
  g.a_sum = sums.data();
  g.a_zp = az.data();
  g.a_zp_step = 1;
  g.w = tiles.data_ptr<uint8_t>();
  g.nchunks = gemm::num_chunks(k, kb);
  g.wbits = kb;
  g.corr = corr.data_ptr<int32_t>();
  g.n = n;
  g.out_i = out.data();
  g.ldo_m = n;
  g.ldo_n = 1;
  set_isa(isa == Isa::portable ? "portable" : (isa == Isa::avx2 ? "avx2" : "avx512vnni"));
  gemm::run(g, m, (n + 3) / 4);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) {
      int64_t ref = 0;
      for (int64_t j = 0; j < k; ++j) ref += int64_t(a[i * k + j] - az[i]) * (w[r * k + j] - wz[r]);
      EXPECT(out[i * n + r] == ref, "gemm isa=%s wbits=%d m=%ld k=%ld n=%ld at (%ld, %ld): %d != %ld",
             isa_name().c_str(), wbits, long(m), long(k), long(n), long(i), long(r), out[i * n + r], long(ref));
    }
}

void test_hash() {
  const uint32_t seed7 = 7u * 0x9E3779B9u;
  const uint32_t expect7[] = {2440275426u, 2932275085u, 977314414u, 1448771575u};
  const uint32_t idx[] = {0u, 1u, 12345u, 4294967295u};
  for (int i = 0; i < 4; ++i)
    EXPECT(ew::hash32(idx[i], seed7) == expect7[i], "hash32(%u, seed 7) = %u, reference %u", idx[i],
           ew::hash32(idx[i], seed7), expect7[i]);
  EXPECT(ew::hash32(12345u, 0u) == 2435775735u, "hash32(12345, seed 0)");
}

void test_fake_quant_isas(std::mt19937& rng) {
  if (!cpu_has_avx2()) return;
  std::normal_distribution<float> nd(0.f, 3.f);
  const int64_t n = 1003;  // not a multiple of 8: the scalar tail runs too
  std::vector<float> x(n), g(n), y0(n), y1(n), g0(n), g1(n);
  for (auto& v : x) v = nd(rng);
  for (auto& v : g) v = nd(rng);
  ew::Drop drop;
  drop.seed_mix = 11u * 0x9E3779B9u;
  drop.threshold = 1ull << 31;  // drop_prob 0.5
  const ew::FqParams p{1.0f / 0.37f, 0.37f, 5.f, 15.f, drop};
  ew::fq_forward_portable(x.data(), y0.data(), n, p, 17);
  ew::fq_forward_avx2(x.data(), y1.data(), n, p, 17);
  ew::Sums2 s0, s1;
  ew::fq_backward_portable(g.data(), x.data(), g0.data(), n, p, 17, s0);
  ew::fq_backward_avx2(g.data(), x.data(), g1.data(), n, p, 17, s1);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT(y0[i] == y1[i], "fq forward at %ld: portable %g, avx2 %g", long(i), y0[i], y1[i]);
    EXPECT(g0[i] == g1[i], "fq backward grad_x at %ld: portable %g, avx2 %g", long(i), g0[i], g1[i]);
  }
  EXPECT(std::abs(s0.a - s1.a) <= 1e-4 * (1 + std::abs(s0.a)), "grad_scale sums %g vs %g", s0.a, s1.a);
}

}  // namespace

int main() {
  std::mt19937 rng(12345);
  test_hash();
  test_fake_quant_isas(rng);
  std::vector<Isa> isas = {Isa::portable};
  if (cpu_has_avx2()) isas.push_back(Isa::avx2);
  if (cpu_has_avx512vnni()) isas.push_back(Isa::avx512vnni);
  const int64_t shapes[][3] = {{1, 77, 13}, {3, 63, 5}, {17, 300, 9}, {5, 4100, 8}, {9, 1, 3}};
  for (Isa isa : isas)
    for (int wbits : {2, 3, 4, 8})
      for (const auto& s : shapes) test_gemm(rng, isa, wbits, s[0], s[1], s[2]);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
