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
#include "conv_layout.h"
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

Dims dims_of(int64_t b, int64_t c, int64_t h, int64_t w, const ConvGeom& g) {
  return Dims{b, c, h, w, g.out_h(h), g.out_w(w)};
}

Dims dims_of(const at::Tensor& x, const ConvGeom& g) { return dims_of(x.size(0), x.size(1), x.size(2), x.size(3), g); }

// The quantizer of a conv's float input (static, per tensor).
ew::FqParams act_params(double a_scale, int64_t a_zero_point, int64_t a_bits) {
  const float s = static_cast<float>(a_scale);
  return ew::FqParams{1.0f / s, s, static_cast<float>(a_zero_point), static_cast<float>((1 << a_bits) - 1), {}};
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
  bool nhwc = false;  // GEMM path: out_f / out_i in NHWC ([b][oh][ow][out_ch]) instead of NCHW
  // fp32 output only: then y = y + residual (laid out as out_f) and / or y = relu(y), fused into the work item that
  // wrote the block (the same fp32 add as torch's; the ReLU keeps NaN as torch.relu)
  const float* residual = nullptr;
  bool relu = false;
  bool post() const { return out_f && (residual || relu); }
};

// Epilogue::residual / relu on the output block of `rows` pixels x `cols` channels at element offset `off`:
// NHWC (ldn == 1, pixel stride ldm) or NCHW (ldm == 1, channel stride ldn); the inner loops run over contiguous
// elements (loops the compiler vectorizes).
void post_block(const Epilogue& ep, int64_t off, int64_t rows, int64_t cols, int64_t ldm, int64_t ldn) {
  float* y = ep.out_f + off;
  const float* r = ep.residual ? ep.residual + off : nullptr;
  const bool relu = ep.relu;
  const auto run = [relu](float* __restrict o, const float* __restrict a, int64_t n) {
    if (a && relu) {
      for (int64_t i = 0; i < n; ++i) {
        const float v = o[i] + a[i];
        o[i] = v < 0.f ? 0.f : v;
      }
    } else if (a) {
      for (int64_t i = 0; i < n; ++i) o[i] += a[i];
    } else {
      for (int64_t i = 0; i < n; ++i) o[i] = o[i] < 0.f ? 0.f : o[i];
    }
  };
  const bool nhwc = ldn == 1;
  const int64_t outer = nhwc ? rows : cols, inner = nhwc ? cols : rows, step = nhwc ? ldm : ldn;
  for (int64_t j = 0; j < outer; ++j) run(y + j * step, r ? r + j * step : nullptr, inner);
}

// ---------------------------------------------------------------------------------- GEMM path

// im2col copies runs of C/groups bytes; whole 16-byte pieces as fixed-size copies (inlined moves
// instead of a memmove call per tap).
inline void copy_run(const int8_t* src, int64_t n, int8_t* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) std::memcpy(dst + j, src + j, 16);
  for (; j < n; ++j) dst[j] = src[j];
}

// One kernel row (n = kw * C bytes, all taps inside the image) for `cnt` output pixels, in whole
// 16-byte pieces: the destination bytes past n are written again later and the source is readable
// that far (the NHWC buffer has 16 bytes of slack). N pieces per pixel (fixed: inlined moves).
template <int N>
void copy_rows16(const int8_t* src, int64_t sstep, int8_t* dst, int64_t dstep, int64_t cnt) {
  for (int64_t x = 0; x < cnt; ++x, src += sstep, dst += dstep)
    for (int j = 0; j < N; ++j) std::memcpy(dst + 16 * j, src + 16 * j, 16);
}

// im2col of one image and group into GEMM rows (kp bytes each; see conv_gemm step 2).
struct Im2col {
  const int8_t* x;     // the group's first channel of the image's NHWC pixel 0
  const int32_t* hsum; // [h][ow] horizontal sums of kw pixel sums
  int64_t cs, h, w, ow, cg, kh, kw, sh, sw, ph, pw, dh, dw, k, kp;
  int64_t ox_lo, ox_hi;  // output columns whose kernel taps are all inside the image
  bool row_runs;         // a kernel row inside the image is one contiguous run (groups = 1, dw = 1)
  int32_t pad_tap;       // row-sum contribution of a padded tap: za * cg
  int8_t pad8;           // a padded tap's element: the zero point's code - 128
};

// Adds input row iy's part of one output row's activation-row sums (kernel row iy of every output pixel): its
// horizontal sums of kw pixel sums, or kw padded taps (pad_row = za * C/groups * kw) when the row is padding.
inline void add_kernel_row_sums(const int32_t* hsum, int64_t iy, int64_t h, int64_t ow, int32_t pad_row, int32_t* rs) {
  if (iy < 0 || iy >= h) {
    for (int64_t ox = 0; ox < ow; ++ox) rs[ox] += pad_row;
    return;
  }
  const int32_t* hrow = hsum + iy * ow;
  for (int64_t ox = 0; ox < ow; ++ox) rs[ox] += hrow[ox];
}

