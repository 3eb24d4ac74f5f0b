// AVX-512 AdaRound and quantize kernels for the avx512vnni level (16 lanes; the other elementwise kernels
// stay on AVX2 there). The soft AdaRound passes are bound by FP instructions (the sigmoid's exp; for beta != 2
// also the log / exp of |u|^beta), not memory, and 512-bit instructions issue on two ports like 256-bit
// ones, so 16 lanes about halve the time.
// Same formulas and fusions as elementwise_avx2.cpp; integer-valued results (hard rounding, masks)
// equal the portable kernels' bit for bit.
#include "elementwise_scalar.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
// GCC 12's avx512fintrin.h passes _mm512_undefined_ps() to the masked builtins behind plain intrinsics
// (_mm512_min_ps, ...) and then warns that it may be used uninitialized (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

namespace dfqkern::cpu::ew {
namespace {

constexpr int64_t kFlush = 16;  // vector steps between float -> double flushes of partial sums

// e^x (NEG = false) or e^-x (NEG = true), < 1 ulp from exp in double: k = round(+-16 x / ln2) from the
// 1.5 * 2^23 shifter; r = +-x - k ln2 / 16 (|r| <= ln2 / 32, Cody-Waite split; for NEG computed as
// -(x + k ln2 / 16), the polynomial's odd coefficients negated); e^r - 1 by its degree-4 Taylor polynomial
// (remainder < 1e-10); 2^(k/16) = 2^((k & 15)/16) (16-entry table: vpermps reads the low 4 bits of the
// index lanes) scaled by 2^floor(k / 16) with vscalefps, which saturates to 0 / inf by itself. x is
// clamped only so that +-inf give 0 / inf rather than NaN (NaN stays NaN).
template <bool NEG>
inline __m512 exp_of(__m512 x) {
  constexpr float s = NEG ? -1.f : 1.f;
  const __m512 shifter = _mm512_set1_ps(12582912.f);  // 1.5 * 2^23
  const __m512 table = _mm512_setr_ps(
      1.f, 1.0442737824274138f, 1.0905077326652577f, 1.1387886347566916f, 1.1892071150027210f, 1.2418578120734840f,
      1.2968395546510096f, 1.3542555469368927f, 1.4142135623730951f, 1.4768261459394993f, 1.5422108254079407f,
      1.6104903319492543f, 1.6817928305074290f, 1.7562521603732995f, 1.8340080864093424f, 1.9152065613971474f);
  x = _mm512_max_ps(_mm512_set1_ps(-110.f), _mm512_min_ps(_mm512_set1_ps(110.f), x));
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(s * 23.083120654223414f), shifter);  // 16 * log2(e)
  const __m512 k = _mm512_sub_ps(t, shifter);
  __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-s * 0.693359375f / 16), x);  // s * r
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(-s * -2.12194440e-4f / 16), r);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 24), r, _mm512_set1_ps(s / 6));  // q = e^(s r) - 1
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(s));
  q = _mm512_mul_ps(q, r);
  const __m512 p = _mm512_permutexvar_ps(_mm512_castps_si512(t), table);
  return _mm512_scalef_ps(_mm512_fmadd_ps(p, q, p), _mm512_mul_ps(k, _mm512_set1_ps(1.f / 16)));
}

// natural log of positive lanes (Cephes logf polynomial, ~1 ulp; denormals exact through getexp /
// getmant): a = m 2^e with m in [sqrt(1/2), sqrt(2)).
inline __m512 log_pos(__m512 a) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 m = _mm512_getmant_ps(a, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
  __m512 e = _mm512_getexp_ps(a);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237309505f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, one);
  const __m512 f = _mm512_sub_ps(m, one);
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(7.0376836292E-2f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.1514610310E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.1676998740E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.2420140846E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.4249322787E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.6668057665E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.0000714765E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.4999993993E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.3333331174E-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
}

// |u|^e with torch's exact special cases (as avx2::pow_abs_ps); 0^e = 0 (e > 0) or inf (e < 0).
inline __m512 pow_abs(__m512 u, float e) {
  const __m512 a = _mm512_abs_ps(u);
  if (e == 0.f) return _mm512_set1_ps(1.f);
  if (e == 1.f) return a;
  if (e == 2.f) return _mm512_mul_ps(a, a);
  if (e == 3.f) return _mm512_mul_ps(_mm512_mul_ps(a, a), a);
  if (e == 0.5f) return _mm512_sqrt_ps(a);
  const __m512 p = exp_of<false>(_mm512_mul_ps(_mm512_set1_ps(e), log_pos(a)));
  return _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_EQ_OQ),
                            _mm512_set1_ps(e > 0.f ? 0.f : __builtin_inff()));
}

