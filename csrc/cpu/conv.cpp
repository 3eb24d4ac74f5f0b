// Packed Conv2d (NCHW): quantize-to-NHWC + im2col into the packed GEMM, or a direct kernel for
// depthwise-style convolutions (C/groups == 1).
//
// GEMM path, per image and group: rows m = output pixels, K = (kh, kw, c) as in
// formats.conv_weight_to_matrix. Activations are first quantized once into NHWC kernel elements
// (int8 code - 128) with per-pixel, per-group code sums; im2col then copies C/groups-long
// runs and fills padded taps with the zero point's code, so they contribute exactly zero, and the
// row sum for the zero-point correction is a sum of kh*kw pixel sums. 1x1 / stride 1 / no padding
// convolutions with groups = 1 use the NHWC buffer directly as the GEMM rows.
//
// Non-finite inputs (float conv2d; see dfqkern/kernels/reference.py): the quantize pass already
// reports whether a run of values held NaN / Inf (ew::quantize_*), so the normal path pays nothing
// more. Only when some run did are its pixels flagged; an output pixel whose window covers a flagged
// input pixel then gets activation scale NaN (GEMM path: a per-row scale for that image / group;
// depthwise: the epilogue), so every output channel of that pixel is NaN.
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "depthwise.h"
#include "float_io.h"
#include "gemm_driver.h"
#include "kernels.h"

namespace dfqkern::cpu {
namespace {

using gemm::kTileRows;

struct Dims {
  int64_t b, c, h, w, oh, ow;
};

Dims dims_of(const at::Tensor& x, const ConvGeom& g) {
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0};
  d.oh = (d.h + 2 * g.pad_h - g.dil_h * (g.kh - 1) - 1) / g.stride_h + 1;
  d.ow = (d.w + 2 * g.pad_w - g.dil_w * (g.kw - 1) - 1) / g.stride_w + 1;
  return d;
}

// Codes of one NCHW plane segment [off, off + n): from float (quantized) or already codes.
struct CodeSource {
  const uint8_t* codes = nullptr;  // conv2d_int
  const In* x = nullptr;           // conv2d
  ew::FqParams p{};
  // Returns true when the float values held a NaN or an Inf; then flags[i * fstride] = 1 for each of them.
  bool get(int64_t off, int64_t n, uint8_t* dst, float* fbuf, uint8_t* flags = nullptr, int64_t fstride = 1) const {
    if (codes) {
      std::copy(codes + off, codes + off + n, dst);
      return false;
    }
    const float* xf = x->get(off, n, fbuf);
    if (!gemm::quantize_codes(xf, dst, n, p)) return false;
    if (flags)
      for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(xf[i])) flags[i * fstride] = 1;
    return true;
  }
};

// True when output pixel (oy, ox)'s window covers a flagged input pixel (flags[(iy * w + ix) * fstride]).
bool window_flagged(const uint8_t* flags, int64_t fstride, int64_t h, int64_t w, const ConvGeom& g, int64_t oy,
                    int64_t ox) {
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t iy = oy * g.stride_h - g.pad_h + i * g.dil_h;
    if (iy < 0 || iy >= h) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t ix = ox * g.stride_w - g.pad_w + j * g.dil_w;
      if (ix >= 0 && ix < w && flags[(iy * w + ix) * fstride]) return true;
    }
  }
  return false;
}

struct Epilogue {
  int32_t* out_i = nullptr;
  float* out_f = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  float a_scale = 1.f;
};

// ---------------------------------------------------------------------------------- GEMM path

// im2col copies runs of C/groups bytes; whole 16-byte pieces as fixed-size copies (inlined moves
// instead of a memmove call per tap).
inline void copy_run(const int8_t* src, int64_t n, int8_t* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) std::memcpy(dst + j, src + j, 16);
  for (; j < n; ++j) dst[j] = src[j];
}

