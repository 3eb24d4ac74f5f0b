// AVX2 elementwise kernels: 8 lanes per step, the scalar element functions for the tail.
// Integer-valued results (codes, STE masks, QDrop masks) equal the portable kernels' bit for bit;
// the AdaRound sigmoid / pow use Cephes-style exp / log (about 1 ulp from libm).
#include "elementwise_scalar.h"

#pragma GCC target("avx2,fma,f16c")
#include "avx2_math.h"

namespace dfqkern::cpu::ew {
namespace {

using namespace dfqkern::cpu::avx2;

constexpr int64_t kFlush = 16;  // vector steps between float -> double flushes of partial sums

struct VecParams {
  __m256 inv, scale, zp, qmax, zero;
  explicit VecParams(const FqParams& p)
      : inv(_mm256_set1_ps(p.inv)), scale(_mm256_set1_ps(p.scale)), zp(_mm256_set1_ps(p.zp)),
        qmax(_mm256_set1_ps(p.qmax)), zero(_mm256_setzero_ps()) {}
};

// QDrop lanes (all-ones where the element keeps its float value) for indices idx .. idx+7.
struct DropVec {
  bool on, all;
  __m256i seed, thr_biased, lanes, bias;
  explicit DropVec(const Drop& d)
      : on(d.threshold != 0), all(d.threshold >= (uint64_t(1) << 32)),
        seed(_mm256_set1_epi32(static_cast<int>(d.seed_mix))),
        thr_biased(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(d.threshold) ^ 0x80000000u))),
        lanes(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), bias(_mm256_set1_epi32(static_cast<int>(0x80000000u))) {}
  __m256 mask(uint64_t idx) const {
    if (all) return _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    const __m256i i = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(idx))), lanes);
    const __m256i h = hash32_epi32(i, seed);
    // unsigned h < thr  <=>  signed (h ^ 2^31) < (thr ^ 2^31)
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(thr_biased, _mm256_xor_si256(h, bias)));
  }
};

inline __m256 round_even(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline __m256 clamp_ps(__m256 v, __m256 lo, __m256 hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }

inline __m256 code_ps(__m256 x, const VecParams& v) {
  const __m256 t = _mm256_add_ps(round_even(_mm256_mul_ps(x, v.inv)), v.zp);
  return _mm256_round_ps(clamp_ps(t, v.zero, v.qmax), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
}

}  // namespace

bool quantize_avx2(const float* x, uint8_t* q, int64_t n, const FqParams& p) {
  const VecParams v(p);
  // Non-finite detection: x - x is +0.0 (all bits clear) for finite x and NaN otherwise, so OR-ing
  // it into one register costs two cheap ops per 8 elements and no branch in the loop.
  __m256 nonfinite = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    nonfinite = _mm256_or_ps(nonfinite, _mm256_sub_ps(xv, xv));
    const __m256i c = _mm256_cvttps_epi32(code_ps(xv, v));  // NaN: max_ps returns 0, so code 0
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(w, w));
  }
  const __m256i nf = _mm256_castps_si256(nonfinite);
  bool bad = !_mm256_testz_si256(nf, nf);
  for (; i < n; ++i) {
    q[i] = static_cast<uint8_t>(code_of(x[i], p));
    bad |= !std::isfinite(x[i]);
  }
  return bad;
}

void fq_forward_avx2(const float* x, float* y, int64_t n, const FqParams& p, uint64_t idx0) {
  const VecParams v(p);
  const DropVec d(p.drop);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    __m256 out = _mm256_mul_ps(_mm256_sub_ps(code_ps(xv, v), v.zp), v.scale);
    out = _mm256_add_ps(out, _mm256_sub_ps(xv, xv));  // + 0 for finite x, NaN for NaN / +-Inf
    if (d.on) out = _mm256_blendv_ps(out, xv, d.mask(idx0 + i));
    _mm256_storeu_ps(y + i, out);
  }
  for (; i < n; ++i) y[i] = fq_forward_one(x[i], p, idx0 + i);
}