// GEMM rows of output rows [oy0, oy1) into rows, their code sums into rs. Per output row: kernel row
// i of every output pixel, then the next i, so that a run copied in whole 16-byte pieces may spill
// into kernel row i + 1 or the K padding (both written after) when the spill stays in the GEMM row.
// Parameters are copied into locals: the int8 stores could alias the struct's fields.
void im2col_rows(const Im2col& c, int64_t oy0, int64_t oy1, int8_t* rows, int32_t* rs) {
  const int8_t* const x = c.x;
  const int32_t* const hsum = c.hsum;
  const int64_t cs = c.cs, h = c.h, w = c.w, ow = c.ow, cg = c.cg, kh = c.kh, kw = c.kw, sh = c.sh, sw = c.sw;
  const int64_t ph = c.ph, pw = c.pw, dh = c.dh, dw = c.dw, k = c.k, kp = c.kp, ox_lo = c.ox_lo, ox_hi = c.ox_hi;
  const bool row_runs = c.row_runs;
  const int32_t pad_tap = c.pad_tap;
  const int8_t pad8 = c.pad8;
  const int64_t run = kw * cg, pieces = (run + 15) / 16;
  std::fill(rs, rs + (oy1 - oy0) * ow, 0);
  for (int64_t oy = oy0; oy < oy1; ++oy, rows += ow * kp, rs += ow) {
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t iy = oy * sh - ph + i * dh;
      int8_t* base = rows + i * run;
      add_kernel_row_sums(hsum, iy, h, ow, pad_tap * static_cast<int32_t>(kw), rs);
      if (iy < 0 || iy >= h) {  // whole kernel row in the padding
        for (int64_t ox = 0; ox < ow; ++ox) std::fill_n(base + ox * kp, run, pad8);
        continue;
      }
      const int8_t* srow = x + iy * w * cs;
      const auto taps = [&](int64_t ox) {  // one by one, padded taps filled
        int8_t* dst = base + ox * kp;
        for (int64_t j = 0; j < kw; ++j, dst += cg) {
          const int64_t ix = ox * sw - pw + j * dw;
          if (ix >= 0 && ix < w) copy_run(srow + ix * cs, cg, dst);
          else std::fill_n(dst, cg, pad8);
        }
      };
      if (!row_runs) {
        for (int64_t ox = 0; ox < ow; ++ox) taps(ox);
        continue;
      }
      for (int64_t ox = 0; ox < ox_lo; ++ox) taps(ox);
      const int8_t* s0 = srow + (ox_lo * sw - pw) * cs;
      int8_t* d0 = base + ox_lo * kp;
      const int64_t cnt = ox_hi - ox_lo, sstep = sw * cs;
      if (i * run + pieces * 16 > kp) {  // the spill would leave the row: exact copies
        for (int64_t ox = 0; ox < cnt; ++ox) copy_run(s0 + ox * sstep, run, d0 + ox * kp);
      } else if (pieces == 1) {
        copy_rows16<1>(s0, sstep, d0, kp, cnt);
      } else if (pieces == 2) {
        copy_rows16<2>(s0, sstep, d0, kp, cnt);
      } else if (pieces == 3) {
        copy_rows16<3>(s0, sstep, d0, kp, cnt);
      } else if (pieces == 4) {
        copy_rows16<4>(s0, sstep, d0, kp, cnt);
      } else {
        for (int64_t ox = 0; ox < cnt; ++ox)
          for (int64_t j = 0; j < run; j += 16) std::memcpy(d0 + ox * kp + j, s0 + ox * sstep + j, 16);
      }
      for (int64_t ox = ox_hi; ox < ow; ++ox) taps(ox);
    }
    if (kp > k)
      for (int64_t ox = 0; ox < ow; ++ox) std::fill(rows + ox * kp + k, rows + (ox + 1) * kp, int8_t(-128));
  }
}

// Shape of a GEMM-path conv's activation rows and weight blocks.
struct GemmShape {
  int wb, rows_per;  // weight slot bits; 4: cpu-tile-v1, 16: cpu-panel-v1
  int64_t cg, og, tpg, k, nchunks, kp, wbytes;
  bool direct;  // 1x1 / stride 1 / no padding / groups 1: the NHWC buffer is the GEMM rows
  int64_t cs;   // NHWC pixel stride of the activation buffer (elements)
};

GemmShape gemm_shape(const Dims& d, const ConvGeom& g, const at::Tensor& w_corr, int64_t w_bits) {
  GemmShape s{};
  s.wb = static_cast<int>(w_bits == 3 ? 4 : w_bits);
  s.rows_per = gemm::layout_rows(w_corr);
  s.cg = g.in_per_group;
  s.og = g.out_ch / g.groups;
  s.tpg = (s.og + s.rows_per - 1) / s.rows_per;
  s.k = g.kh * g.kw * s.cg;
  s.nchunks = gemm::weight_blocks(s.k, s.wb, s.rows_per);
  // GEMM row length: the K the kernels read (whole chunks for tiles, whole K blocks for panels)
  s.kp = s.nchunks * (s.rows_per == gemm::kPanel ? gemm::panel_k(s.wb) : gemm::chunk_k(s.wb));
  s.wbytes = s.rows_per == kTileRows ? kTileRows * gemm::kChunkBytes : gemm::kBlockBytes;
  s.direct = g.groups == 1 && g.kh == 1 && g.kw == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 &&
             g.pad_w == 0;
  s.cs = s.direct ? s.kp : d.c;
  return s;
}

