// AVX2 vector helpers (exp, log, pow of |u|, horizontal sums, fp16/bf16 loads).
// Include ONLY after `#pragma GCC target("avx2,fma,f16c")` in *_avx2.cpp files. Everything here is
// `static inline`, so no AVX2 code can leak into baseline callers through the linker.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace dfqkern::cpu::avx2 {

// exp for fp32 lanes (Cephes expf: range reduction by ln2, degree-5 polynomial; ~1 ulp).
static inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  e = _mm256_slli_epi32(e, 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
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