void fq_backward_avx2(const float* g, const float* x, float* gx, int64_t n, const FqParams& p, uint64_t idx0,
                      Sums2& sums) {
  const VecParams v(p);
  const DropVec d(p.drop);
  const __m256 one = _mm256_set1_ps(1.f), neg_zp = _mm256_sub_ps(v.zero, v.zp), hi_term = _mm256_sub_ps(v.qmax, v.zp),
               neg_s = _mm256_sub_ps(v.zero, v.scale);
  __m256 ds_f = _mm256_setzero_ps(), dz_f = _mm256_setzero_ps();
  __m256d ds_d = _mm256_setzero_pd(), dz_d = _mm256_setzero_pd();
  int64_t i = 0, steps = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 xs = _mm256_mul_ps(_mm256_loadu_ps(x + i), v.inv);
    const __m256 r = round_even(xs);
    const __m256 t = _mm256_add_ps(r, v.zp);
    const __m256 below = _mm256_cmp_ps(t, v.zero, _CMP_LT_OQ);
    const __m256 above = _mm256_cmp_ps(t, v.qmax, _CMP_GT_OQ);
    const __m256 outside = _mm256_or_ps(below, above);
    __m256 gq = gv;
    __m256 g_out = _mm256_mul_ps(gv, _mm256_andnot_ps(outside, one));  // g * inside, as torch multiplies
    if (d.on) {
      const __m256 m = d.mask(idx0 + i);
      gq = _mm256_blendv_ps(gv, _mm256_mul_ps(gv, v.zero), m);
      g_out = _mm256_blendv_ps(g_out, gv, m);
    }
    _mm256_storeu_ps(gx + i, g_out);
    const __m256 clipped = _mm256_blendv_ps(hi_term, neg_zp, below);
    ds_f = _mm256_add_ps(ds_f, _mm256_mul_ps(gq, _mm256_blendv_ps(_mm256_sub_ps(r, xs), clipped, outside)));
    dz_f = _mm256_add_ps(dz_f, _mm256_mul_ps(gq, _mm256_and_ps(neg_s, outside)));
    if (++steps == kFlush) {
      flush_to_double(ds_f, ds_d);
      flush_to_double(dz_f, dz_d);
      steps = 0;
    }
  }
  flush_to_double(ds_f, ds_d);
  flush_to_double(dz_f, dz_d);
  double ds = hsum_pd(ds_d), dz = hsum_pd(dz_d);
  for (; i < n; ++i) gx[i] = fq_backward_one(g[i], x[i], p, idx0 + i, ds, dz);
  sums.a += ds;
  sums.b += dz;
}

namespace {

struct ArVec {
  __m256 scale, zp, qmax, zero, one, stretch, gamma;
  explicit ArVec(const ArParams& p)
      : scale(_mm256_set1_ps(p.scale)), zp(_mm256_set1_ps(p.zp)), qmax(_mm256_set1_ps(p.qmax)),
        zero(_mm256_setzero_ps()), one(_mm256_set1_ps(1.f)), stretch(_mm256_set1_ps(kStretch)),
        gamma(_mm256_set1_ps(kGamma)) {}
};

// The exponent cases are template parameters so the loops carry no per-step branches:
// MODE 0 hard rounding (no regularizer), 1 soft with beta == 2 (|u|^2 = u*u), 2 soft, any beta.
// The soft loops are bound by FMA-port instructions, not memory (at 1 thread, about 1.5x the time the
// same bytes take to stream), so terms that do not feed h are fused where that saves an instruction
// (1 - u*u, sig - sig^2, the sums; 2h - 1 is exact either way): one rounding fewer, within the sigmoid's
// own ulp error. h itself keeps the reference's two roundings (sig * stretch, + gamma): near u = 0 the
// regularizer's |u|^(beta-1) magnifies any difference in h.
template <int MODE>
void ar_forward_loop(const float* base, const float* v, float* w, int64_t n, const ArParams& p, double& reg) {
  const ArVec c(p);
  const __m256 two = _mm256_set1_ps(2.f);
  __m256 reg_f = _mm256_setzero_ps();
  __m256d reg_d = _mm256_setzero_pd();
  int64_t i = 0, steps = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vv = _mm256_loadu_ps(v + i);
    __m256 h;
    if constexpr (MODE == 0) {
      h = _mm256_and_ps(_mm256_cmp_ps(vv, c.zero, _CMP_GE_OQ), c.one);
    } else {
      h = clamp_ps(_mm256_add_ps(_mm256_mul_ps(sigmoid_ps(vv), c.stretch), c.gamma), c.zero, c.one);
      const __m256 u = _mm256_fmsub_ps(two, h, c.one);
      const __m256 term = MODE == 1 ? _mm256_fnmadd_ps(u, u, c.one) : _mm256_sub_ps(c.one, pow_abs_ps(u, p.beta));
      reg_f = _mm256_add_ps(reg_f, term);
      if (++steps == kFlush) {
        flush_to_double(reg_f, reg_d);
        steps = 0;
      }
    }
    const __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(base + i), h), c.zp);
    _mm256_storeu_ps(w + i, _mm256_mul_ps(_mm256_sub_ps(clamp_ps(t, c.zero, c.qmax), c.zp), c.scale));
  }
  flush_to_double(reg_f, reg_d);
  double r = hsum_pd(reg_d);
  for (; i < n; ++i) w[i] = ar_forward_one(base[i], v[i], p, r);
  reg += r;
}

