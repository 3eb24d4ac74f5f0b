// Torch-free check of the CPU micro-kernels (links only csrc/sources.py's `kernels` list), built for
// the host and cross-built for aarch64 (tests/test_aarch64_kernels.py, CMakeLists.txt target
// microkernels_check):
//   * every variant this CPU runs (portable + avx2 / avx512vnni / amx on x86, neon / dotprod on aarch64)
//     over fixed awkward cases: packed GEMM in both layouts (odd K, K off the packing, M = 1, N off
//     the tile / panel, W2/W3/W4/W8 x A4/A8, per-tensor / per-row and symmetric activation zero
//     points, int32 and fp32 outputs, row- and channel-major stores, split row / tile ranges), the
//     activation x activation matmul on both GEMM layouts and (x86) the int16 layout (matmul.h:
//     strided operands, extreme sums), and the element kernels that have SIMD variants (quantize,
//     fake-quant forward / backward, per-row min / max, direct depthwise conv);
//   * inputs come from splitmix64 seeded with the FNV-1a hash of the case name (integer arithmetic
//     and exactly representable floats only), so every machine and tests/test_aarch64_kernels.py
//     (in Python) draw the same numbers;
//   * each case prints "<case> <variant> <FNV-1a 64 of the output bytes>" per variant, plus
//     "<case> reference <digest>" for GEMM cases (a naive int64 dot product and the reference's
//     fp32 epilogue order, written out here). Exit status 1 when a variant differs from portable or
//     portable from the reference; comparing the printed lines across machines checks bit equality
//     across architectures.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "cpu/depthwise.h"
#include "cpu/elementwise.h"
#include "cpu/gemm.h"
#include "cpu/matmul.h"

namespace {

using namespace dfqkern::cpu;

uint64_t fnv1a(const void* data, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

template <class T>
uint64_t digest(const std::vector<T>& v) { return fnv1a(v.data(), v.size() * sizeof(T)); }

// fp32 outputs: every NaN as the one quiet NaN 0x7fc00000. The kernels promise "NaN", not a payload
// (x86 SIMD yields the negative default NaN for Inf - Inf, AArch64 the positive one).
uint64_t digest(std::vector<float> v) {
  for (float& f : v)
    if (std::isnan(f)) f = std::numeric_limits<float>::quiet_NaN();
  return fnv1a(v.data(), v.size() * sizeof(float));
}

// splitmix64; below(n) = next() % n (the Python test uses the same formula).
struct Rng {
  uint64_t s;
  explicit Rng(const std::string& name) : s(fnv1a(name.data(), name.size())) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int32_t below(uint32_t n) { return static_cast<int32_t>(next() % n); }
  // (1 + below(2^20)) * 2^-27: positive, exact in fp32
  float scale() { return std::ldexp(static_cast<float>(1 + below(1u << 20)), -27); }
  // (below(2^21) - 2^20) * 2^-14: exact in fp32
  float bias() { return std::ldexp(static_cast<float>(below(1u << 21) - (1 << 20)), -14); }
};

struct Variant {
  std::string name;
  gemm::Kernel tiles, panels;
};

std::vector<Variant> gemm_variants() {
  std::vector<Variant> v{{"portable", gemm::run_portable, gemm::panels_portable}};
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_has_avx2()) v.push_back({"avx2", gemm::run_avx2, gemm::panels_avx2});
  if (cpu_has_avx512vnni()) v.push_back({"avx512vnni", gemm::run_avx512vnni, gemm::panels_avx512vnni});
  if (cpu_has_amx()) v.push_back({"amx", gemm::run_avx512vnni, gemm::panels_amx});
#endif
#if defined(__aarch64__)
  if (cpu_has_neon()) v.push_back({"neon", gemm::run_neon, gemm::panels_neon});
  if (cpu_has_dotprod()) v.push_back({"dotprod", gemm::run_dotprod, gemm::panels_dotprod});
#endif
  return v;
}

int failures = 0;

// Prints every variant's digest and counts mismatches against `expect` (portable's, or the reference's).
void report(const std::string& name, const std::vector<std::pair<std::string, uint64_t>>& got, uint64_t expect,
            const char* expect_from) {
  for (const auto& [variant, d] : got) {
    std::printf("%s %s %016llx\n", name.c_str(), variant.c_str(), static_cast<unsigned long long>(d));
    if (d != expect) {
      ++failures;
      std::printf("FAIL %s: %s differs from %s\n", name.c_str(), variant.c_str(), expect_from);
    }
  }
}

// ---------------------------------------------------------------------------- packed GEMM

struct GemmCase {
  int wbits, abits;
  bool panels;
  int64_t m, k, n;
  bool zp_per_row, symmetric, out_float, bias, cmajor;