void conv_gemm(const CodeSource& src, int32_t za, const Dims& d, const ConvGeom& g, const at::Tensor& w_tiles,
               const at::Tensor& w_corr, int64_t w_bits, const Epilogue& ep) {
  const int wb = static_cast<int>(w_bits == 3 ? 4 : w_bits);
  const int rows_per = gemm::layout_rows(w_corr);  // 4: cpu-tile-v1, 16: cpu-panel-v1
  const int64_t cg = g.in_per_group, og = g.out_ch / g.groups, tpg = (og + rows_per - 1) / rows_per;
  const int64_t k = g.kh * g.kw * cg, kp = gemm::num_chunks(k, wb) * gemm::chunk_k(wb);
  const int64_t nchunks = gemm::weight_blocks(k, wb, rows_per);
  const int64_t wbytes = rows_per == kTileRows ? kTileRows * gemm::kChunkBytes : gemm::kBlockBytes;
  const int64_t hw = d.h * d.w, p = d.oh * d.ow;
  const bool direct = g.groups == 1 && g.kh == 1 && g.kw == 1 && g.stride_h == 1 && g.stride_w == 1 &&
                      g.pad_h == 0 && g.pad_w == 0;
  const int64_t cs = direct ? kp : d.c;  // NHWC pixel stride (elements)
  const int8_t pad8 = static_cast<int8_t>(static_cast<uint8_t>(za) ^ 0x80);

  // 1. quantize NCHW -> NHWC kernel elements + per-pixel per-group code sums
  std::unique_ptr<uint8_t[]> xs(new uint8_t[static_cast<size_t>(d.b * hw * cs)]);
  std::vector<int32_t> pixsum(static_cast<size_t>(d.b * hw * g.groups), 0);
  // Input pixels holding NaN / Inf in any channel (float input only; written only when some are).
  std::vector<uint8_t> badpix(src.x ? static_cast<size_t>(d.b * hw) : 0, 0);
  std::atomic<bool> any_bad{false};
  constexpr int64_t kPix = 64;
  const int64_t pblocks = (hw + kPix - 1) / kPix;
  parallel_for(d.b * pblocks, std::min(kPix, hw) * d.c * kElementCost, [&](int64_t bgn, int64_t end) {
    uint8_t codes[kPix];
    float fbuf[kPix];
    for (int64_t it = bgn; it < end; ++it) {
      const int64_t b = it / pblocks, p0 = (it % pblocks) * kPix, n = std::min(kPix, hw - p0);
      for (int64_t c = 0; c < d.c; ++c) {
        if (src.get((b * d.c + c) * hw + p0, n, codes, fbuf, src.x ? badpix.data() + b * hw + p0 : nullptr))
          any_bad.store(true, std::memory_order_relaxed);
        int32_t* ps = pixsum.data() + (b * hw + p0) * g.groups + c / cg;
        int8_t* dst = reinterpret_cast<int8_t*>(xs.get()) + (b * hw + p0) * cs + c;
        for (int64_t i = 0; i < n; ++i) dst[i * cs] = static_cast<int8_t>(codes[i] ^ 0x80);
        for (int64_t i = 0; i < n; ++i) ps[i * g.groups] += codes[i];
      }
      if (direct && kp > d.c) {  // K padding of the rows used in place: code 0
        for (int64_t i = 0; i < n; ++i) {
          int8_t* row = reinterpret_cast<int8_t*>(xs.get()) + (b * hw + p0 + i) * cs;
          std::fill(row + d.c, row + kp, int8_t(-128));
        }
      }
    }
  });

  // 2. per image and group: im2col rows, then the GEMM writing NCHW output
  std::unique_ptr<uint8_t[]> cols(direct ? nullptr : new uint8_t[static_cast<size_t>(p * kp)]);
  std::vector<int32_t> rowsum(p);
  const int32_t zp_vec[1] = {za};
  const float as_vec[1] = {ep.a_scale};
  std::vector<float> row_scale;  // per output pixel, only for an image with non-finite input pixels
  for (int64_t b = 0; b < d.b; ++b) {
    bool image_bad = false;
    if (any_bad.load() && ep.out_f) {
      const uint8_t* fl = badpix.data() + b * hw;
      image_bad = std::any_of(fl, fl + hw, [](uint8_t v) { return v != 0; });
      if (image_bad) {
        row_scale.assign(p, ep.a_scale);
        for (int64_t m = 0; m < p; ++m)
          if (window_flagged(fl, 1, d.h, d.w, g, m / d.ow, m % d.ow))
            row_scale[m] = std::numeric_limits<float>::quiet_NaN();
      }
    }
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      if (direct) {
        for (int64_t m = 0; m < p; ++m) rowsum[m] = pixsum[b * hw + m];
      } else {
        // A kernel row (fixed i) of a dense conv (groups = 1, dilation_w = 1) whose taps are all inside
        // the image is kw * C contiguous NHWC bytes, copied at once; other taps go one by one.
        const bool row_runs = g.groups == 1 && g.dil_w == 1;
        const int8_t* xb = reinterpret_cast<const int8_t*>(xs.get());
        parallel_for(p, kp * kElementCost, [&](int64_t bgn, int64_t end) {
          for (int64_t m = bgn; m < end; ++m) {
            const int64_t oy = m / d.ow, ox = m % d.ow, ix0 = ox * g.stride_w - g.pad_w;
            const bool cols_inside = ix0 >= 0 && ix0 + (g.kw - 1) * g.dil_w < d.w;
            int8_t* row = reinterpret_cast<int8_t*>(cols.get()) + m * kp;
            int32_t s = 0;
            for (int64_t i = 0; i < g.kh; ++i) {
              const int64_t iy = oy * g.stride_h - g.pad_h + i * g.dil_h;
              int8_t* dst = row + i * g.kw * cg;
              if (iy < 0 || iy >= d.h) {  // whole kernel row in the padding
                std::fill_n(dst, g.kw * cg, pad8);
                s += za * static_cast<int32_t>(g.kw * cg);
                continue;
              }
              const int64_t pix0 = b * hw + iy * d.w + ix0;
              if (row_runs && cols_inside) {
                copy_run(xb + pix0 * cs, g.kw * cg, dst);
                for (int64_t j = 0; j < g.kw; ++j) s += pixsum[pix0 + j];
                continue;
              }
              for (int64_t j = 0; j < g.kw; ++j, dst += cg) {
                const int64_t ix = ix0 + j * g.dil_w;
                if (ix >= 0 && ix < d.w) {
                  const int64_t pix = pix0 + j * g.dil_w;
                  s += pixsum[pix * g.groups + grp];
                  copy_run(xb + pix * cs + grp * cg, cg, dst);
                } else {
                  s += za * static_cast<int32_t>(cg);
                  std::fill_n(dst, cg, pad8);
                }
              }
            }
            std::fill(row + k, row + kp, int8_t(-128));
            rowsum[m] = s;
          }
        });
      }
      gemm::Args a{};
      a.a = reinterpret_cast<const int8_t*>(direct ? xs.get() + b * hw * cs : cols.get());
      a.lda = kp;
      a.a_sum = rowsum.data();
      a.a_zp = zp_vec;
      a.a_zp_step = 0;
      a.a_scale = image_bad ? row_scale.data() : as_vec;
      a.a_scale_step = image_bad ? 1 : 0;
      a.w = w_tiles.data_ptr<uint8_t>() + grp * tpg * nchunks * wbytes;
      a.nchunks = nchunks;
      a.wbits = wb;
      a.group_rows = rows_per;
      a.corr = w_corr.data_ptr<int32_t>() + grp * tpg * 3 * rows_per;
      a.w_scale = ep.w_scale ? ep.w_scale + grp * og : nullptr;
      a.bias = ep.bias ? ep.bias + grp * og : nullptr;
      a.n = og;
      const int64_t out_off = (b * g.out_ch + grp * og) * p;
      a.out_i = ep.out_i ? ep.out_i + out_off : nullptr;
      a.out_f = ep.out_f ? ep.out_f + out_off : nullptr;
      a.ldo_m = 1;
      a.ldo_n = p;
      gemm::run(a, p, tpg);
    }
  }
}

