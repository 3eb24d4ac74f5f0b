// Packed GEMM drivers: weight prepacking (kpack-lsb-v1 -> cpu-tile-v1), activation quantization
// (static per-tensor or dynamic per-token, fused with the conversion to kernel rows), threading.
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <cmath>
#include <memory>
#include <vector>

#include "../common/rounding.h"
#include "common.h"
#include "float_io.h"
#include "gemm_driver.h"
#include "kernels.h"

namespace dfqkern::cpu {

namespace gemm {

bool quantize_codes(const float* x, uint8_t* q, int64_t k, const ew::FqParams& p) {
  return ew::quantize_kernel()(x, q, k, p);
}

Kernel pick_kernel(Isa isa, bool panels) {
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
    case Isa::amx: return panels ? panels_amx : run_avx512vnni;
    case Isa::avx512vnni: return panels ? panels_avx512vnni : run_avx512vnni;
    case Isa::avx2: return panels ? panels_avx2 : run_avx2;
#endif
#if defined(__aarch64__)
    case Isa::dotprod: return panels ? panels_dotprod : run_dotprod;
    case Isa::neon: return panels ? panels_neon : run_neon;
#endif
    default: return panels ? panels_portable : run_portable;
  }
}

bool epilogue_applies_post(Isa isa, bool panels) {
  // pick_kernel's VNNI / AMX panel kernels end in finish_panels_zmm (or finish_panels); the others' epilogues
  // (finish_panel_avx2, the tile ones) do not read Args::residual / relu
  return panels && vnni_level(isa);
}

void run(const Args& g, int64_t m, int64_t tiles) {
  if (m <= 0 || tiles <= 0) return;
  const Isa isa = active_isa();
  if (g.group_rows == kPanel) {
    // Work items: kMB rows x kPB panels. Inside an item the kernels sweep 12-row strips across the
    // item's panels, so a strip's activations stay in L1 and the panels' weights in L2.
    constexpr int64_t kMB = 96, kPB = 4;
    const int64_t mblocks = (m + kMB - 1) / kMB, pblocks = (tiles + kPB - 1) / kPB;
    const Kernel fn = pick_kernel(isa, true);
    const int64_t item_cost = gemm_cost(std::min(m, kMB) * kPB * kPanel * g.nchunks * panel_k(g.wbits));
    parallel_for(mblocks * pblocks, item_cost, [&](int64_t b, int64_t e) {
      for (int64_t it = b; it < e; ++it) {
        const int64_t mb = it % mblocks, pb = it / mblocks;
        fn(g, mb * kMB, std::min(m, (mb + 1) * kMB), pb * kPB, std::min(tiles, (pb + 1) * kPB));
      }
    });
    return;
  }
  // Work items: blocks of kMB rows x kTB tiles; weights of a tile block stay in L1/L2 while the
  // rows of a row block stream past them.
  constexpr int64_t kMB = 64;
  const int64_t tb = m == 1 ? 8 : 16;
  const int64_t mblocks = (m + kMB - 1) / kMB, tblocks = (tiles + tb - 1) / tb;
  const Kernel fn = pick_kernel(isa, false);
  const int64_t item_cost = std::min(m, kMB) * tb * kTileRows * g.nchunks * chunk_k(g.wbits);
  parallel_for(mblocks * tblocks, item_cost, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t mb = it % mblocks, t = it / mblocks;
      fn(g, mb * kMB, std::min(m, (mb + 1) * kMB), t * tb, std::min(tiles, (t + 1) * tb));
    }
  });
}

}  // namespace gemm

