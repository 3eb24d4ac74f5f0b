// Portable packed GEMM (any CPU) and the epilogue shared with the AVX2 kernels.
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm.h"

namespace dfqkern::cpu::gemm {

namespace {

// One output element from its raw dot: zero-point corrections c[0], c[stride], c[2 * stride] of
// the weight row (both layouts store them stride apart), then the int32 or fp32 store.
inline void store_one(const Args& g, int64_t m, int64_t row, int32_t dot, const int32_t* c, int stride,
                      uint32_t sa, uint32_t za) {
  // wrapping uint32 arithmetic: exact whenever the true result fits in int32
  const uint32_t acc = static_cast<uint32_t>(dot) + static_cast<uint32_t>(c[0]) -
                       static_cast<uint32_t>(c[stride]) * sa - za * static_cast<uint32_t>(c[2 * stride]);
  const int64_t o = m * g.ldo_m + row * g.ldo_n;
  if (g.out_i) {
    g.out_i[o] = static_cast<int32_t>(acc);
  } else {
    // reference epilogue order: acc * (a_scale * w_scale) + bias, in fp32
    float y = static_cast<float>(static_cast<int32_t>(acc)) * (g.a_scale[m * g.a_scale_step] * g.w_scale[row]);
    if (g.bias) y = y + g.bias[row];
    if (g.residual) y = y + g.residual[o];
    if (g.relu) y = y < 0.f ? 0.f : y;
    g.out_f[o] = y;
  }
}

}  // namespace

void finish_tile(const Args& g, int64_t m0, int mr, int64_t t, const int32_t (*dots)[kTileRows]) {
  for (int i = 0; i < mr; ++i) {
    const int64_t m = m0 + i;
    const uint32_t sa = static_cast<uint32_t>(g.a_sum[m]);
    const uint32_t za = static_cast<uint32_t>(g.a_zp[m * g.a_zp_step]);
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t row = t * kTileRows + r;
      if (row >= g.n) break;
      store_one(g, m, row, dots[i][r], g.corr + t * 3 * kTileRows + r, kTileRows, sa, za);
    }
  }
}

namespace {

// Unpacks one 32-byte chunk of a row into chunk_k(wbits) codes.
inline int unpack_chunk(const uint8_t* src, int wbits, int16_t* dst) {
  if (wbits == 8) {
    for (int j = 0; j < 32; ++j) dst[j] = src[j];
    return 32;
  }
  if (wbits == 2) {
    for (int s = 0; s < 4; ++s)
      for (int j = 0; j < 32; ++j) dst[32 * s + j] = (src[j] >> (2 * s)) & 3;
    return 128;
  }
  for (int j = 0; j < 32; ++j) {
    dst[j] = src[j] & 15;
    dst[32 + j] = src[j] >> 4;
  }
  return 64;
}

}  // namespace

void run_portable(const Args& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const int ck = chunk_k(g.wbits);
  int16_t w[kTileRows][128];
  std::vector<int32_t> dots_v(static_cast<size_t>(m1 - m0) * kTileRows);
  auto dots = reinterpret_cast<int32_t(*)[kTileRows]>(dots_v.data());
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(dots_v.begin(), dots_v.end(), 0);
    const uint8_t* wt = g.w + t * g.nchunks * kTileRows * kChunkBytes;
    for (int64_t c = 0; c < g.nchunks; ++c) {
      for (int r = 0; r < kTileRows; ++r) unpack_chunk(wt + (c * kTileRows + r) * kChunkBytes, g.wbits, w[r]);
      for (int64_t m = m0; m < m1; ++m) {
        for (int r = 0; r < kTileRows; ++r) {
          int32_t s = 0;
          const int8_t* a = g.a + m * g.lda + c * ck;
          for (int j = 0; j < ck; ++j) s += int32_t(a[j]) * w[r][j];
          dots[m - m0][r] += s;
        }
      }
    }
    finish_tile(g, m0, static_cast<int>(m1 - m0), t, dots);
  }
}

void finish_panels(const Args& g, int64_t m0, int mr, int64_t p0, int np, const int32_t* dots, int ldd) {
  for (int i = 0; i < mr; ++i) {
    const int64_t m = m0 + i;
    const uint32_t sa = static_cast<uint32_t>(g.a_sum[m]);
    const uint32_t za = static_cast<uint32_t>(g.a_zp[m * g.a_zp_step]);
    for (int j = 0; j < np * kPanel; ++j) {
      const int64_t row = p0 * kPanel + j;
      if (row >= g.n) break;
      store_one(g, m, row, dots[i * ldd + j], g.corr + (p0 + j / kPanel) * 3 * kPanel + j % kPanel, kPanel, sa, za);
    }
  }
}

void panels_portable(const Args& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int kb = panel_k(g.wbits), sb = g.wbits == 3 ? 4 : g.wbits, slots = 8 / sb;
  const int cmask = (1 << sb) - 1;
  int32_t dots[kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* wp = g.w + p * g.nchunks * kBlockBytes;
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(dots, dots + kPanel, 0);
      for (int64_t b = 0; b < g.nchunks; ++b) {
        const int8_t* a = g.a + m * g.lda + b * kb + seg_offset(g, b);
        const uint8_t* wb = wp + b * kBlockBytes;
        for (int r = 0; r < kPanel; ++r)
          for (int s = 0; s < slots; ++s)
            for (int j = 0; j < 4; ++j) dots[r] += int32_t(a[4 * s + j]) * ((wb[4 * r + j] >> (s * sb)) & cmask);
      }
      finish_panels(g, m, 1, p, 1, dots, kPanel);
    }
  }
}

void minmax_portable(const float* x, int64_t n, float& lo, float& hi) {
  float l = x[0], h = x[0];
  for (int64_t i = 1; i < n; ++i) {
    l = std::min(l, x[i]);
    h = std::max(h, x[i]);
  }
  lo = l;
  hi = h;
}

}  // namespace dfqkern::cpu::gemm
