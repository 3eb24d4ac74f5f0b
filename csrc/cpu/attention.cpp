// ATen driver of the packed attention core on a fused qkv projection's output (one op per attention
// module at batch 1, where the step-by-step path spends more on ~25 torch calls than on arithmetic).
// Per (batch, head), on the calling threads: the q / k / v codes (elementwise quantize), q.k^T (the
// attention matmul kernels, matmul.h), scores in fp32; then torch's own softmax over all heads (so the
// probabilities are those of the step-by-step path, bit for bit); then per (batch, head) the two-range
// softmax codes (elementwise softmax_codes), both code ranges against v in one product, and the fp32
// epilogue, written [B, N, H * d].
#include <ATen/ATen.h>

#include <limits>
#include <vector>

#include "common.h"
#include "elementwise.h"
#include "kernels.h"
#include "matmul.h"

namespace dfqkern::cpu {

at::Tensor attention_qkv(const at::Tensor& qkv_in, int64_t heads, double q_mult, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t bits, double fine_step, double coarse_step,
                         int64_t levels) {
  const at::Tensor x = qkv_in.contiguous();
  const int64_t nb = x.size(0), n = x.size(1), c3 = x.size(2), c = c3 / 3, d = c / heads;
  // one-element-per-operand tensors: converted only when not float32 / int32 already (each ATen call here
  // costs about as much as a head's quantize pass)
  const at::Tensor sf = scale.scalar_type() == at::kFloat && scale.is_contiguous() ? scale
                                                                                   : scale.to(at::kFloat).contiguous();
  const at::Tensor zi = zero_point.scalar_type() == at::kInt && zero_point.is_contiguous()
                            ? zero_point : zero_point.to(at::kInt).contiguous();
  const int64_t per = sf.numel() / 3;  // parameters per operand: 1 (per tensor) or heads (per head)
  // the step-by-step path's fp32 values: 1 / scale, (float) zero point, qs * ks, 1 / step, (float) q_mult
  std::vector<ew::FqParams> params(static_cast<size_t>(3 * per));
  const float qmax = static_cast<float>((1 << bits) - 1);
  for (int64_t i = 0; i < 3 * per; ++i) {
    const float s = sf.data_ptr<float>()[i];
    params[i] = ew::FqParams{1.0f / s, s, static_cast<float>(zi.data_ptr<int32_t>()[i]), qmax, {}};
  }
  const auto param = [&](int64_t t, int64_t h) -> const ew::FqParams& { return params[t * per + (per > 1 ? h : 0)]; };
  const float mult = static_cast<float>(q_mult), fine = static_cast<float>(fine_step);
  const float coarse = static_cast<float>(coarse_step);
  const ew::SoftmaxCodeParams sp{1.0f / fine, 1.0f / coarse, static_cast<float>(levels)};
  const auto quantize = ew::quantize_kernel();
  const auto softmax_codes = DFQKERN_AVX2_OR_PORTABLE(ew, softmax_codes);

  at::Tensor out = at::empty({nb, n, c}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return out;
  const float* xp = x.data_ptr<float>();
  std::vector<uint8_t> codes(static_cast<size_t>(nb * n * c3));  // [B, N, 3, H, d], as qkv
  at::Tensor scores = at::empty({nb, heads, n, n}, out.options());
  float* sc = scores.data_ptr<float>();
  const int64_t items = nb * heads, head_cost = 2 * n * n * d + 3 * n * d * kElementCost;

  parallel_for(items, head_cost, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(static_cast<size_t>(d));
    std::vector<int32_t> acc(static_cast<size_t>(n * n));
    matmul::Scratch s;
    for (int64_t it = b0; it < b1; ++it) {
      const int64_t b = it / heads, h = it % heads;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = (b * n + i) * c3 + h * d;
        for (int64_t j = 0; j < d; ++j) tmp[j] = xp[row + j] * mult;
        quantize(tmp.data(), codes.data() + row, d, param(0, h));
        quantize(xp + row + c, codes.data() + row + c, d, param(1, h));
        quantize(xp + row + 2 * c, codes.data() + row + 2 * c, d, param(2, h));
      }
      const int32_t zq = static_cast<int32_t>(param(0, h).zp), zk = static_cast<int32_t>(param(1, h).zp);
      matmul::Problem p{};
      p.a = codes.data() + b * n * c3 + h * d;  // q [N, d]
      p.a_sm = c3;
      p.a_sk = 1;
      p.b = p.a + c;  // k^T [d, N]
      p.b_sk = 1;
      p.b_sn = c3;
      p.za = &zq;
      p.zb = &zk;
      p.m = p.n = n;
      p.k = d;
      p.out = acc.data();
      matmul::run_active(p, s);
      const float qk = param(0, h).scale * param(1, h).scale;
      float* o = sc + it * n * n;
      for (int64_t i = 0; i < n * n; ++i) o[i] = static_cast<float>(acc[i]) * qk;
    }
  });

  const at::Tensor probs = at::_softmax(scores, -1, false);
  const float* pp = probs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_for(items, head_cost, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> pc(static_cast<size_t>(2 * n * n));  // fine code rows, then coarse code rows
    std::vector<uint8_t> nan_row(static_cast<size_t>(n));
    std::vector<int32_t> acc(static_cast<size_t>(2 * n * d));
    matmul::Scratch s;
    const int32_t zero = 0;
    for (int64_t it = b0; it < b1; ++it) {
      const int64_t b = it / heads, h = it % heads;
      for (int64_t i = 0; i < n; ++i)
        nan_row[i] = softmax_codes(pp + (it * n + i) * n, pc.data() + i * n, pc.data() + (n + i) * n, n, sp);
      const int32_t zv = static_cast<int32_t>(param(2, h).zp);
      matmul::Problem p{};
      p.a = pc.data();  // [2N, S]
      p.a_sm = n;
      p.a_sk = 1;
      p.b = codes.data() + b * n * c3 + 2 * c + h * d;  // v [S, d]
      p.b_sk = c3;
      p.b_sn = 1;
      p.za = &zero;
      p.zb = &zv;
      p.m = 2 * n;
      p.n = d;
      p.k = n;
      p.out = acc.data();
      matmul::run_active(p, s);
      const float vs = param(2, h).scale;
      for (int64_t i = 0; i < n; ++i) {
        float* o = op + (b * n + i) * c + h * d;
        const int32_t* af = acc.data() + i * d;
        const int32_t* ac = acc.data() + (n + i) * d;
        if (nan_row[i]) {  // a row holding NaN stays NaN, as in float
          for (int64_t j = 0; j < d; ++j) o[j] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        // the step-by-step path's (acc_fine * fine + acc_coarse * coarse) * vs, in that order (no FMA)
        for (int64_t j = 0; j < d; ++j)
          o[j] = (static_cast<float>(af[j]) * fine + static_cast<float>(ac[j]) * coarse) * vs;
      }
    }
  });
  return out;
}

}  // namespace dfqkern::cpu
