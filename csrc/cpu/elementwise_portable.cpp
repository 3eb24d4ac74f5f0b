// Portable elementwise kernels: plain loops over the scalar element functions.
#include "elementwise_scalar.h"

namespace dfqkern::cpu::ew {

bool quantize_portable(const float* x, uint8_t* q, int64_t n, const FqParams& p) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    q[i] = static_cast<uint8_t>(code_of(x[i], p));
    bad |= !std::isfinite(x[i]);
  }
  return bad;
}

void fq_forward_portable(const float* x, float* y, int64_t n, const FqParams& p, uint64_t idx0) {
  for (int64_t i = 0; i < n; ++i) y[i] = fq_forward_one(x[i], p, idx0 + i);
}

void fq_backward_portable(const float* g, const float* x, float* gx, int64_t n, const FqParams& p, uint64_t idx0,
                          Sums2& sums) {
  double ds = 0, dz = 0;
  for (int64_t i = 0; i < n; ++i) gx[i] = fq_backward_one(g[i], x[i], p, idx0 + i, ds, dz);
  sums.a += ds;
  sums.b += dz;
}

void ar_forward_portable(const float* base, const float* v, float* w, int64_t n, const ArParams& p, double& reg) {
  double r = 0;
  for (int64_t i = 0; i < n; ++i) w[i] = ar_forward_one(base[i], v[i], p, r);
  reg += r;
}

void ar_backward_portable(const float* g, const float* base, const float* v, float* gv, int64_t n,
                          const ArParams& p, double& gs) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) gv[i] = ar_backward_one(g[i], base[i], v[i], p, s);
  gs += s;
}

bool softmax_codes_portable(const float* p, uint8_t* fine, uint8_t* coarse, int64_t n, const SoftmaxCodeParams& s) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) nan |= softmax_code_of(p[i], s, fine[i], coarse[i]);
  return nan;
}

}  // namespace dfqkern::cpu::ew
