// Scalar element functions: the portable kernels' bodies and the AVX2 kernels' tails.
// Included BEFORE any `#pragma GCC target`, so these inline functions are always baseline code.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/lowbias32.h"
#include "../common/rounding.h"
#include "elementwise.h"

namespace dfqkern::cpu::ew {

using rounding::kGamma;
using rounding::kStretch;

inline uint32_t hash32(uint32_t index, uint32_t seed_mix) { return lowbias32(index, seed_mix); }

inline bool dropped(const Drop& d, uint64_t index) {
  return d.threshold != 0 && hash32(static_cast<uint32_t>(index), d.seed_mix) < d.threshold;
}

inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// trunc(clamp(round(x * inv) + zp, 0, qmax)) as a float holding the code; NaN -> 0 (as the AVX2
// max_ps and the reference do), +-Inf saturate.
inline float code_of(float x, const FqParams& p) {
  const float t = std::nearbyint(x * p.inv) + p.zp;
  if (std::isnan(t)) return 0.f;
  return std::trunc(clampf(t, 0.f, p.qmax));
}

inline float fq_forward_one(float x, const FqParams& p, uint64_t index) {
  if (dropped(p.drop, index)) return x;
  if (!std::isfinite(x)) return std::numeric_limits<float>::quiet_NaN();
  return (code_of(x, p) - p.zp) * p.scale;
}

inline float fq_backward_one(float g, float x, const FqParams& p, uint64_t index, double& ds, double& dz) {
  const float xs = x * p.inv;
  const float r = std::nearbyint(xs);
  const float t = r + p.zp;
  const bool below = t < 0.f, above = t > p.qmax, inside = !(below || above);
  const float inside_f = inside ? 1.f : 0.f;
  float gq = g, gx = g * inside_f;
  if (dropped(p.drop, index)) {
    gq = g * 0.f;
    gx = g;
  }
  ds += gq * (inside ? (r - xs) : (below ? -p.zp : p.qmax - p.zp));
  dz += gq * (inside ? 0.f : -p.scale);
  return gx;
}

inline float sigmoidf(float v) { return 1.f / (1.f + std::exp(-v)); }

// |u|^e as torch computes pow(tensor, scalar): exponents 1 and 2 are exact special cases.
inline float powf_abs(float u, float e) {
  const float a = std::fabs(u);
  if (e == 0.f) return 1.f;
  if (e == 1.f) return a;
  if (e == 2.f) return a * a;
  if (e == 3.f) return a * a * a;
  if (e == 0.5f) return std::sqrt(a);
  return std::pow(a, e);
}

inline float ar_forward_one(float base, float v, const ArParams& p, double& reg) {
  float h;
  if (p.hard) {
    h = v >= 0.f ? 1.f : 0.f;
  } else {
    h = clampf(sigmoidf(v) * kStretch + kGamma, 0.f, 1.f);
    reg += 1.f - powf_abs(2.f * h - 1.f, p.beta);
  }
  const float c = clampf(base + h + p.zp, 0.f, p.qmax);
  return (c - p.zp) * p.scale;
}

inline float ar_backward_one(float g, float base, float v, const ArParams& p, double& gs) {
  const float sig = sigmoidf(v);
  const float hs = sig * kStretch + kGamma;
  const float h = clampf(hs, 0.f, 1.f);
  const float dh_dv = (hs > 0.f && hs < 1.f) ? sig * (1.f - sig) * kStretch : 0.f;
  const float t = base + h + p.zp;
  const bool inside = t >= 0.f && t <= p.qmax;
  const float c = clampf(t, 0.f, p.qmax);
  const float u = 2.f * h - 1.f;
  const float sgn = u > 0.f ? 1.f : (u < 0.f ? -1.f : 0.f);
  const float dreg_dh = -p.beta * powf_abs(u, p.beta_m1) * sgn * 2.f;
  gs += g * (c - p.zp);
  return g * p.scale * (inside ? 1.f : 0.f) * dh_dv + p.reg_grad * dreg_dh * dh_dv;
}

// One probability's (fine, coarse) codes (see SoftmaxCodeParams); returns true for NaN.
inline bool softmax_code_of(float p, const SoftmaxCodeParams& s, uint8_t& fine, uint8_t& coarse) {
  const float lo = std::nearbyint(p * s.inv_fine);
  if (lo <= s.levels) {  // false for NaN
    fine = static_cast<uint8_t>(clampf(lo, 0.f, s.levels));
    coarse = 0;
    return false;
  }
  fine = 0;
  if (std::isnan(p)) {
    coarse = 0;
    return true;
  }
  coarse = static_cast<uint8_t>(clampf(std::nearbyint(p * s.inv_coarse), 0.f, s.levels));
  return false;
}

}  // namespace dfqkern::cpu::ew