  std::string name() const {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "gemm_%s_w%da%d_m%lldk%lldn%lld_%s_%s_%s_%s", panels ? "panel" : "tile", wbits,
                  abits, static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(n),
                  zp_per_row ? "row" : "tensor", symmetric ? "sym" : "asym",
                  out_float ? (bias ? "f32bias" : "f32") : "i32", cmajor ? "cmajor" : "rmajor");
    return buf;
  }
};

// kpack-lsb-v1 rows, padded with the row's zero point (as dfqkern.formats.pack_codes).
std::vector<uint8_t> kpack(const std::vector<int32_t>& codes, int64_t rows, int64_t k, int bits,
                           const std::vector<int32_t>& pad) {
  const int slot = gemm::slot_bits(bits), per = 8 / slot;
  const int64_t width = (k + per - 1) / per;
  std::vector<uint8_t> out(rows * width, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width * per; ++j) {
      const int32_t c = j < k ? codes[r * k + j] : pad[r];
      out[r * width + j / per] |= static_cast<uint8_t>(c << ((j % per) * slot));
    }
  return out;
}

void run_gemm(const GemmCase& c, const std::vector<Variant>& variants) {
  const std::string name = c.name();
  Rng rng(name);
  const int64_t m = c.m, k = c.k, n = c.n;
  // draw order (mirrored by tests/test_aarch64_kernels.py): weight codes, weight zero points,
  // activation codes, activation zero points (none when symmetric), weight scales, activation
  // scales, bias
  std::vector<int32_t> wc(n * k), wz(n), ac(m * k);
  for (auto& v : wc) v = rng.below(1u << c.wbits);
  for (auto& v : wz) v = rng.below(1u << c.wbits);
  for (auto& v : ac) v = rng.below(1u << c.abits);
  std::vector<int32_t> az(c.zp_per_row ? m : 1);
  for (auto& v : az) v = c.symmetric ? (1 << (c.abits - 1)) : rng.below(1u << c.abits);
  std::vector<float> ws(n), as(c.zp_per_row ? m : 1), bias(c.bias ? n : 0);
  for (auto& v : ws) v = rng.scale();
  for (auto& v : as) v = rng.scale();
  for (auto& v : bias) v = rng.bias();

  // layouts, as prepack_weight / prepack_panels / the activation drivers build them
  const int wb = c.wbits == 3 ? 4 : c.wbits;
  const std::vector<uint8_t> wk = kpack(wc, n, k, c.wbits, wz);
  const int64_t wrow = static_cast<int64_t>(wk.size()) / n;
  const int rows_per = c.panels ? gemm::kPanel : gemm::kTileRows;
  const int64_t groups = (n + rows_per - 1) / rows_per;
  const int64_t nblk = c.panels ? (k + gemm::panel_k(wb) - 1) / gemm::panel_k(wb)
                                : (k + gemm::chunk_k(wb) - 1) / gemm::chunk_k(wb);
  std::vector<uint8_t> w(groups * nblk * (c.panels ? gemm::kBlockBytes : gemm::kTileRows * gemm::kChunkBytes), 0);
  std::vector<int32_t> corr(groups * 3 * rows_per, 0);
  for (int64_t r = 0; r < n; ++r) {
    const auto pack = c.panels ? gemm::pack_panel_row : gemm::pack_tile_row;
    pack(wk.data() + r * wrow, c.wbits, k, wz[r], r / rows_per, static_cast<int>(r % rows_per), nblk, w.data(),
         corr.data());
  }
  const int64_t kp = (k + gemm::chunk_k(wb) - 1) / gemm::chunk_k(wb) * gemm::chunk_k(wb);
  std::vector<int8_t> arows(m * kp);
  std::vector<int32_t> asum(m);
  for (int64_t i = 0; i < m; ++i) {
    std::vector<uint8_t> codes(ac.begin() + i * k, ac.begin() + (i + 1) * k);
    asum[i] = gemm::codes_to_act_row(codes.data(), k, kp, arows.data() + i * kp);
  }

  gemm::Args g{};
  g.a = arows.data();
  g.lda = kp;
  g.a_sum = asum.data();
  g.a_zp = az.data();
  g.a_zp_step = c.zp_per_row ? 1 : 0;
  g.a_scale = as.data();
  g.a_scale_step = c.zp_per_row ? 1 : 0;
  g.w = w.data();
  g.nchunks = nblk;
  g.wbits = wb;
  g.group_rows = rows_per;
  g.corr = corr.data();
  g.w_scale = ws.data();
  g.bias = c.bias ? bias.data() : nullptr;
  g.n = n;
  g.ldo_m = c.cmajor ? 1 : n;
  g.ldo_n = c.cmajor ? m : 1;

  // reference: naive int64 dot products, then the reference epilogue acc * (a_scale * w_scale) + bias
  std::vector<int32_t> ref_i(m * n);
  std::vector<float> ref_f(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) {
      int64_t s = 0;
      for (int64_t j = 0; j < k; ++j) s += int64_t(ac[i * k + j] - az[c.zp_per_row ? i : 0]) * (wc[r * k + j] - wz[r]);
      const int64_t o = i * g.ldo_m + r * g.ldo_n;
      ref_i[o] = static_cast<int32_t>(s);
      float y = static_cast<float>(ref_i[o]) * (as[c.zp_per_row ? i : 0] * ws[r]);
      if (c.bias) y = y + bias[r];
      ref_f[o] = y;
    }
  const uint64_t expect = c.out_float ? digest(ref_f) : digest(ref_i);
  std::printf("%s reference %016llx\n", name.c_str(), static_cast<unsigned long long>(expect));

  std::vector<std::pair<std::string, uint64_t>> got;
  for (const Variant& v : variants) {
    std::vector<int32_t> out_i(m * n, 0x7fbadbad);  // sentinel: an unwritten element shows in the digest
    std::vector<float> out_f(m * n, std::numeric_limits<float>::quiet_NaN());
    g.out_i = c.out_float ? nullptr : out_i.data();
    g.out_f = c.out_float ? out_f.data() : nullptr;
    // two calls per dimension, as the drivers split work (non-zero row / tile offsets)
    const gemm::Kernel fn = c.panels ? v.panels : v.tiles;
    const int64_t mh = m / 2, th = groups / 2;
    for (const auto& [m0, m1] : {std::pair{int64_t(0), mh}, std::pair{mh, m}})
      for (const auto& [t0, t1] : {std::pair{int64_t(0), th}, std::pair{th, groups}})
        if (m0 < m1 && t0 < t1) fn(g, m0, m1, t0, t1);
    got.emplace_back(v.name, c.out_float ? digest(out_f) : digest(out_i));
  }
  if (c.panels) {
    // the implicit-GEMM conv's K segments (gemm::Args::seg_blocks / seg_skip): each row's K blocks in runs of 2,
    // 12 garbage bytes between runs (never read)
    const int64_t pk = gemm::panel_k(wb), sb = 2, run = sb * pk, stride = run + 12, nseg = (nblk + sb - 1) / sb;
    std::vector<int8_t> seg(m * nseg * stride, 0x55);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < nseg; ++j)
        std::memcpy(seg.data() + i * nseg * stride + j * stride, arows.data() + i * kp + j * run,
                    std::min(run, kp - j * run));
    gemm::Args gs = g;
    gs.a = seg.data();
    gs.lda = nseg * stride;
    gs.seg_blocks = sb;
    gs.seg_skip = stride - run;
    for (const Variant& v : variants) {
      std::vector<int32_t> out_i(m * n, 0x7fbadbad);
      std::vector<float> out_f(m * n, std::numeric_limits<float>::quiet_NaN());
      gs.out_i = c.out_float ? nullptr : out_i.data();
      gs.out_f = c.out_float ? out_f.data() : nullptr;
      v.panels(gs, 0, m, 0, groups);
      got.emplace_back(v.name + "+kseg", c.out_float ? digest(out_f) : digest(out_i));
    }
  }
  report(name, got, expect, "the reference");
}