namespace {

using gemm::kChunkBytes;
using gemm::kTileRows;

using gemm::kpack_code;
using gemm::slot_bits;

struct ActRows {
  std::unique_ptr<int8_t[]> data;
  std::vector<int32_t> sum, zp;
  std::vector<float> scale;
  int64_t kp = 0;
};

ActRows alloc_rows(int64_t m, int64_t k, int wbits) {
  ActRows r;
  r.kp = gemm::num_chunks(k, wbits) * gemm::chunk_k(wbits);
  r.data.reset(new int8_t[static_cast<size_t>(std::max<int64_t>(m, 1) * r.kp)]);
  r.sum.resize(m);
  return r;
}

// Per-token parameters exactly as reference.token_qparams / qparams_from_range compute them in fp32.
void token_qparams(float lo, float hi, int64_t bits, bool symmetric, float& scale, int32_t& zp) {
  lo = std::min(lo, 0.f);
  hi = std::max(hi, 0.f);
  const float qmax = static_cast<float>((1 << bits) - 1);
  if (symmetric) {
    const float amax = std::max(-lo, hi);
    scale = std::max(amax / static_cast<float>((1 << (bits - 1)) - 1), rounding::kScaleEps);
    zp = 1 << (bits - 1);
  } else {
    scale = std::max((hi - lo) / qmax, rounding::kScaleEps);
    zp = static_cast<int32_t>(std::min(std::max(std::nearbyint(-lo / scale), 0.f), qmax));
  }
}

// Quantizes float x [M, K] into kernel rows (wbits layout); per-token or static per-tensor.
// `packed` (optional): also writes kpack-lsb-v1 rows of `abits`-bit codes [M, packed_width].
// Non-finite inputs (reference.py): the quantize pass reports a row holding NaN / Inf at no extra
// pass over x; a per-token row then gets scale NaN, zero point 0 (2^(b-1) symmetric) and codes 0;
// with a static scale, r.scale becomes per row (NaN at those rows) only when such a row exists,
// so the epilogue's acc * (a_scale * w_scale) turns exactly those output rows into NaN.
ActRows quantize_rows(const at::Tensor& x, int64_t abits, bool per_token, bool symmetric, float s_static,
                      int32_t zp_static, int wbits, uint8_t* packed) {
  const int64_t m = x.size(0), k = x.size(1);
  ActRows r = alloc_rows(m, k, wbits);
  r.zp.assign(per_token ? m : 1, zp_static);
  r.scale.assign(per_token ? m : 1, s_static);
  const In xin(x);
  const float qmax = static_cast<float>((1 << abits) - 1);
  const int slot = slot_bits(abits), per = 8 / slot;
  const int64_t pw = (k + per - 1) / per;
  const auto minmax = DFQKERN_AVX2_OR_PORTABLE(gemm, minmax);
  const int64_t row_bytes = r.kp;
  std::vector<uint8_t> bad_rows(per_token ? 0 : m, 0);
  std::atomic<bool> any_bad{false};
  parallel_for(m, k * kElementCost, [&](int64_t b, int64_t e) {
    float* const fbuf = x.scalar_type() == at::kFloat ? nullptr : scratch_of<float>(Scratch::act_floats, k);
    uint8_t* const codes = scratch_of<uint8_t>(Scratch::act_codes, k);  // (see thread_scratch)
    for (int64_t i = b; i < e; ++i) {
      const float* xr = xin.get(i * k, k, fbuf);
      float scale = s_static;
      int32_t zp = zp_static;
      if (per_token) {
        float lo = 0.f, hi = 0.f;
        if (k > 0) minmax(xr, k, lo, hi);
        token_qparams(lo, hi, abits, symmetric, scale, zp);
        r.scale[i] = scale;
        r.zp[i] = zp;
      }
      const ew::FqParams p{1.0f / scale, scale, static_cast<float>(zp), qmax, {}};
      if (gemm::quantize_codes(xr, codes, k, p)) {  // rare: the row holds NaN / Inf
        if (per_token) {
          zp = symmetric ? (1 << (abits - 1)) : 0;
          r.scale[i] = std::numeric_limits<float>::quiet_NaN();
          r.zp[i] = zp;
          std::fill(codes, codes + k, uint8_t(0));
        } else {
          bad_rows[i] = 1;
          any_bad.store(true, std::memory_order_relaxed);
        }
      }
      r.sum[i] = gemm::codes_to_act_row(codes, k, r.kp, r.data.get() + i * row_bytes);
      if (packed) {
        uint8_t* pr = packed + i * pw;
        std::fill(pr, pr + pw, uint8_t(0));
        for (int64_t j = 0; j < pw * per; ++j) {
          const uint8_t c = j < k ? codes[j] : static_cast<uint8_t>(zp);  // padded slots hold the zero point
          pr[j / per] |= static_cast<uint8_t>(c << ((j % per) * slot));
        }
      }
    }
  });
  if (any_bad.load()) {  // static scale: one scale per row, NaN where the row held NaN / Inf
    r.scale.assign(m, s_static);
    for (int64_t i = 0; i < m; ++i)
      if (bad_rows[i]) r.scale[i] = std::numeric_limits<float>::quiet_NaN();
  }
  return r;
}

gemm::Args make_args(const ActRows& r, const at::Tensor& w_tiles, const at::Tensor& w_corr, int64_t w_bits,
                     int64_t n, int64_t k) {
  gemm::Args g{};
  g.a = r.data.get();
  g.lda = r.kp;
  g.a_sum = r.sum.data();
  g.a_zp = r.zp.data();
  g.a_zp_step = r.zp.size() > 1 ? 1 : 0;
  g.a_scale = r.scale.empty() ? nullptr : r.scale.data();
  g.a_scale_step = r.scale.size() > 1 ? 1 : 0;
  g.w = w_tiles.data_ptr<uint8_t>();
  g.wbits = static_cast<int>(w_bits == 3 ? 4 : w_bits);
  g.group_rows = gemm::layout_rows(w_corr);
  g.nchunks = gemm::weight_blocks(k, g.wbits, g.group_rows);
  g.corr = w_corr.data_ptr<int32_t>();
  g.n = n;
  return g;
}

// One-element activation scale (as fp32) and zero point (truncated to int32, like .to(torch.int32)),
// read directly for the common dtypes: .item() costs a dispatcher round trip on the M = 1 path.
float scalar_f32(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return *t.data_ptr<float>();
  return t.to(at::kFloat).reshape({1}).item<float>();
}
int32_t scalar_i32(const at::Tensor& t) {
  if (t.scalar_type() == at::kInt) return *t.data_ptr<int32_t>();
  if (t.scalar_type() == at::kLong) return static_cast<int32_t>(*t.data_ptr<int64_t>());
  return t.to(at::kInt).reshape({1}).item<int32_t>();
}

int kernel_bits(int64_t w_bits) { return static_cast<int>(w_bits == 3 ? 4 : w_bits); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> prepack_weight(const at::Tensor& data_in, const at::Tensor& zero_point, int64_t bits,
                                                  int64_t k, int64_t groups) {
  const at::Tensor data = data_in.contiguous();
  const at::Tensor zp = zero_point.to(at::kInt).contiguous();
  const int wb = kernel_bits(bits);
  const int64_t rows = data.size(0), og = rows / groups, tpg = (og + kTileRows - 1) / kTileRows;
  const int64_t nchunks = gemm::num_chunks(k, wb), row_stride = data.size(1);
  at::Tensor tiles = at::zeros({groups * tpg * nchunks * kTileRows * kChunkBytes}, data.options());
  at::Tensor corr = at::zeros({groups * tpg, 3, kTileRows}, data.options().dtype(at::kInt));
  const uint8_t* src = data.data_ptr<uint8_t>();
  const int32_t* zpp = zp.data_ptr<int32_t>();
  uint8_t* dst = tiles.data_ptr<uint8_t>();
  int32_t* cp = corr.data_ptr<int32_t>();
  parallel_for(rows, k * kElementCost, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const int64_t g = n / og, j = n % og;  // tile g * tpg + j / 4, row j % 4 in it
      gemm::pack_tile_row(src + n * row_stride, static_cast<int>(bits), k, zpp[n], g * tpg + j / kTileRows,
                          static_cast<int>(j % kTileRows), nchunks, dst, cp);
    }
  });
  return {tiles, corr};
}