// grad_v = dh/dv * (g * scale * inside + reg_grad * dreg/dh): dh/dv factored out of the reference's two
// products. MODE 1: beta == 2, so reg_grad * dreg/dh = (-4 reg_grad) * u; MODE 2: any beta.
template <int MODE>
void ar_backward_loop(const float* g, const float* base, const float* v, float* gv, int64_t n, const ArParams& p,
                      double& gs) {
  const ArVec c(p);
  const __m256 two = _mm256_set1_ps(2.f), neg_beta = _mm256_set1_ps(-p.beta), reg_grad = _mm256_set1_ps(p.reg_grad),
               k_reg = _mm256_set1_ps(-4.f * p.reg_grad);
  __m256 gs_f = _mm256_setzero_ps();
  __m256d gs_d = _mm256_setzero_pd();
  int64_t i = 0, steps = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gg = _mm256_loadu_ps(g + i);
    const __m256 sig = sigmoid_ps(_mm256_loadu_ps(v + i));
    const __m256 hs = _mm256_add_ps(_mm256_mul_ps(sig, c.stretch), c.gamma);
    const __m256 h = clamp_ps(hs, c.zero, c.one);
    const __m256 soft = _mm256_and_ps(_mm256_cmp_ps(hs, c.zero, _CMP_GT_OQ), _mm256_cmp_ps(hs, c.one, _CMP_LT_OQ));
    const __m256 dh_dv = _mm256_and_ps(soft, _mm256_mul_ps(_mm256_fnmadd_ps(sig, sig, sig), c.stretch));
    const __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(base + i), h), c.zp);
    const __m256 cc = clamp_ps(t, c.zero, c.qmax);
    const __m256 inside = _mm256_cmp_ps(cc, t, _CMP_EQ_OQ);  // 0 <= t <= qmax (false for NaN)
    const __m256 u = _mm256_fmsub_ps(two, h, c.one);
    const __m256 task = _mm256_and_ps(_mm256_mul_ps(gg, c.scale), inside);
    __m256 coef;
    if constexpr (MODE == 1) {
      coef = _mm256_fmadd_ps(k_reg, u, task);
    } else {
      const __m256 sgn = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(u, c.zero, _CMP_GT_OQ), c.one),
                                       _mm256_and_ps(_mm256_cmp_ps(u, c.zero, _CMP_LT_OQ), c.one));
      const __m256 dreg = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(neg_beta, pow_abs_ps(u, p.beta_m1)), sgn), two);
      coef = _mm256_fmadd_ps(reg_grad, dreg, task);
    }
    _mm256_storeu_ps(gv + i, _mm256_mul_ps(coef, dh_dv));
    gs_f = _mm256_fmadd_ps(gg, _mm256_sub_ps(cc, c.zp), gs_f);
    if (++steps == kFlush) {
      flush_to_double(gs_f, gs_d);
      steps = 0;
    }
  }
  flush_to_double(gs_f, gs_d);
  double s = hsum_pd(gs_d);
  for (; i < n; ++i) gv[i] = ar_backward_one(g[i], base[i], v[i], p, s);
  gs += s;
}

}  // namespace

void ar_forward_avx2(const float* base, const float* v, float* w, int64_t n, const ArParams& p, double& reg) {
  if (p.hard) ar_forward_loop<0>(base, v, w, n, p, reg);
  else if (p.beta == 2.f) ar_forward_loop<1>(base, v, w, n, p, reg);
  else ar_forward_loop<2>(base, v, w, n, p, reg);
}

void ar_backward_avx2(const float* g, const float* base, const float* v, float* gv, int64_t n, const ArParams& p,
                      double& gs) {
  if (p.beta == 2.f && p.beta_m1 == 1.f) ar_backward_loop<1>(g, base, v, gv, n, p, gs);
  else ar_backward_loop<2>(g, base, v, gv, n, p, gs);
}

namespace {

inline void store_codes(uint8_t* q, __m256 v) {  // 8 integer-valued floats in [0, 255] -> bytes
  const __m256i c = _mm256_cvttps_epi32(v);
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packus_epi16(w, w));
}

}  // namespace

bool softmax_codes_avx2(const float* p, uint8_t* fine, uint8_t* coarse, int64_t n, const SoftmaxCodeParams& s) {
  const __m256 inv_f = _mm256_set1_ps(s.inv_fine), inv_c = _mm256_set1_ps(s.inv_coarse);
  const __m256 levels = _mm256_set1_ps(s.levels), zero = _mm256_setzero_ps();
  __m256 nan = zero;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(p + i);
    const __m256 lo = round_even(_mm256_mul_ps(x, inv_f));
    const __m256 in_fine = _mm256_cmp_ps(lo, levels, _CMP_LE_OQ);  // false for NaN
    const __m256 ordered = _mm256_cmp_ps(x, x, _CMP_ORD_Q);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m256 hi = clamp_ps(round_even(_mm256_mul_ps(x, inv_c)), zero, levels);  // max_ps(NaN, 0) = 0
    store_codes(fine + i, _mm256_and_ps(in_fine, _mm256_max_ps(lo, zero)));
    store_codes(coarse + i, _mm256_andnot_ps(in_fine, _mm256_and_ps(ordered, hi)));
  }
  bool any = !_mm256_testz_ps(nan, nan);
  for (; i < n; ++i) any |= softmax_code_of(p[i], s, fine[i], coarse[i]);
  return any;
}

}  // namespace dfqkern::cpu::ew