std::vector<GemmCase> gemm_cases() {
  struct Shape {
    int64_t m, k, n;
  };
  // M = 1 (GEMV), odd K, K just past a chunk / block, N off the 4-row tile and 16-row panel
  const Shape shapes[] = {{1, 1, 1}, {1, 33, 17}, {3, 129, 5}, {4, 64, 16}, {5, 300, 33}, {17, 100, 20}};
  std::vector<GemmCase> out;
  int i = 0;
  for (int wbits : {2, 3, 4, 8})
    for (int abits : {4, 8})
      for (bool panels : {false, true})
        for (const Shape& s : shapes) {
          // the remaining options from a hash of the case number, so they do not follow the shape
          uint32_t h = static_cast<uint32_t>(i++) * 0x9E3779B1u;
          h = (h ^ (h >> 15)) * 0x2C1B3C6Du;
          h ^= h >> 12;
          const int kind = static_cast<int>((h >> 2) % 3);  // int32, fp32, fp32 + bias
          GemmCase c{wbits, abits, panels, s.m, s.k, s.n,
                     /*zp_per_row=*/(h & 1) != 0, /*symmetric=*/(h & 2) != 0, /*out_float=*/kind > 0,
                     /*bias=*/kind == 2, /*cmajor=*/((h >> 5) & 1) != 0};
          out.push_back(c);
        }
  return out;
}