// A per-call buffer of n elements: the calling thread's grow-only scratch slot up to kCallScratchBytes, else
// memory of its own. Allocating and freeing these every call made glibc trim the heap top and the kernel zero
// fresh pages on the next call (clear_page ~7 % of a 16-ch ResNet-20 chain, Xeon). A slot is held by one buffer
// at a time: a conv's buffers are dead before the next conv of a chain takes the same slots.
template <class T>
class CallBuf {
 public:
  CallBuf() = default;
  CallBuf(Scratch slot, int64_t n) {
    constexpr size_t kCallScratchBytes = size_t{8} << 20;
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    if (bytes <= kCallScratchBytes) {
      p_ = static_cast<T*>(thread_scratch(slot, bytes));
    } else {
      own_.reset(new T[static_cast<size_t>(n)]);
      p_ = own_.get();
    }
  }
  T* get() const { return p_; }

 private:
  std::unique_ptr<T[]> own_;
  T* p_ = nullptr;
};

// A conv's input as NHWC kernel elements (code - 128; 16 bytes of slack: im2col's copy_rows16 may read
// past the last pixel), per-pixel per-group code sums, and the pixels that held NaN / Inf (float input).
struct ActRows {
  CallBuf<uint8_t> xs;
  CallBuf<int32_t> pixsum;  // every element written by the layout step
  std::vector<uint8_t> badpix;        // per pixel, only for float input (written only when any_bad)
  bool any_bad = false;
};

// Step 1 of a GEMM-path conv: quantize NCHW -> NHWC. A block of pixels is quantized channel by channel,
// then transposed (cl::to_nhwc).
ActRows quantize_rows(const CodeSource& src, const Dims& d, const ConvGeom& g, const GemmShape& s) {
  const int64_t hw = d.h * d.w, cs = s.cs;
  ActRows r;
  r.xs = CallBuf<uint8_t>(Scratch::conv_xs, d.b * hw * cs + 16);
  r.pixsum = CallBuf<int32_t>(Scratch::conv_pixsum, d.b * hw * g.groups);
  r.badpix.assign(src.x ? static_cast<size_t>(d.b * hw) : 0, 0);
  std::atomic<bool> any_bad{false};
  // A multiple of 16 (cl::NhwcBlock::ld); 256: each quantize call gets a long run (64 left ~half of the pass in
  // per-call overhead: 16-ch 32x32 conv, Xeon VNNI)
  constexpr int64_t kPix = 256;
  const int64_t pblocks = (hw + kPix - 1) / kPix;
  const auto to_nhwc = DFQKERN_AVX2_OR_PORTABLE(cl, to_nhwc);
  parallel_for(d.b * pblocks, std::min(kPix, hw) * d.c * kElementCost, [&](int64_t bgn, int64_t end) {
    uint8_t* const codes = scratch_of<uint8_t>(Scratch::act_codes, d.c * kPix);  // [channel][pixel of the block]
    float fbuf[kPix];
    for (int64_t it = bgn; it < end; ++it) {
      const int64_t b = it / pblocks, p0 = (it % pblocks) * kPix, n = std::min(kPix, hw - p0);
      for (int64_t c = 0; c < d.c; ++c)
        if (src.get((b * d.c + c) * hw + p0, n, codes + c * kPix, fbuf,
                    src.x ? r.badpix.data() + b * hw + p0 : nullptr))
          any_bad.store(true, std::memory_order_relaxed);
      int8_t* dst = reinterpret_cast<int8_t*>(r.xs.get()) + (b * hw + p0) * cs;
      to_nhwc(cl::NhwcBlock{codes, kPix, d.c, n, g.groups, dst, cs, r.pixsum.get() + (b * hw + p0) * g.groups});
      if (s.direct && s.kp > d.c)  // K padding of the rows used in place: code 0
        for (int64_t i = 0; i < n; ++i) std::fill(dst + i * cs + d.c, dst + (i + 1) * cs, int8_t(-128));
    }
  });
  r.any_bad = any_bad.load();
  return r;
}

