// Drivers of the elementwise kernels: tensor -> [outer, C, inner] runs, dtype conversion per chunk,
// threading, and deterministic reduction of per-run partial sums.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "common.h"
#include "float_io.h"
#include "elementwise.h"
#include "kernels.h"

namespace dfqkern::cpu {
namespace {

using ew::ArParams;
using ew::FqParams;
using ew::Sums2;

constexpr int64_t kChunk = 4096;  // elements per work item (and per fp16/bf16 conversion buffer)

// x viewed as [outer, C, inner] for per-channel parameters along `axis` (C = 1 per-tensor).
struct Layout {
  int64_t outer = 1, channels = 1, inner = 1;
  int64_t chunks_per_row = 1, items = 0;
  Layout(const at::Tensor& x, std::optional<int64_t> axis) {
    if (axis) {
      const int64_t a = *axis;
      for (int64_t d = 0; d < x.dim(); ++d) {
        if (d < a) outer *= x.size(d);
        else if (d == a) channels = x.size(d);
        else inner *= x.size(d);
      }
    } else {
      inner = x.numel();
    }
    chunks_per_row = std::max<int64_t>(1, (inner + kChunk - 1) / kChunk);
    items = inner == 0 ? 0 : outer * channels * chunks_per_row;
  }
  // item -> (channel, flat offset, length)
  void item(int64_t it, int64_t& c, int64_t& off, int64_t& len) const {
    const int64_t row = it / chunks_per_row, j0 = (it % chunks_per_row) * kChunk;
    c = row % channels;
    off = row * inner + j0;
    len = std::min(kChunk, inner - j0);
  }
};

// Per-channel fp32 parameters: inv = 1/scale in fp32 (as torch computes 1.0 / scale.float()).
struct ChannelParams {
  std::vector<float> scale, inv, zp;
  ChannelParams(const at::Tensor& s, const at::Tensor& z) {
    const at::Tensor sf = s.to(at::kFloat).contiguous().reshape(-1), zf = z.to(at::kFloat).contiguous().reshape(-1);
    const float* sp = sf.data_ptr<float>();
    const float* zpp = zf.data_ptr<float>();
    scale.assign(sp, sp + sf.numel());
    zp.assign(zpp, zpp + zf.numel());
    inv.resize(scale.size());
    for (size_t i = 0; i < scale.size(); ++i) inv[i] = 1.0f / scale[i];
  }
  FqParams fq(int64_t c, int64_t bits, const ew::Drop& d) const {
    return FqParams{inv[c], scale[c], zp[c], static_cast<float>((1 << bits) - 1), d};
  }
};

ew::Drop make_drop(double drop_prob, int64_t seed) {
  ew::Drop d;
  if (drop_prob > 0) {
    d.threshold = std::min<uint64_t>(static_cast<uint64_t>(std::nearbyint(drop_prob * 4294967296.0)),
                                     uint64_t(1) << 32);
    d.seed_mix = static_cast<uint32_t>(static_cast<uint32_t>(seed) * 0x9E3779B9u);
  }
  return d;
}

at::Tensor param_shaped(const std::vector<double>& sums, double mul) {
  at::Tensor out = at::empty({static_cast<int64_t>(sums.size())}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (size_t i = 0; i < sums.size(); ++i) o[i] = static_cast<float>(sums[i]) * static_cast<float>(mul);
  return out;
}

}  // namespace

at::Tensor quantize(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& zero_point, int64_t bits,
                    std::optional<int64_t> axis) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const Layout L(x, axis);
  const ChannelParams P(scale, zero_point);
  const In xin(x);
  uint8_t* qp = q.data_ptr<uint8_t>();
  const auto fn = ew::quantize_kernel();
  parallel_for(L.items, std::min(L.inner, kChunk) * kElementCost, [&](int64_t b, int64_t e) {
    float buf[kChunk];
    for (int64_t it = b; it < e; ++it) {
      int64_t c, off, len;
      L.item(it, c, off, len);
      fn(xin.get(off, len, buf), qp + off, len, P.fq(c, bits, {}));
    }
  });
  return q;
}

at::Tensor dequantize(const at::Tensor& codes_in, const at::Tensor& scale, const at::Tensor& zero_point,
                      std::optional<int64_t> axis) {
  // (code - zp) * scale in fp32: one multiply per element, which the compiler vectorizes on its own.
  const at::Tensor codes = codes_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options());
  const Layout L(codes, axis);
  const ChannelParams P(scale, zero_point);
  const float* cp = codes.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_for(L.items, std::min(L.inner, kChunk) * kElementCost, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      int64_t c, off, len;
      L.item(it, c, off, len);
      const float s = P.scale[c], z = P.zp[c];
      for (int64_t i = off; i < off + len; ++i) op[i] = (cp[i] - z) * s;
    }
  });
  return out;
}