// ---------------------------------------------------------------------------- activation x activation matmul

// matmul::run (attention's q.k^T / attn.v) on every variant's tile and panel kernels: operands stored
// row-major or transposed (strided reads), zero points per row / column or one, random codes or the
// extremes at the largest exact K (|result| just below 2^31).
struct MatmulCase {
  int64_t m, k, n;
  bool panels, a_t, b_t, z_vec;
  int extreme;  // 0: random codes; 1: (255 - 0)(255 - 0) = max; 2: (255 - 0)(0 - 255) = min

  std::string name() const {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "matmul_%s_m%lldk%lldn%lld_%s_%s_%s%s", panels ? "panel" : "tile",
                  static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(n), a_t ? "at" : "an",
                  b_t ? "bt" : "bn", z_vec ? "zvec" : "zone", extreme ? (extreme == 1 ? "_max" : "_min") : "");
    return buf;
  }
};

void run_matmul(const MatmulCase& c, const std::vector<Variant>& variants, matmul::Scratch& scratch) {
  const std::string name = c.name();
  Rng rng(name);
  const int64_t m = c.m, k = c.k, n = c.n;
  // draw order: A codes, B codes (storage order), A zero points, B zero points
  std::vector<uint8_t> a(m * k), b(k * n);
  for (auto& v : a) v = static_cast<uint8_t>(c.extreme ? 255 : rng.below(256));
  for (auto& v : b) v = static_cast<uint8_t>(c.extreme == 1 ? 255 : (c.extreme ? 0 : rng.below(256)));
  std::vector<int32_t> za(c.z_vec ? m : 1), zb(c.z_vec ? n : 1);
  for (auto& v : za) v = c.extreme ? 0 : rng.below(256);
  for (auto& v : zb) v = c.extreme == 1 ? 0 : (c.extreme ? 255 : rng.below(256));
  matmul::Problem p{};
  p.a = a.data();
  p.a_sm = c.a_t ? 1 : k;  // transposed: A stored [k][m]
  p.a_sk = c.a_t ? m : 1;
  p.b = b.data();
  p.b_sk = c.b_t ? 1 : n;  // transposed: B stored [n][k]
  p.b_sn = c.b_t ? k : 1;
  p.za = za.data();
  p.za_step = c.z_vec ? 1 : 0;
  p.zb = zb.data();
  p.zb_step = c.z_vec ? 1 : 0;
  p.m = m;
  p.n = n;
  p.k = k;
  std::vector<int32_t> ref(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t s = 0;
      for (int64_t q = 0; q < k; ++q)
        s += int64_t(a[i * p.a_sm + q * p.a_sk] - za[i * p.za_step]) * (b[q * p.b_sk + j * p.b_sn] - zb[j * p.zb_step]);
      ref[i * n + j] = static_cast<int32_t>(s);
    }
  const uint64_t expect = digest(ref);
  std::printf("%s reference %016llx\n", name.c_str(), static_cast<unsigned long long>(expect));
  std::vector<std::pair<std::string, uint64_t>> got;
  for (const Variant& v : variants) {
    std::vector<int32_t> out(m * n, 0x7fbadbad);
    p.out = out.data();
    matmul::run(p, c.panels ? v.panels : v.tiles, c.panels ? gemm::kPanel : gemm::kTileRows, scratch);
    got.emplace_back(v.name, digest(out));
  }
#if defined(__x86_64__) || defined(__i386__)
  if (!c.panels && cpu_has_avx2()) {  // the int16 layout's kernel (one layout: checked once per shape)
    std::vector<int32_t> out(m * n, 0x7fbadbad);
    p.out = out.data();
    matmul::run_i16(p, matmul::i16_avx2, scratch);
    got.emplace_back("avx2_i16", digest(out));
  }
#endif
  report(name, got, expect, "the reference");
}