// Step 1 of a chained conv (conv2d_chain): the previous conv's fp32 NHWC output y ([b][h][w][c]), with
// the ReLU between them (relu(v) = v < 0 ? 0 : v, keeping NaN as torch.relu), quantized with p: the same
// codes as relu then quantize_rows on the NCHW tensor. The ReLU is applied to the codes (quantizing is
// monotonic, so q(relu(v)) = max(q(v), q(0)) for every v but NaN / -Inf); a block holding NaN / Inf is
// quantized again from explicitly ReLU'd values.
ActRows requant_rows(const float* y, const Dims& d, const ConvGeom& g, const GemmShape& s, const ew::FqParams& p,
                     bool relu) {
  const int64_t hw = d.h * d.w, npix = d.b * hw, cs = s.cs, c = d.c;
  ActRows r;
  r.xs = CallBuf<uint8_t>(Scratch::conv_xs, npix * cs + 16);
  r.pixsum = CallBuf<int32_t>(Scratch::conv_pixsum, npix * g.groups);
  r.badpix.assign(static_cast<size_t>(npix), 0);
  std::atomic<bool> any_bad{false};
  uint8_t lo = 0;
  if (relu) {
    const float zero = 0.f;
    gemm::quantize_codes(&zero, &lo, 1, p);
  }
  constexpr int64_t kPix = 64;
  const int64_t blocks = (npix + kPix - 1) / kPix;
  const auto pixel_rows = DFQKERN_AVX2_OR_PORTABLE(cl, pixel_rows);
  parallel_for(blocks, kPix * c * kElementCost, [&](int64_t bgn, int64_t end) {
    uint8_t* const codes = scratch_of<uint8_t>(Scratch::act_codes, kPix * c);
    std::vector<float> f;  // rare (NaN / Inf)
    for (int64_t it = bgn; it < end; ++it) {
      const int64_t p0 = it * kPix, n = std::min(kPix, npix - p0), len = n * c;
      const float* v = y + p0 * c;
      uint8_t block_lo = lo;
      if (gemm::quantize_codes(v, codes, len, p)) {  // rare: NaN / Inf; flag their pixels
        any_bad.store(true, std::memory_order_relaxed);
        if (relu) {
          f.resize(static_cast<size_t>(len));
          for (int64_t i = 0; i < len; ++i) f[i] = v[i] < 0.f ? 0.f : v[i];
          v = f.data();
          gemm::quantize_codes(v, codes, len, p);
          block_lo = 0;
        }
        for (int64_t i = 0; i < len; ++i)
          if (!std::isfinite(v[i])) r.badpix[p0 + i / c] = 1;
      }
      pixel_rows(cl::PixelRows{codes, c, n, g.groups, block_lo,
                               reinterpret_cast<int8_t*>(r.xs.get()) + p0 * cs, cs, r.pixsum.get() + p0 * g.groups});
    }
  });
  r.any_bad = any_bad.load();
  return r;
}