at::Tensor fake_quant_forward(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& zero_point,
                              int64_t bits, std::optional<int64_t> axis, double drop_prob, int64_t seed) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const Layout L(x, axis);
  const ChannelParams P(scale, zero_point);
  const ew::Drop drop = make_drop(drop_prob, seed);
  const In xin(x);
  const Out yout(y);
  const auto fn = DFQKERN_AVX2_OR_PORTABLE(ew, fq_forward);
  parallel_for(L.items, std::min(L.inner, kChunk) * kElementCost, [&](int64_t b, int64_t e) {
    float xb[kChunk], yb[kChunk];
    for (int64_t it = b; it < e; ++it) {
      int64_t c, off, len;
      L.item(it, c, off, len);
      fn(xin.get(off, len, xb), yout.ptr(off, yb), len, P.fq(c, bits, drop), static_cast<uint64_t>(off));
      yout.commit(off, len, yb);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                   const at::Tensor& scale,
                                                                   const at::Tensor& zero_point, int64_t bits,
                                                                   std::optional<int64_t> axis, double grad_scale,
                                                                   double drop_prob, int64_t seed) {
  const at::Tensor x = x_in.contiguous(), g = grad_in.contiguous();
  at::Tensor gx = at::empty_like(x);
  const Layout L(x, axis);
  const ChannelParams P(scale, zero_point);
  const ew::Drop drop = make_drop(drop_prob, seed);
  const In xin(x), gin(g);
  const Out gout(gx);
  std::vector<Sums2> partial(L.items);
  const auto fn = DFQKERN_AVX2_OR_PORTABLE(ew, fq_backward);
  parallel_for(L.items, std::min(L.inner, kChunk) * kElementCost, [&](int64_t b, int64_t e) {
    float xb[kChunk], gb[kChunk], ob[kChunk];
    for (int64_t it = b; it < e; ++it) {
      int64_t c, off, len;
      L.item(it, c, off, len);
      fn(gin.get(off, len, gb), xin.get(off, len, xb), gout.ptr(off, ob), len, P.fq(c, bits, drop),
         static_cast<uint64_t>(off), partial[it]);
      gout.commit(off, len, ob);
    }
  });
  std::vector<double> ds(L.channels, 0.0), dz(L.channels, 0.0);
  for (int64_t it = 0; it < L.items; ++it) {
    const int64_t c = (it / L.chunks_per_row) % L.channels;
    ds[c] += partial[it].a;
    dz[c] += partial[it].b;
  }
  return {gx, param_shaped(ds, grad_scale), param_shaped(dz, grad_scale)};
}

ew::QuantizeFn ew::quantize_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (vnni_level(active_isa())) return ew::quantize_vnni;
#endif
  return DFQKERN_AVX2_OR_PORTABLE(ew, quantize);
}

namespace {

// The AdaRound kernels of the active ISA: AVX-512 ones on the avx512vnni level (x86 only).
using ArForward = void (*)(const float*, const float*, float*, int64_t, const ArParams&, double&);
using ArBackward = void (*)(const float*, const float*, const float*, float*, int64_t, const ArParams&, double&);

ArForward ar_forward_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (vnni_level(active_isa())) return ew::ar_forward_vnni;
#endif
  return DFQKERN_AVX2_OR_PORTABLE(ew, ar_forward);
}

ArBackward ar_backward_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (vnni_level(active_isa())) return ew::ar_backward_vnni;
#endif
  return DFQKERN_AVX2_OR_PORTABLE(ew, ar_backward);
}