void run_matmuls(const std::vector<Variant>& variants) {
  struct Shape {
    int64_t m, k, n;
  };
  // attention (65 tokens, head dim 32, both matmuls), 1-sized dims, K and N off the chunk / tile / panel
  const Shape shapes[] = {{65, 32, 65}, {65, 65, 32}, {1, 1, 1}, {1, 33, 17}, {7, 1, 3}, {3, 129, 5}, {17, 300, 20}};
  matmul::Scratch scratch;  // shared by every call, as one thread's calls share it
  int i = 0;
  for (bool panels : {false, true}) {
    for (const Shape& s : shapes) {
      const int h = i++;
      run_matmul({s.m, s.k, s.n, panels, (h & 1) != 0, (h & 2) != 0, (h & 4) == 0, 0}, variants, scratch);
    }
    for (int extreme : {1, 2})
      run_matmul({2, (int64_t{1} << 31) / (255 * 255), 5, panels, false, true, extreme == 2, extreme}, variants, scratch);
  }
}

// ---------------------------------------------------------------------------- element kernels

struct EwVariant {
  std::string name;
  bool (*quantize)(const float*, uint8_t*, int64_t, const ew::FqParams&);
  void (*fq_forward)(const float*, float*, int64_t, const ew::FqParams&, uint64_t);
  void (*fq_backward)(const float*, const float*, float*, int64_t, const ew::FqParams&, uint64_t, ew::Sums2&);
  void (*minmax)(const float*, int64_t, float&, float&);
  void (*dw_conv)(const dw::Plane&, int32_t*);
  bool (*softmax_codes)(const float*, uint8_t*, uint8_t*, int64_t, const ew::SoftmaxCodeParams&);
};