// ---------------------------------------------------------------------------------- depthwise path

// Rare path (some input was NaN / Inf): flags each image's input pixels holding a non-finite value in
// any channel and sets every output channel of the output pixels whose window covers one to NaN.
void poison_pixels(const CodeSource& src, const Dims& d, const ConvGeom& g, float* out) {
  const int64_t hw = d.h * d.w, p = d.oh * d.ow;
  std::vector<float> fbuf(static_cast<size_t>(hw));
  std::vector<uint8_t> flags(static_cast<size_t>(hw));
  std::vector<uint8_t> hit(static_cast<size_t>(p));
  for (int64_t b = 0; b < d.b; ++b) {
    std::fill(flags.begin(), flags.end(), uint8_t(0));
    bool any = false;
    for (int64_t c = 0; c < d.c; ++c) {
      const float* xf = src.x->get((b * d.c + c) * hw, hw, fbuf.data());
      for (int64_t i = 0; i < hw; ++i)
        if (!std::isfinite(xf[i])) flags[i] = 1, any = true;
    }
    if (!any) continue;
    for (int64_t m = 0; m < p; ++m) hit[m] = window_flagged(flags.data(), 1, d.h, d.w, g, m / d.ow, m % d.ow);
    for (int64_t o = 0; o < g.out_ch; ++o) {
      float* dst = out + (b * g.out_ch + o) * p;
      for (int64_t m = 0; m < p; ++m)
        if (hit[m]) dst[m] = std::numeric_limits<float>::quiet_NaN();
    }
  }
}