std::tuple<at::Tensor, at::Tensor> prepack_panels(const at::Tensor& data_in, const at::Tensor& zero_point, int64_t bits,
                                                  int64_t k, int64_t groups) {
  using gemm::kBlockBytes;
  using gemm::kPanel;
  const at::Tensor data = data_in.contiguous();
  const at::Tensor zp = zero_point.to(at::kInt).contiguous();
  const int wb = kernel_bits(bits), kb = gemm::panel_k(wb);
  const int64_t rows = data.size(0), og = rows / groups, ppg = (og + kPanel - 1) / kPanel;
  const int64_t nblocks = (k + kb - 1) / kb, row_stride = data.size(1);
  at::Tensor panels = at::zeros({groups * ppg * nblocks * kBlockBytes}, data.options());
  at::Tensor corr = at::zeros({groups * ppg, 3, kPanel}, data.options().dtype(at::kInt));
  const uint8_t* src = data.data_ptr<uint8_t>();
  const int32_t* zpp = zp.data_ptr<int32_t>();
  uint8_t* dst = panels.data_ptr<uint8_t>();
  int32_t* cp = corr.data_ptr<int32_t>();
  parallel_for(rows, k * kElementCost, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const int64_t g = n / og, j = n % og;  // panel g * ppg + j / 16, row j % 16 in it
      gemm::pack_panel_row(src + n * row_stride, static_cast<int>(bits), k, zpp[n], g * ppg + j / kPanel,
                           static_cast<int>(j % kPanel), nblocks, dst, cp);
    }
  });
  return {panels, corr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activation(const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& scale,
                                                                   const std::optional<at::Tensor>& zero_point,
                                                                   int64_t bits, bool per_token, bool symmetric) {
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), per = 8 / slot_bits(bits);
  float s = 1.f;
  int32_t z = 0;
  if (!per_token) {
    s = scalar_f32(*scale);
    z = scalar_i32(*zero_point);
  }
  at::Tensor packed = at::empty({m, (k + per - 1) / per}, x.options().dtype(at::kByte));
  // The kernel rows are a by-product here; 8-bit rows are the cheapest to fill.
  ActRows r = quantize_rows(x, bits, per_token, symmetric, s, z, 8, packed.data_ptr<uint8_t>());
  const int64_t np = per_token ? m : 1;
  at::Tensor scale_out = at::empty({np}, x.options().dtype(at::kFloat));
  at::Tensor zp_out = at::empty({np}, x.options().dtype(at::kInt));
  if (per_token) {
    std::copy(r.scale.begin(), r.scale.end(), scale_out.data_ptr<float>());
    std::copy(r.zp.begin(), r.zp.end(), zp_out.data_ptr<int32_t>());
  } else {  // static: the given parameters (codes cannot carry NaN; linear propagates it)
    scale_out.data_ptr<float>()[0] = s;
    zp_out.data_ptr<int32_t>()[0] = z;
  }
  return {packed, scale_out, zp_out};
}