// Step 2 of a GEMM-path conv: per image and group, the GEMM on the NHWC rows in place (direct) or on
// im2col rows built chunk by chunk (a few output rows at a time, so the rows the GEMM reads are still
// in L1 / L2: one im2col buffer for the whole image costs a pass through memory). Output NCHW, or NHWC
// where ep.nhwc.
void conv_gemm_rows(const ActRows& r, int32_t za, const Dims& d, const ConvGeom& g, const GemmShape& s,
                    const at::Tensor& w_tiles, const at::Tensor& w_corr, const Epilogue& ep) {
  const int rows_per = s.rows_per;
  const int64_t cg = s.cg, og = s.og, tpg = s.tpg, k = s.k, nchunks = s.nchunks, kp = s.kp, wbytes = s.wbytes;
  const int64_t hw = d.h * d.w, p = d.oh * d.ow, cs = s.cs;
  const bool direct = s.direct;
  const int8_t pad8 = static_cast<int8_t>(static_cast<uint8_t>(za) ^ 0x80);
  const uint8_t* xs = r.xs.get();
  const int32_t* pixsum = r.pixsum.get();
  std::vector<int32_t> rowsum(direct ? p : 0);
  // per input row, see im2col; every element written below
  const CallBuf<int32_t> hsum(Scratch::conv_hsum, direct ? 0 : d.h * d.ow);
  const int32_t zp_vec[1] = {za};
  const float as_vec[1] = {ep.a_scale};
  std::vector<float> row_scale;  // per output pixel, only for an image with non-finite input pixels
  // im2col chunks: whole output rows, about kIm2colBytes of GEMM rows
  constexpr int64_t kIm2colBytes = 16 << 10;
  // Work items: a chunk x blocks of 4 panels (as gemm::run), so that a layer with few output pixels
  // still splits across threads; a thread's consecutive items share a chunk and build it once.
  const int64_t ppi = std::min<int64_t>(tpg, 4), npb = (tpg + ppi - 1) / ppi;
  // With several threads, chunks small enough for ~4 items per thread: a small image in 16 KiB chunks
  // makes too few (64ch 8x8, K 576: 3 chunks, a 2:1 split on 2 threads).
  const int64_t nthr = parallel_threads();
  const gemm::Kernel kernel = gemm::pick_kernel(active_isa(), rows_per == gemm::kPanel);
  // The residual add / ReLU in the GEMM epilogue itself (gemm::Args::residual / relu) where the kernel's epilogue
  // applies them; elsewhere post_block runs on each block the item wrote.
  const bool fused_post = ep.post() && gemm::epilogue_applies_post(active_isa(), rows_per == gemm::kPanel);
  const bool block_post = ep.post() && !fused_post;
  const int64_t ldo_m = ep.nhwc ? g.out_ch : 1, ldo_n = ep.nhwc ? 1 : p;
  // Implicit GEMM: each kernel row's kw * C codes are read in place from a zero-point-padded copy of the
  // image (one K segment per kernel row, activation rows stride_w * C apart), so no im2col rows (kh * kw
  // times the image's bytes) are built. Needs the panel layout, groups 1, contiguous kernel rows (dil_w 1)
  // that are whole K blocks (so K is unpadded and no block straddles two kernel rows) and finite input (the
  // per-pixel NaN scales live on the im2col path).
  const bool implicit = !direct && rows_per == gemm::kPanel && g.groups == 1 && g.dil_w == 1 && !r.any_bad &&
                        (g.kw * cg) % gemm::panel_k(s.wb) == 0;
  const int64_t hp = d.h + 2 * g.pad_h, wp = d.w + 2 * g.pad_w;
  // the border never changes: filled once; each image copies its interior
  const CallBuf<int8_t> xpad(Scratch::conv_xpad, implicit ? hp * wp * cs : 0);
  if (implicit) {
    int8_t* const xp = xpad.get();
    std::fill_n(xp, g.pad_h * wp * cs, pad8);
    std::fill_n(xp + (g.pad_h + d.h) * wp * cs, g.pad_h * wp * cs, pad8);
    for (int64_t y = g.pad_h; y < g.pad_h + d.h && g.pad_w > 0; ++y) {
      std::fill_n(xp + y * wp * cs, g.pad_w * cs, pad8);
      std::fill_n(xp + (y * wp + g.pad_w + d.w) * cs, g.pad_w * cs, pad8);
    }
  }
  // (implicit: no rows to keep in cache, chunks only for the split across threads)
  int64_t crows = implicit ? d.oh : std::max<int64_t>(1, kIm2colBytes / kp / d.ow);
  if (nthr > 1) crows = std::min(crows, std::max<int64_t>(1, d.oh * npb / (4 * nthr)));
  const int64_t nchunk = (d.oh + crows - 1) / crows;
  for (int64_t b = 0; b < d.b; ++b) {
    bool image_bad = false;
    if (r.any_bad && ep.out_f) {
      const uint8_t* fl = r.badpix.data() + b * hw;
      image_bad = std::any_of(fl, fl + hw, [](uint8_t v) { return v != 0; });
      if (image_bad) {
        row_scale.assign(p, ep.a_scale);
        for (int64_t m = 0; m < p; ++m)
          if (window_flagged(fl, 1, d.h, d.w, g, m / d.ow, m % d.ow))
            row_scale[m] = std::numeric_limits<float>::quiet_NaN();
      }
    }
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      gemm::Args a{};
      a.lda = kp;
      a.a_zp = zp_vec;
      a.a_zp_step = 0;
      a.a_scale = image_bad ? row_scale.data() : as_vec;
      a.a_scale_step = image_bad ? 1 : 0;
      a.w = w_tiles.data_ptr<uint8_t>() + grp * tpg * nchunks * wbytes;
      a.nchunks = nchunks;
      a.wbits = s.wb;
      a.group_rows = rows_per;
      a.corr = w_corr.data_ptr<int32_t>() + grp * tpg * 3 * rows_per;
      a.w_scale = ep.w_scale ? ep.w_scale + grp * og : nullptr;
      a.bias = ep.bias ? ep.bias + grp * og : nullptr;
      a.n = og;
      const int64_t out_off = ep.nhwc ? b * p * g.out_ch + grp * og : (b * g.out_ch + grp * og) * p;
      a.out_i = ep.out_i ? ep.out_i + out_off : nullptr;
      a.out_f = ep.out_f ? ep.out_f + out_off : nullptr;
      a.ldo_m = ldo_m;
      a.ldo_n = ldo_n;
      if (fused_post) {
        a.residual = ep.residual ? ep.residual + out_off : nullptr;
        a.relu = ep.relu;
      }
      if (direct) {
        for (int64_t m = 0; m < p; ++m) rowsum[m] = pixsum[b * hw + m];
        a.a = reinterpret_cast<const int8_t*>(xs + b * hw * cs);
        a.a_sum = rowsum.data();
        gemm::run(a, p, tpg);
        if (block_post) post_block(ep, out_off, p, og, ldo_m, ldo_n);
        continue;
      }
      // Row sums add kh horizontal sums of kw pixel sums (hsum, one per input row).
      const int64_t ox_lo = std::min(d.ow, (g.pad_w + g.stride_w - 1) / g.stride_w);  // first ix0 >= 0
      const int64_t last = d.w - 1 + g.pad_w - (g.kw - 1) * g.dil_w;  // ox * stride_w <= last: taps inside
      const int64_t ox_hi = last < 0 ? ox_lo : std::max(ox_lo, std::min(d.ow, last / g.stride_w + 1));
      const int32_t pad_tap = za * static_cast<int32_t>(cg);
      const int32_t* psb = pixsum + b * hw * g.groups + grp;
      parallel_for(d.h, d.ow * g.kw * 2, [&](int64_t y0, int64_t y1) {
        const int64_t gs = g.groups, sw = g.stride_w, dw = g.dil_w;
        const auto edge = [&](const int32_t* prow, int32_t* hrow, int64_t ox) {  // some taps in the padding
          const int64_t ix0 = ox * sw - g.pad_w;
          int32_t sum = 0;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t ix = ix0 + j * dw;
            sum += ix >= 0 && ix < d.w ? prow[ix * gs] : pad_tap;
          }
          hrow[ox] = sum;
        };
        for (int64_t iy = y0; iy < y1; ++iy) {
          if (implicit)
            std::memcpy(xpad.get() + ((iy + g.pad_h) * wp + g.pad_w) * cs, xs + (b * hw + iy * d.w) * cs, d.w * cs);
          const int32_t* prow = psb + iy * d.w * gs;
          int32_t* hrow = hsum.get() + iy * d.ow;
          for (int64_t ox = 0; ox < ox_lo; ++ox) edge(prow, hrow, ox);
          // all taps inside: tap by tap over the columns (a loop the compiler vectorizes for stride 1)
          std::fill(hrow + ox_lo, hrow + ox_hi, 0);
          for (int64_t j = 0; j < g.kw; ++j) {
            const int32_t* src = prow + (j * dw - g.pad_w) * gs;
            for (int64_t ox = ox_lo; ox < ox_hi; ++ox) hrow[ox] += src[ox * sw * gs];
          }
          for (int64_t ox = ox_hi; ox < d.ow; ++ox) edge(prow, hrow, ox);
        }
      });
      const Im2col ic{.x = reinterpret_cast<const int8_t*>(xs) + b * hw * cs + grp * cg, .hsum = hsum.get(),
                      .cs = cs, .h = d.h, .w = d.w, .ow = d.ow, .cg = cg, .kh = g.kh, .kw = g.kw,
                      .sh = g.stride_h, .sw = g.stride_w, .ph = g.pad_h, .pw = g.pad_w, .dh = g.dil_h, .dw = g.dil_w,
                      .k = k, .kp = kp, .ox_lo = ox_lo, .ox_hi = ox_hi, .row_runs = g.groups == 1 && g.dil_w == 1,
                      .pad_tap = pad_tap, .pad8 = pad8};
      if (implicit) {
        const int64_t item_cost = gemm_cost(crows * d.ow * ppi * rows_per * kp);
        const int64_t kb = gemm::panel_k(s.wb), row_bytes = g.kw * cs;
        parallel_for(nchunk * npb, item_cost, [&](int64_t bgn, int64_t end) {
          int32_t* const rs = scratch_of<int32_t>(Scratch::row_sums, d.ow);
          for (int64_t it = bgn; it < end; ++it) {
            const int64_t c = it / npb, pb = it % npb;
            const int64_t oy0 = c * crows, oy1 = std::min(d.oh, oy0 + crows);
            for (int64_t oy = oy0; oy < oy1; ++oy) {
              std::fill(rs, rs + d.ow, 0);  // row sums, as im2col_rows
              for (int64_t i = 0; i < g.kh; ++i)
                add_kernel_row_sums(hsum.get(), oy * g.stride_h - g.pad_h + i * g.dil_h, d.h, d.ow,
                                    pad_tap * static_cast<int32_t>(g.kw), rs);
              gemm::Args ac = a;
              ac.a = xpad.get() + oy * g.stride_h * wp * cs;  // padded row of kernel row 0
              ac.lda = g.stride_w * cs;
              ac.seg_blocks = row_bytes / kb;
              ac.seg_skip = g.dil_h * wp * cs - row_bytes;
              ac.a_sum = rs;
              if (ac.out_i) ac.out_i += oy * d.ow * ldo_m;
              if (ac.out_f) ac.out_f += oy * d.ow * ldo_m;
              if (ac.residual) ac.residual += oy * d.ow * ldo_m;
              kernel(ac, 0, d.ow, pb * ppi, std::min(tpg, (pb + 1) * ppi));
            }
            if (block_post) {
              const int64_t n0 = pb * ppi * rows_per, n1 = std::min(og, (pb + 1) * ppi * rows_per);
              post_block(ep, out_off + oy0 * d.ow * ldo_m + n0 * ldo_n, (oy1 - oy0) * d.ow, n1 - n0, ldo_m, ldo_n);
            }
          }
        });
        continue;
      }
      const int64_t item_cost = crows * d.ow * kp * kElementCost + gemm_cost(crows * d.ow * ppi * rows_per * kp);
      parallel_for(nchunk * npb, item_cost, [&](int64_t bgn, int64_t end) {
        const int64_t cap = std::min(crows, d.oh) * d.ow;
        int8_t* const rows = scratch_of<int8_t>(Scratch::im2col_rows, cap * kp);
        int32_t* const rs = scratch_of<int32_t>(Scratch::row_sums, cap);  // im2col_rows assigns it
        int64_t built = -1;
        for (int64_t it = bgn; it < end; ++it) {
          const int64_t c = it / npb, pb = it % npb;
          const int64_t oy0 = c * crows, oy1 = std::min(d.oh, oy0 + crows), m0 = oy0 * d.ow;
          if (c != built) im2col_rows(ic, oy0, oy1, rows, rs);
          built = c;
          gemm::Args ac = a;
          ac.a = rows;
          ac.a_sum = rs;
          if (image_bad) ac.a_scale = row_scale.data() + m0;
          if (ac.out_i) ac.out_i += m0 * ldo_m;
          if (ac.out_f) ac.out_f += m0 * ldo_m;
          if (ac.residual) ac.residual += m0 * ldo_m;
          kernel(ac, 0, (oy1 - oy0) * d.ow, pb * ppi, std::min(tpg, (pb + 1) * ppi));
          if (block_post) {  // the block this item wrote, still in cache
            const int64_t n0 = pb * ppi * rows_per, n1 = std::min(og, (pb + 1) * ppi * rows_per);
            post_block(ep, out_off + m0 * ldo_m + n0 * ldo_n, (oy1 - oy0) * d.ow, n1 - n0, ldo_m, ldo_n);
          }
        }
      });
    }
  }
}