ArParams ar_params(const ChannelParams& P, int64_t c, int64_t bits, double beta, double reg_grad, bool hard) {
  return ArParams{P.scale[c], P.zp[c], static_cast<float>((1 << bits) - 1), static_cast<float>(beta),
                  static_cast<float>(beta - 1.0), static_cast<float>(reg_grad), hard};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adaround_forward(const at::Tensor& base_in, const at::Tensor& v_in,
                                                    const at::Tensor& scale, const at::Tensor& zero_point,
                                                    int64_t bits, std::optional<int64_t> axis, double beta,
                                                    bool hard) {
  const at::Tensor v = v_in.contiguous(), base = base_in.contiguous();
  at::Tensor w = at::empty_like(v);
  const Layout L(v, axis);
  const ChannelParams P(scale, zero_point);
  const In vin(v), bin(base);
  const Out wout(w);
  std::vector<double> partial(L.items, 0.0);
  const ArForward fn = ar_forward_kernel();
  parallel_for(L.items, std::min(L.inner, kChunk) * kElementCost, [&](int64_t b, int64_t e) {
    float vb[kChunk], bb[kChunk], ob[kChunk];
    for (int64_t it = b; it < e; ++it) {
      int64_t c, off, len;
      L.item(it, c, off, len);
      fn(bin.get(off, len, bb), vin.get(off, len, vb), wout.ptr(off, ob), len,
         ar_params(P, c, bits, beta, 0.0, hard), partial[it]);
      wout.commit(off, len, ob);
    }
  });
  double reg = 0;
  for (double p : partial) reg += p;
  return {w, at::scalar_tensor(hard ? 0.0 : reg, at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor> adaround_backward(const at::Tensor& grad_in, const at::Tensor& base_in,
                                                     const at::Tensor& v_in, const at::Tensor& scale,
                                                     const at::Tensor& zero_point, int64_t bits,
                                                     std::optional<int64_t> axis, double beta, double reg_grad) {
  const at::Tensor v = v_in.contiguous(), base = base_in.contiguous(), g = grad_in.contiguous();
  at::Tensor gv = at::empty_like(v);
  const Layout L(v, axis);
  const ChannelParams P(scale, zero_point);
  const In vin(v), bin(base), gin(g);
  const Out gout(gv);
  std::vector<double> partial(L.items, 0.0);
  const ArBackward fn = ar_backward_kernel();
  parallel_for(L.items, std::min(L.inner, kChunk) * kElementCost, [&](int64_t b, int64_t e) {
    float vb[kChunk], bb[kChunk], gb[kChunk], ob[kChunk];
    for (int64_t it = b; it < e; ++it) {
      int64_t c, off, len;
      L.item(it, c, off, len);
      fn(gin.get(off, len, gb), bin.get(off, len, bb), vin.get(off, len, vb), gout.ptr(off, ob), len,
         ar_params(P, c, bits, beta, reg_grad, false), partial[it]);
      gout.commit(off, len, ob);
    }
  });
  std::vector<double> gs(L.channels, 0.0);
  for (int64_t it = 0; it < L.items; ++it) gs[(it / L.chunks_per_row) % L.channels] += partial[it];
  return {gv, param_shaped(gs, 1.0)};
}

}  // namespace dfqkern::cpu