void conv_depthwise(const CodeSource& src, int32_t za, const Dims& d, const ConvGeom& g, const at::Tensor& w16,
                    const Epilogue& ep) {
  const int64_t mult = g.out_ch / g.groups, hp = d.h + 2 * g.pad_h, wp = d.w + 2 * g.pad_w, p = d.oh * d.ow;
  const int16_t* wv = w16.data_ptr<int16_t>();
  const auto fn = DFQKERN_AVX2_OR_PORTABLE(dw, conv);
  std::atomic<bool> any_bad{false};  // some input value was NaN / Inf (reported by the quantize pass)
  // One work item per (image, input channel): the plane is built once for its `mult` outputs.
  parallel_for(d.b * d.c, mult * p * g.kh * g.kw * 2 + hp * wp * kElementCost, [&](int64_t bgn, int64_t end) {
    std::vector<int16_t> plane(static_cast<size_t>(hp * wp));
    std::vector<uint8_t> codes(static_cast<size_t>(d.w));
    std::vector<float> fbuf(static_cast<size_t>(d.w));
    std::vector<int32_t> acc(static_cast<size_t>(p));
    for (int64_t it = bgn; it < end; ++it) {
      const int64_t b = it / d.c, c = it % d.c;
      std::fill(plane.begin(), plane.end(), int16_t(0));
      for (int64_t y = 0; y < d.h; ++y) {
        if (src.get(((b * d.c + c) * d.h + y) * d.w, d.w, codes.data(), fbuf.data()))
          any_bad.store(true, std::memory_order_relaxed);
        int16_t* row = plane.data() + (y + g.pad_h) * wp + g.pad_w;
        for (int64_t x = 0; x < d.w; ++x) row[x] = static_cast<int16_t>(codes[x] - za);
      }
      for (int64_t o = c * mult; o < (c + 1) * mult; ++o) {
        const dw::Plane pl{plane.data(), wp, wv + o * g.kh * g.kw, g.kh, g.kw, g.stride_h, g.stride_w,
                           g.dil_h, g.dil_w, d.oh, d.ow};
        const int64_t off = (b * g.out_ch + o) * p;
        if (ep.out_i) {
          fn(pl, ep.out_i + off);
        } else {
          fn(pl, acc.data());
          const float s = ep.a_scale * ep.w_scale[o];
          float* out = ep.out_f + off;
          if (ep.bias) {
            const float bv = ep.bias[o];
            for (int64_t i = 0; i < p; ++i) out[i] = static_cast<float>(acc[i]) * s + bv;
          } else {
            for (int64_t i = 0; i < p; ++i) out[i] = static_cast<float>(acc[i]) * s;
          }
        }
      }
    }
  });
  if (any_bad.load() && ep.out_f) poison_pixels(src, d, g, ep.out_f);
}