void conv_gemm(const CodeSource& src, int32_t za, const Dims& d, const ConvGeom& g, const at::Tensor& w_tiles,
               const at::Tensor& w_corr, int64_t w_bits, const Epilogue& ep) {
  const GemmShape s = gemm_shape(d, g, w_corr, w_bits);
  conv_gemm_rows(quantize_rows(src, d, g, s), za, d, g, s, w_tiles, w_corr, ep);
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
    int16_t* const plane = scratch_of<int16_t>(Scratch::dw_plane, hp * wp);
    uint8_t* const codes = scratch_of<uint8_t>(Scratch::dw_codes, d.w);
    float* const fbuf = scratch_of<float>(Scratch::dw_floats, d.w);
    int32_t* const acc = scratch_of<int32_t>(Scratch::dw_acc, p);
    for (int64_t it = bgn; it < end; ++it) {
      const int64_t b = it / d.c, c = it % d.c;
      std::fill(plane, plane + hp * wp, int16_t(0));
      for (int64_t y = 0; y < d.h; ++y) {
        if (src.get(((b * d.c + c) * d.h + y) * d.w, d.w, codes, fbuf))
          any_bad.store(true, std::memory_order_relaxed);
        int16_t* row = plane + (y + g.pad_h) * wp + g.pad_w;
        for (int64_t x = 0; x < d.w; ++x) row[x] = static_cast<int16_t>(codes[x] - za);
      }
      for (int64_t o = c * mult; o < (c + 1) * mult; ++o) {
        const dw::Plane pl{plane, wp, wv + o * g.kh * g.kw, g.kh, g.kw, g.stride_h, g.stride_w,
                           g.dil_h, g.dil_w, d.oh, d.ow};
        const int64_t off = (b * g.out_ch + o) * p;
        if (ep.out_i) {
          fn(pl, ep.out_i + off);
        } else {
          fn(pl, acc);
          const float s = ep.a_scale * ep.w_scale[o];
          float* out = ep.out_f + off;
          if (ep.bias) {
            const float bv = ep.bias[o];
            for (int64_t i = 0; i < p; ++i) out[i] = static_cast<float>(acc[i]) * s + bv;
          } else {
            for (int64_t i = 0; i < p; ++i) out[i] = static_cast<float>(acc[i]) * s;
          }
          if (ep.post()) post_block(ep, off, p, 1, 1, p);
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

namespace {

// Float input of a conv: NCHW (any float type), or fp32 channels-last (a frozen conv's output, see
// conv2d_chain), whose rows the GEMM path quantizes pixel by pixel without a transpose.
struct FloatInput {
  at::Tensor x;
  bool nhwc;
  FloatInput(const at::Tensor& x_in, const ConvGeom& g)
      : nhwc(g.in_per_group > 1 && x_in.scalar_type() == at::kFloat && x_in.dim() == 4 && !x_in.is_contiguous() &&
             x_in.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    x = nhwc ? x_in : x_in.contiguous();
  }
};

// A conv's fp32 output, NCHW or channels-last (the GEMM path only: ep.nhwc).
at::Tensor conv_output(const Dims& d, const ConvGeom& g, const at::Tensor& like, bool nhwc) {
  return at::empty({d.b, g.out_ch, d.oh, d.ow}, like.options().dtype(at::kFloat).memory_format(
                                                     nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

// The bound epilogue of a float conv (w_scale and bias held as fp32 contiguous tensors), with the residual add /
// ReLU of `ops` fused where the residual is an fp32 tensor of the output's sizes and memory order.
struct FloatEpilogue {
  at::Tensor w_scale, bias;
  Epilogue ep;
  // into `out` (NCHW, or NHWC where nhwc), no residual / ReLU
  FloatEpilogue(const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in, double a_scale, float* out,
                bool nhwc)
      : w_scale(w_scale_in.to(at::kFloat).contiguous()) {
    if (bias_in) bias = bias_in->to(at::kFloat).contiguous();
    ep.out_f = out;
    ep.w_scale = w_scale.data_ptr<float>();
    ep.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    ep.a_scale = static_cast<float>(a_scale);
    ep.nhwc = nhwc;
  }
  FloatEpilogue(const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in, double a_scale, at::Tensor& out,
                bool nhwc, const ConvOutputOps& ops = {})
      : FloatEpilogue(w_scale_in, bias_in, a_scale, out.data_ptr<float>(), nhwc) {
    const at::Tensor* r = ops.residual;
    if (r && r->device().is_cpu() && r->scalar_type() == at::kFloat && r->sizes() == out.sizes() &&
        r->strides() == out.strides())
      ep.residual = r->data_ptr<float>();
    ep.relu = ops.relu && (!r || ep.residual);
  }
  // The conv's output with ops applied: fused above, or (a broadcasting residual, another dtype or layout) ATen's
  // add and ReLU as the model wrote them.
  at::Tensor finish(at::Tensor out, const ConvOutputOps& ops) const {
    if (!ops.residual || ep.residual) return out;
    at::Tensor z = at::add(out, *ops.residual);
    return ops.relu ? at::relu(z) : z;
  }
};

// A GEMM-path conv of layer l on float input `in` with output epilogue ep.
void conv_gemm_float(const FloatInput& in, const Dims& d, const ConvLayer& l, const Epilogue& ep) {
  const GemmShape s = gemm_shape(d, l.g, l.w_corr, l.w_bits);
  const ew::FqParams p = act_params(l.a_scale, l.a_zero_point, l.a_bits);
  const In xin(in.x);
  CodeSource src;
  src.x = &xin;
  src.p = p;
  conv_gemm_rows(in.nhwc ? requant_rows(in.x.data_ptr<float>(), d, l.g, s, p, false) : quantize_rows(src, d, l.g, s),
                 static_cast<int32_t>(l.a_zero_point), d, l.g, s, l.w, l.w_corr, ep);
}

}  // namespace

at::Tensor conv2d(const at::Tensor& x_in, const at::Tensor& w_prepacked, const at::Tensor& w_corr,
                  const at::Tensor& w_scale_in, int64_t w_bits, const ConvGeom& g, const std::optional<at::Tensor>& bias_in,
                  double a_scale, int64_t a_zero_point, int64_t a_bits, bool channels_last_out,
                  const ConvOutputOps& ops) {
  const FloatInput in(x_in, g);
  const Dims d = dims_of(in.x, g);
  const bool gemm_path = g.in_per_group > 1, nhwc_out = channels_last_out && gemm_path;
  at::Tensor out = conv_output(d, g, in.x, nhwc_out);
  const FloatEpilogue fe(w_scale_in, bias_in, a_scale, out, nhwc_out, ops);
  if (gemm_path) {
    conv_gemm_float(in, d, ConvLayer{w_prepacked, w_corr, w_scale_in, w_bits, g, bias_in, a_scale, a_zero_point, a_bits},
                    fe.ep);
    return fe.finish(out, ops);
  }
  const In xin(in.x);
  CodeSource src;
  src.x = &xin;
  src.p = act_params(a_scale, a_zero_point, a_bits);
  conv_depthwise(src, static_cast<int32_t>(a_zero_point), d, g, w_prepacked, fe.ep);
  return fe.finish(out, ops);
}

at::Tensor conv2d_chain(const at::Tensor& x_in, const ConvLayer& a, bool relu, const ConvLayer& b,
                        bool channels_last_out, const ConvOutputOps& ops) {
  TORCH_CHECK_VALUE(a.g.in_per_group > 1 && b.g.in_per_group > 1,
                    "conv2d_chain: both convs must take the GEMM path (input channels per group > 1)");
  TORCH_CHECK_VALUE(b.g.in_per_group * b.g.groups == a.g.out_ch, "conv2d_chain: the second conv takes ",
                    b.g.in_per_group * b.g.groups, " input channels, the first gives ", a.g.out_ch);
  // first conv: fp32 NHWC output
  const FloatInput in(x_in, a.g);
  const Dims da = dims_of(in.x, a.g);
  const CallBuf<float> mid(Scratch::chain_mid, da.b * da.oh * da.ow * a.g.out_ch);  // [b][oh][ow][c], internal
  conv_gemm_float(in, da, a, FloatEpilogue(a.w_scale, a.bias, a.a_scale, mid.get(), true).ep);
  // second conv: its rows quantized from the NHWC output (the ReLU applied there)
  const Dims db = dims_of(da.b, a.g.out_ch, da.oh, da.ow, b.g);
  const GemmShape sb = gemm_shape(db, b.g, b.w_corr, b.w_bits);
  const ActRows rb = requant_rows(mid.get(), db, b.g, sb, act_params(b.a_scale, b.a_zero_point, b.a_bits), relu);
  at::Tensor out = conv_output(db, b.g, in.x, channels_last_out);
  const FloatEpilogue fe(b.w_scale, b.bias, b.a_scale, out, channels_last_out, ops);
  conv_gemm_rows(rb, static_cast<int32_t>(b.a_zero_point), db, b.g, sb, b.w, b.w_corr, fe.ep);
  return fe.finish(out, ops);
}


}  // namespace dfqkern::cpu