std::vector<EwVariant> ew_variants() {
  std::vector<EwVariant> v{{"portable", ew::quantize_portable, ew::fq_forward_portable, ew::fq_backward_portable,
                            gemm::minmax_portable, dw::conv_portable, ew::softmax_codes_portable}};
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_has_avx2())
    v.push_back({"avx2", ew::quantize_avx2, ew::fq_forward_avx2, ew::fq_backward_avx2, gemm::minmax_avx2,
                 dw::conv_avx2, ew::softmax_codes_avx2});
#endif
  return v;  // aarch64: these kernels are the portable ones (compiled for the NEON baseline)
}

// n floats: multiples of 2^-8 in [-128, 128), with NaN / +Inf / -Inf sprinkled in when `specials`.
std::vector<float> floats(Rng& rng, int64_t n, bool specials) {
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::ldexp(static_cast<float>(rng.below(1u << 16) - (1 << 15)), -8);
    if (specials && i % 101 == 7) x[i] = std::numeric_limits<float>::quiet_NaN();
    if (specials && i % 101 == 50) x[i] = std::numeric_limits<float>::infinity();
    if (specials && i % 101 == 77) x[i] = -std::numeric_limits<float>::infinity();
  }
  return x;
}

void run_elementwise(const std::vector<EwVariant>& variants) {
  for (int64_t n : {1, 7, 33, 1000})
    for (int bits : {2, 4, 8}) {
      const std::string base = "ew_n" + std::to_string(n) + "_b" + std::to_string(bits);
      Rng rng(base);
      const std::vector<float> x = floats(rng, n, false), xs = floats(rng, n, true), gr = floats(rng, n, false);
      const float scale = rng.scale() * 4096.f;  // codes spread over the range and past both ends
      ew::FqParams p{1.0f / scale, scale, static_cast<float>(rng.below(1u << bits)),
                     static_cast<float>((1 << bits) - 1), {}};
      ew::FqParams pd = p;  // QDrop on: about 30% of elements keep their float value
      pd.drop.seed_mix = static_cast<uint32_t>(rng.next());
      pd.drop.threshold = (uint64_t(1) << 32) * 3 / 10;
      std::map<std::string, std::vector<std::pair<std::string, uint64_t>>> got;
      for (const EwVariant& v : variants) {
        std::vector<uint8_t> q(n);
        const bool bad = v.quantize(xs.data(), q.data(), n, p);
        q.push_back(bad ? 1 : 0);
        got["quantize"].emplace_back(v.name, digest(q));
        std::vector<float> y(n), yd(n), gx(n);
        v.fq_forward(xs.data(), y.data(), n, p, 0);
        v.fq_forward(xs.data(), yd.data(), n, pd, 12345);
        got["fq_forward"].emplace_back(v.name, digest(y));
        got["fq_forward_drop"].emplace_back(v.name, digest(yd));
        ew::Sums2 sums;  // the reductions' order is the drivers' business; gx is element-wise
        v.fq_backward(gr.data(), x.data(), gx.data(), n, pd, 99, sums);
        got["fq_backward"].emplace_back(v.name, digest(gx));
        std::vector<float> mm(2);
        v.minmax(x.data(), n, mm[0], mm[1]);
        got["minmax"].emplace_back(v.name, digest(mm));
      }
      for (const auto& [op, g] : got) report(base + "_" + op, g, g.front().second, "portable");
    }
}