inline __m512 sigmoid(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_of<true>(v)));
}

inline __m512 clamp(__m512 v, __m512 lo, __m512 hi) { return _mm512_min_ps(_mm512_max_ps(v, lo), hi); }

inline void flush_to_double(__m512& acc_f, __m512d& acc_d) {
  acc_d = _mm512_add_pd(acc_d, _mm512_cvtps_pd(_mm512_castps512_ps256(acc_f)));
  acc_d = _mm512_add_pd(acc_d, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc_f), 1))));
  acc_f = _mm512_setzero_ps();
}

struct ArVec {
  __m512 scale, zp, qmax, zero, one, two, stretch, gamma;
  explicit ArVec(const ArParams& p)
      : scale(_mm512_set1_ps(p.scale)), zp(_mm512_set1_ps(p.zp)), qmax(_mm512_set1_ps(p.qmax)),
        zero(_mm512_setzero_ps()), one(_mm512_set1_ps(1.f)), two(_mm512_set1_ps(2.f)),
        stretch(_mm512_set1_ps(kStretch)), gamma(_mm512_set1_ps(kGamma)) {}
};

// MODE 0 hard rounding (no regularizer), 1 soft with beta == 2 (|u|^2 = u*u), 2 soft, any beta.
template <int MODE>
void ar_forward_loop(const float* base, const float* v, float* w, int64_t n, const ArParams& p, double& reg) {
  const ArVec c(p);
  __m512 reg_f = _mm512_setzero_ps();
  __m512d reg_d = _mm512_setzero_pd();
  int64_t i = 0, steps = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 vv = _mm512_loadu_ps(v + i);
    __m512 h;
    if constexpr (MODE == 0) {
      h = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(vv, c.zero, _CMP_GE_OQ), c.one);
    } else {
      h = clamp(_mm512_add_ps(_mm512_mul_ps(sigmoid(vv), c.stretch), c.gamma), c.zero, c.one);
      const __m512 u = _mm512_fmsub_ps(c.two, h, c.one);
      const __m512 term = MODE == 1 ? _mm512_fnmadd_ps(u, u, c.one) : _mm512_sub_ps(c.one, pow_abs(u, p.beta));
      reg_f = _mm512_add_ps(reg_f, term);
      if (++steps == kFlush) {
        flush_to_double(reg_f, reg_d);
        steps = 0;
      }
    }
    const __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(base + i), h), c.zp);
    _mm512_storeu_ps(w + i, _mm512_mul_ps(_mm512_sub_ps(clamp(t, c.zero, c.qmax), c.zp), c.scale));
  }
  flush_to_double(reg_f, reg_d);
  double r = _mm512_reduce_add_pd(reg_d);
  for (; i < n; ++i) w[i] = ar_forward_one(base[i], v[i], p, r);
  reg += r;
}