void dispatch_conv(const CodeSource& src, int32_t za, const Dims& d, const ConvGeom& g, const at::Tensor& w,
                   const at::Tensor& corr, int64_t w_bits, const Epilogue& ep) {
  if (g.in_per_group == 1) conv_depthwise(src, za, d, g, w, ep);
  else conv_gemm(src, za, d, g, w, corr, w_bits, ep);
}

}  // namespace

at::Tensor prepack_depthwise(const at::Tensor& data_in, const at::Tensor& zero_point, int64_t bits, int64_t k) {
  const at::Tensor data = data_in.contiguous();
  const at::Tensor zp = zero_point.to(at::kInt).contiguous();
  const int slot = bits == 2 ? 2 : (bits == 8 ? 8 : 4), per = 8 / slot;
  const int64_t rows = data.size(0), stride = data.size(1);
  at::Tensor out = at::empty({rows, k}, data.options().dtype(at::kShort));
  const uint8_t* s = data.data_ptr<uint8_t>();
  int16_t* o = out.data_ptr<int16_t>();
  const int32_t* z = zp.data_ptr<int32_t>();
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < k; ++j)
      o[n * k + j] = static_cast<int16_t>(((s[n * stride + j / per] >> ((j % per) * slot)) & ((1 << slot) - 1)) - z[n]);
  return out;
}

at::Tensor conv2d_int(const at::Tensor& x_codes_in, int64_t x_zero_point, const at::Tensor& w_prepacked,
                      const at::Tensor& w_corr, int64_t w_bits, const ConvGeom& g) {
  const at::Tensor x = x_codes_in.contiguous();
  const Dims d = dims_of(x, g);
  at::Tensor out = at::empty({d.b, g.out_ch, d.oh, d.ow}, x.options().dtype(at::kInt));
  CodeSource src;
  src.codes = x.data_ptr<uint8_t>();
  Epilogue ep;
  ep.out_i = out.data_ptr<int32_t>();
  dispatch_conv(src, static_cast<int32_t>(x_zero_point), d, g, w_prepacked, w_corr, w_bits, ep);
  return out;
}

at::Tensor conv2d(const at::Tensor& x_in, const at::Tensor& w_prepacked, const at::Tensor& w_corr,
                  const at::Tensor& w_scale_in, int64_t w_bits, const ConvGeom& g, const std::optional<at::Tensor>& bias_in,
                  double a_scale, int64_t a_zero_point, int64_t a_bits) {
  const at::Tensor x = x_in.contiguous();
  const Dims d = dims_of(x, g);
  const at::Tensor w_scale = w_scale_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in) bias = bias_in->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({d.b, g.out_ch, d.oh, d.ow}, x.options().dtype(at::kFloat));
  const In xin(x);
  CodeSource src;
  src.x = &xin;
  const float s = static_cast<float>(a_scale);
  src.p = ew::FqParams{1.0f / s, s, static_cast<float>(a_zero_point), static_cast<float>((1 << a_bits) - 1), {}};
  Epilogue ep;
  ep.out_f = out.data_ptr<float>();
  ep.w_scale = w_scale.data_ptr<float>();
  ep.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  ep.a_scale = s;
  dispatch_conv(src, static_cast<int32_t>(a_zero_point), d, g, w_prepacked, w_corr, w_bits, ep);
  return out;
}

}  // namespace dfqkern::cpu