at::Tensor linear_int(const at::Tensor& a_data_in, const at::Tensor& a_zero_point, int64_t a_bits, int64_t k,
                      const at::Tensor& w_tiles, const at::Tensor& w_corr, int64_t w_bits, int64_t n) {
  const at::Tensor a_data = a_data_in.contiguous();
  const int64_t m = a_data.size(0), bytes = a_data.size(1);
  const int wb = kernel_bits(w_bits), slot = slot_bits(a_bits);
  ActRows r = alloc_rows(m, k, wb);
  const at::Tensor zp = a_zero_point.to(at::kInt).contiguous().reshape({-1});
  r.zp.assign(zp.data_ptr<int32_t>(), zp.data_ptr<int32_t>() + zp.numel());
  const uint8_t* src = a_data.data_ptr<uint8_t>();
  const int64_t row_bytes = r.kp;
  parallel_for(m, k * kElementCost, [&](int64_t b, int64_t e) {
    uint8_t* const codes = scratch_of<uint8_t>(Scratch::act_codes, k);
    for (int64_t i = b; i < e; ++i) {
      for (int64_t j = 0; j < k; ++j) codes[j] = kpack_code(src + i * bytes, j, slot);
      r.sum[i] = gemm::codes_to_act_row(codes, k, r.kp, r.data.get() + i * row_bytes);
    }
  });
  at::Tensor out = at::empty({m, n}, a_data.options().dtype(at::kInt));
  gemm::Args g = make_args(r, w_tiles, w_corr, w_bits, n, k);
  g.out_i = out.data_ptr<int32_t>();
  g.ldo_m = n;
  g.ldo_n = 1;
  gemm::run(g, m, (n + g.group_rows - 1) / g.group_rows);
  return out;
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_tiles, const at::Tensor& w_corr,
                  const at::Tensor& w_scale_in, int64_t w_bits, int64_t n, int64_t k, const std::optional<at::Tensor>& bias_in,
                  const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& a_zero_point,
                  int64_t a_bits, bool per_token, bool symmetric) {
  // At batch 1 this is latency-bound: tensors already in the kernels' form skip the ATen calls (a no-op
  // .to() / .contiguous() / reshape still costs a dispatcher round trip each).
  const at::Tensor x = x_in.dim() == 2 && x_in.is_contiguous() ? x_in
                       : x_in.is_contiguous()                  ? x_in.view({-1, k})
                                                               : x_in.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0);
  float s = 1.f;
  int32_t z = 0;
  if (!per_token) {
    s = scalar_f32(*a_scale);
    z = scalar_i32(*a_zero_point);
  }
  ActRows r = quantize_rows(x, a_bits, per_token, symmetric, s, z, kernel_bits(w_bits), nullptr);
  const auto f32 = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
  };
  const at::Tensor w_scale = f32(w_scale_in);
  at::Tensor bias;
  if (bias_in) bias = f32(*bias_in);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());  // x's leading dims, then n
  if (shape.empty()) shape.push_back(1);
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options().dtype(at::kFloat));
  gemm::Args g = make_args(r, w_tiles, w_corr, w_bits, n, k);
  g.w_scale = w_scale.data_ptr<float>();
  g.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  g.out_f = out.data_ptr<float>();
  g.ldo_m = n;
  g.ldo_n = 1;
  gemm::run(g, m, (n + g.group_rows - 1) / g.group_rows);
  return out;
}

}  // namespace dfqkern::cpu
