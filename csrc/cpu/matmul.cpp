// ATen driver of the activation x activation matmul (attention): batch and zero-point broadcasting
// through strides, the layout choice and threads over batch elements; packing and kernels: matmul.h.
#include <ATen/ATen.h>

#include <vector>

#include "common.h"
#include "gemm_driver.h"
#include "kernels.h"
#include "matmul.h"

namespace dfqkern::cpu {

namespace {

// Element strides of a tensor over the batch dims [0, nb) of the output, 0 where it broadcasts (size 1).
std::vector<int64_t> batch_strides(const at::Tensor& t, int64_t nb) {
  std::vector<int64_t> st(static_cast<size_t>(nb), 0);
  if (t.numel() == 1) return st;
  for (int64_t d = 0; d < nb; ++d) st[d] = t.size(d) == 1 ? 0 : t.stride(d);
  return st;
}

// A zero point read in place (no broadcast copy): int32 data, its batch strides and the stride along
// its one free dim (rows of A or columns of B; 0 when it is one value there).
struct Zp {
  at::Tensor t;  // int32 (a converted copy only for other integer dtypes)
  std::vector<int64_t> batch;
  int64_t step;
};

Zp zero_points(const at::Tensor& z, int64_t nb, int64_t free_dim) {
  Zp r{z.scalar_type() == at::kInt ? z : z.to(at::kInt), {}, 0};
  r.batch = batch_strides(r.t, nb);
  if (r.t.numel() != 1 && r.t.size(free_dim) != 1) r.step = r.t.stride(free_dim);
  return r;
}

}  // namespace

void matmul::run_active(const Problem& p, Scratch& s) {
  // 8-bit codes: cpu-panel-v1 on the VNNI level (vpdpbusd takes full bytes); the int16 layout on AVX2
  // (vpmaddubsw would saturate; measured at 65 x 32 x 65 per head, packing included: 1.8x faster than
  // the tile kernels, whose horizontal sums and K padding to 32 dominate at short K); cpu-tile-v1 elsewhere.
  const Isa isa = active_isa();
  const bool panels = vnni_level(isa);
#if defined(__x86_64__) || defined(__i386__)
  const I16Kernel i16 = isa == Isa::avx2 ? i16_avx2 : nullptr;
#else
  const I16Kernel i16 = nullptr;
#endif
  if (i16) {
    run_i16(p, i16, s);
    return;
  }
  run(p, gemm::pick_kernel(isa, panels), panels ? gemm::kPanel : gemm::kTileRows, s);
}

at::Tensor matmul_int(const at::Tensor& a, const at::Tensor& a_zero_point, const at::Tensor& b,
                      const at::Tensor& b_zero_point) {
  const int64_t dim = a.dim(), nb = dim - 2, m = a.size(-2), k = a.size(-1), n = b.size(-1);
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.back() = n;
  const auto opts = a.options().dtype(at::kInt);
  if (a.numel() == 0 || b.numel() == 0) return at::zeros(shape, opts);  // K = 0: all sums are 0
  // operands and zero points are read through their strides (transposed / expanded views need no copy)
  const std::vector<int64_t> sa = batch_strides(a, nb), sb = batch_strides(b, nb);
  const Zp za = zero_points(a_zero_point, nb, dim - 2), zb = zero_points(b_zero_point, nb, dim - 1);
  int64_t batch = 1;
  for (int64_t d = 0; d < nb; ++d) batch *= shape[d];
  at::Tensor out = at::empty(shape, opts);

  const uint8_t* ap = a.data_ptr<uint8_t>();
  const uint8_t* bp = b.data_ptr<uint8_t>();
  const int32_t* zap = za.t.data_ptr<int32_t>();
  const int32_t* zbp = zb.t.data_ptr<int32_t>();
  int32_t* op = out.data_ptr<int32_t>();
  parallel_for(batch, m * n * k, [&](int64_t b0, int64_t b1) {
    matmul::Scratch s;
    for (int64_t i = b0; i < b1; ++i) {
      int64_t oa = 0, ob = 0, oza = 0, ozb = 0;
      for (int64_t d = nb - 1, rest = i; d >= 0; --d) {  // batch index i -> each tensor's offset
        const int64_t idx = rest % shape[d];
        rest /= shape[d];
        oa += idx * sa[d];
        ob += idx * sb[d];
        oza += idx * za.batch[d];
        ozb += idx * zb.batch[d];
      }
      matmul::Problem p{};
      p.a = ap + oa;
      p.a_sm = a.stride(-2);
      p.a_sk = a.stride(-1);
      p.b = bp + ob;
      p.b_sk = b.stride(-2);
      p.b_sn = b.stride(-1);
      p.za = zap + oza;
      p.za_step = za.step;
      p.zb = zbp + ozb;
      p.zb_step = zb.step;
      p.m = m;
      p.n = n;
      p.k = k;
      p.out = op + i * m * n;
      matmul::run_active(p, s);
    }
  });
  return out;
}

}  // namespace dfqkern::cpu