// grad_v = dh/dv * (g * scale * inside + reg_grad * dreg/dh). MODE 1: beta == 2, so reg_grad * dreg/dh =
// (-4 reg_grad) * u; MODE 2: any beta.
template <int MODE>
void ar_backward_loop(const float* g, const float* base, const float* v, float* gv, int64_t n, const ArParams& p,
                      double& gs) {
  const ArVec c(p);
  const __m512 k_reg = _mm512_set1_ps(-4.f * p.reg_grad), reg_grad = _mm512_set1_ps(p.reg_grad),
               neg_beta = _mm512_set1_ps(-p.beta), minus_one = _mm512_set1_ps(-1.f);
  __m512 gs_f = _mm512_setzero_ps();
  __m512d gs_d = _mm512_setzero_pd();
  int64_t i = 0, steps = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 gg = _mm512_loadu_ps(g + i);
    const __m512 sig = sigmoid(_mm512_loadu_ps(v + i));
    const __m512 hs = _mm512_add_ps(_mm512_mul_ps(sig, c.stretch), c.gamma);
    const __m512 h = clamp(hs, c.zero, c.one);
    const __mmask16 soft = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(hs, c.zero, _CMP_GT_OQ), hs, c.one, _CMP_LT_OQ);
    const __m512 dh_dv = _mm512_maskz_mul_ps(soft, _mm512_fnmadd_ps(sig, sig, sig), c.stretch);
    const __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(base + i), h), c.zp);
    const __m512 cc = clamp(t, c.zero, c.qmax);
    const __mmask16 inside = _mm512_cmp_ps_mask(cc, t, _CMP_EQ_OQ);  // 0 <= t <= qmax (false for NaN)
    const __m512 task = _mm512_maskz_mul_ps(inside, gg, c.scale);
    const __m512 u = _mm512_fmsub_ps(c.two, h, c.one);
    __m512 coef;
    if constexpr (MODE == 1) {
      coef = _mm512_fmadd_ps(k_reg, u, task);
    } else {
      __m512 sgn = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(u, c.zero, _CMP_GT_OQ), c.one);
      sgn = _mm512_mask_mov_ps(sgn, _mm512_cmp_ps_mask(u, c.zero, _CMP_LT_OQ), minus_one);
      const __m512 dreg = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(neg_beta, pow_abs(u, p.beta_m1)), sgn), c.two);
      coef = _mm512_fmadd_ps(reg_grad, dreg, task);
    }
    _mm512_storeu_ps(gv + i, _mm512_mul_ps(coef, dh_dv));
    gs_f = _mm512_fmadd_ps(gg, _mm512_sub_ps(cc, c.zp), gs_f);
    if (++steps == kFlush) {
      flush_to_double(gs_f, gs_d);
      steps = 0;
    }
  }
  flush_to_double(gs_f, gs_d);
  double s = _mm512_reduce_add_pd(gs_d);
  for (; i < n; ++i) gv[i] = ar_backward_one(g[i], base[i], v[i], p, s);
  gs += s;
}

}  // namespace

// The codes of quantize_avx2 (same operations per lane: round-half-even x * inv, + zp, clamp with max / min
// taking the second operand for NaN, so NaN gives code 0, truncate), 16 lanes and a saturating 32 -> 8 bit
// store; the conv's quantize passes are ~7 % of a CIFAR ResNet-20 on a Zen 4 core at 8 lanes.
bool quantize_vnni(const float* x, uint8_t* q, int64_t n, const FqParams& p) {
  const __m512 inv = _mm512_set1_ps(p.inv), zp = _mm512_set1_ps(p.zp), qmax = _mm512_set1_ps(p.qmax);
  const __m512 zero = _mm512_setzero_ps();
  __m512i nonfinite = _mm512_setzero_si512();  // x - x: +0 for finite x, NaN otherwise (as quantize_avx2)
  const auto codes = [&](__m512 xv) {
    nonfinite = _mm512_or_si512(nonfinite, _mm512_castps_si512(_mm512_sub_ps(xv, xv)));
    __m512 t = _mm512_add_ps(_mm512_roundscale_ps(_mm512_mul_ps(xv, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
    t = _mm512_min_ps(_mm512_max_ps(t, zero), qmax);
    return _mm512_cvttps_epu32(_mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtusepi32_epi8(codes(_mm512_loadu_ps(x + i))));
  if (i < n) {  // tail: masked load (zeros past n are finite) and store
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtusepi32_epi8(codes(_mm512_maskz_loadu_ps(m, x + i))));
  }
  return _mm512_test_epi32_mask(nonfinite, nonfinite) != 0;
}

void ar_forward_vnni(const float* base, const float* v, float* w, int64_t n, const ArParams& p, double& reg) {
  if (p.hard) ar_forward_loop<0>(base, v, w, n, p, reg);
  else if (p.beta == 2.f) ar_forward_loop<1>(base, v, w, n, p, reg);
  else ar_forward_loop<2>(base, v, w, n, p, reg);
}

void ar_backward_vnni(const float* g, const float* base, const float* v, float* gv, int64_t n, const ArParams& p,
                      double& gs) {
  if (p.beta == 2.f && p.beta_m1 == 1.f) ar_backward_loop<1>(g, base, v, gv, n, p, gs);
  else ar_backward_loop<2>(g, base, v, gv, n, p, gs);
}

}  // namespace dfqkern::cpu::ew
