// AVX2 vector helpers (exp, log, pow of |u|, horizontal sums, fp16/bf16 loads).
// Include ONLY after `#pragma GCC target("avx2,fma,f16c")` in *_avx2.cpp files. Everything here is
// `static inline`, so no AVX2 code can leak into baseline callers through the linker.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace dfqkern::cpu::avx2 {

// exp for fp32 lanes (< 1 ulp from exp in double) in few FMA-port instructions (they bound the AdaRound
// sigmoid): x is clamped to [ln(FLT_MIN), 88.38] so 2^n stays a normal number; k = round(8x / ln2) comes
// from the 1.5 * 2^23 shifter (fma(x, 8 log2e, shifter) rounds to an integer and leaves k in the low
// mantissa bits: no round / convert instructions); r = x - k ln2 / 8 (|r| <= ln2 / 16, Cody-Waite split);
// e^r - 1 by its degree-4 Taylor polynomial (remainder < 2e-9); 2^(k/8) = 2^(k >> 3) * 2^((k & 7)/8) from
// an 8-entry table (vpermps reads the low 3 bits of the index lanes itself) whose entries hold
// bits(2^(j/8)) - (j << 20), so adding k << 20 as integers adds the exponent (k >> 3) << 23 and j << 20 back.
static inline __m256 exp_ps(__m256 x) {
  const __m256 shifter = _mm256_set1_ps(12582912.f);  // 1.5 * 2^23
  const __m256i table = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_setr_ps(1.f, 1.0905077326652577f, 1.1892071150027210f, 1.2968395546510096f,
                                         1.4142135623730951f, 1.5422108254079407f, 1.6817928305074290f,
                                         1.8340080864093424f)),
      _mm256_setr_epi32(0, 1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20, 6 << 20, 7 << 20));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447505531f));
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(11.541560327111707f), shifter);  // 8 * log2(e)
  const __m256 k = _mm256_sub_ps(t, shifter);
  x = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f / 8), x);
  x = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f / 8), x);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 24), x, _mm256_set1_ps(1.f / 6));  // q = e^r - 1
  q = _mm256_fmadd_ps(q, x, _mm256_set1_ps(0.5f));
  q = _mm256_fmadd_ps(q, x, _mm256_set1_ps(1.f));
  q = _mm256_mul_ps(q, x);
  const __m256i ti = _mm256_castps_si256(t);
  const __m256 pow2 = _mm256_castsi256_ps(_mm256_add_epi32(
      _mm256_castps_si256(_mm256_permutevar8x32_ps(_mm256_castsi256_ps(table), ti)), _mm256_slli_epi32(ti, 20)));
  return _mm256_fmadd_ps(pow2, q, pow2);  // 2^(k/8) (1 + q) in one rounding
}

// natural log for positive normal fp32 lanes (Cephes logf; ~1 ulp).
static inline __m256 log_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x00800000)));  // smallest normal
  __m256i i = _mm256_srli_epi32(_mm256_castps_si256(x), 23);
  x = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(~0x7f800000)));
  x = _mm256_or_ps(x, _mm256_set1_ps(0.5f));
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(i, _mm256_set1_epi32(126)));
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  const __m256 tmp = _mm256_and_ps(x, small);
  x = _mm256_sub_ps(x, _mm256_set1_ps(1.f));
  e = _mm256_sub_ps(e, _mm256_and_ps(_mm256_set1_ps(1.f), small));
  x = _mm256_add_ps(x, tmp);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.1514610310E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.1676998740E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.2420140846E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.4249322787E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.6668057665E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(2.0000714765E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-2.4999993993E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(3.3333331174E-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  x = _mm256_add_ps(x, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), x);
}

static inline __m256 abs_ps(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }

// |u|^e with torch's exact special cases for e in {0, 1, 2, 3, 0.5}; otherwise exp(e * log|u|),
// with 0^e = 0 (e > 0) or inf (e < 0).
static inline __m256 pow_abs_ps(__m256 u, float e) {
  const __m256 a = abs_ps(u);
  if (e == 0.f) return _mm256_set1_ps(1.f);
  if (e == 1.f) return a;
  if (e == 2.f) return _mm256_mul_ps(a, a);
  if (e == 3.f) return _mm256_mul_ps(_mm256_mul_ps(a, a), a);
  if (e == 0.5f) return _mm256_sqrt_ps(a);
  const __m256 p = exp_ps(_mm256_mul_ps(_mm256_set1_ps(e), log_ps(a)));
  const __m256 zero = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_EQ_OQ);
  return _mm256_blendv_ps(p, _mm256_set1_ps(e > 0.f ? 0.f : __builtin_inff()), zero);
}

static inline __m256 sigmoid_ps(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

static inline double hsum_pd(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// acc_d += widen(acc_f); acc_f = 0. Keeps long runs accurate at the cost of two converts per flush.
static inline void flush_to_double(__m256& acc_f, __m256d& acc_d) {
  acc_d = _mm256_add_pd(acc_d, _mm256_cvtps_pd(_mm256_castps256_ps128(acc_f)));
  acc_d = _mm256_add_pd(acc_d, _mm256_cvtps_pd(_mm256_extractf128_ps(acc_f, 1)));
  acc_f = _mm256_setzero_ps();
}

// lowbias32 hash of 8 consecutive indices (uint32 lanes).
static inline __m256i hash32_epi32(__m256i x, __m256i seed_mix) {
  x = _mm256_add_epi32(x, seed_mix);
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// Horizontal sums of four int32x8 accumulators -> [s0, s1, s2, s3].
static inline __m128i hsum4_epi32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

}  // namespace dfqkern::cpu::avx2