// Two-range softmax codes: probabilities in [0, 1] (multiples of 2^-20), the range boundary and its
// float neighbours, NaN / +-Inf / negatives sprinkled in; every shift the softmax quantizer searches.
void run_softmax_codes(const std::vector<EwVariant>& variants) {
  for (int64_t n : {1, 7, 33, 1000})
    for (int bits : {4, 8})
      for (int shift : {0, 3, 8}) {
        const std::string base = "smc_n" + std::to_string(n) + "_b" + std::to_string(bits) + "_s" + std::to_string(shift);
        Rng rng(base);
        const float levels = static_cast<float>((1 << (bits - 1)) - 1);
        const float fine = 1.0f / (levels * static_cast<float>(1 << shift)), coarse = fine * static_cast<float>(1 << shift);
        const ew::SoftmaxCodeParams sp{1.0f / fine, 1.0f / coarse, levels};
        std::vector<float> p(n);
        const float edge = (levels + 0.5f) * fine;
        for (int64_t i = 0; i < n; ++i) {
          p[i] = std::ldexp(static_cast<float>(rng.below(1u << 20)), -20);
          if (i % 97 == 5) p[i] = edge;
          if (i % 97 == 6) p[i] = std::nextafter(edge, 0.f);
          if (i % 97 == 7) p[i] = std::nextafter(edge, 1.f);
          if (i % 97 == 8) p[i] = std::numeric_limits<float>::quiet_NaN();
          if (i % 97 == 9) p[i] = std::numeric_limits<float>::infinity();
          if (i % 97 == 10) p[i] = -std::numeric_limits<float>::infinity();
          if (i % 97 == 11) p[i] = -0.25f;
        }
        std::vector<std::pair<std::string, uint64_t>> got;
        for (const EwVariant& v : variants) {
          std::vector<uint8_t> codes(2 * n + 1);
          codes[2 * n] = v.softmax_codes(p.data(), codes.data(), codes.data() + n, n, sp) ? 1 : 0;
          got.emplace_back(v.name, digest(codes));
        }
        report(base, got, got.front().second, "portable");
      }
}

void run_depthwise(const std::vector<EwVariant>& variants) {
  struct Geo {
    int64_t h, w, kh, kw, s, d;
  };
  const Geo geos[] = {{7, 9, 3, 3, 1, 1}, {12, 13, 3, 3, 2, 1}, {11, 10, 5, 3, 3, 2}, {1, 17, 1, 5, 1, 1}};
  for (const Geo& e : geos) {
    const std::string name = "dw_h" + std::to_string(e.h) + "w" + std::to_string(e.w) + "_k" + std::to_string(e.kh) +
                             "x" + std::to_string(e.kw) + "_s" + std::to_string(e.s) + "_d" + std::to_string(e.d);
    Rng rng(name);
    std::vector<int16_t> x(e.h * e.w), w(e.kh * e.kw);
    for (auto& v : x) v = static_cast<int16_t>(rng.below(511) - 255);  // code - zero point
    for (auto& v : w) v = static_cast<int16_t>(rng.below(511) - 255);
    dw::Plane p{x.data(), e.w, w.data(), e.kh, e.kw, e.s, e.s, e.d, e.d,
                (e.h - e.d * (e.kh - 1) - 1) / e.s + 1, (e.w - e.d * (e.kw - 1) - 1) / e.s + 1};
    std::vector<std::pair<std::string, uint64_t>> got;
    for (const EwVariant& v : variants) {
      std::vector<int32_t> out(p.oh * p.ow, 0x7fbadbad);
      v.dw_conv(p, out.data());
      got.emplace_back(v.name, digest(out));
    }
    report(name, got, got.front().second, "portable");
  }
}

}  // namespace

int main() {
  const auto gv = gemm_variants();
  const auto ev = ew_variants();
  std::printf("variants gemm:");
  for (const auto& v : gv) std::printf(" %s", v.name.c_str());
  std::printf(" elementwise:");
  for (const auto& v : ev) std::printf(" %s", v.name.c_str());
  std::printf("\n");
  for (const GemmCase& c : gemm_cases()) run_gemm(c, gv);
  run_matmuls(gv);
  run_elementwise(ev);
  run_softmax_codes(ev);
  run_depthwise(ev);
  std::printf("%s: %d mismatches\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
