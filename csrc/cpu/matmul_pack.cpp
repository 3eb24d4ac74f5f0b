// Torch-free operand packing of the activation x activation matmul (layouts: matmul.h) and its runners.
#include "matmul.h"

#include <algorithm>
#include <cstring>

namespace dfqkern::cpu::matmul {

using namespace gemm;

namespace {

// The index arithmetic below shifts and masks by these sizes.
static_assert(kPanel == 16 && kBlockBytes == 64 && kTileRows == 4 && kChunkBytes == 32 && kI16Panel == 16);

// Column sums of B (int32: K * 255 < 2^31 for every K the contract allows).
void column_sums(const Problem& p, std::vector<int32_t>& sums) {
  sums.assign(static_cast<size_t>(p.n), 0);
  if (p.b_sn == 1) {  // B row-major (attn.v's v): row by row, a loop the compiler vectorizes
    for (int64_t k = 0; k < p.k; ++k) {
      const uint8_t* row = p.b + k * p.b_sk;
      for (int64_t n = 0; n < p.n; ++n) sums[n] += row[n];
    }
    return;
  }
  for (int64_t n = 0; n < p.n; ++n) {
    const uint8_t* col = p.b + n * p.b_sn;
    int32_t sum = 0;
    for (int64_t k = 0; k < p.k; ++k) sum += col[k * p.b_sk];
    sums[n] = sum;
  }
}

inline uint32_t bytes4(uint8_t b0, uint8_t b1, uint8_t b2, uint8_t b3) {
  return uint32_t(b0) | uint32_t(b1) << 8 | uint32_t(b2) << 16 | uint32_t(b3) << 24;
}

// B^T (B's columns as weight rows) into the tile or panel layout of 8-bit codes (gemm.h), zero
// filled beforehand. The two usual views are moved 4 / 32 codes at a time: B^T rows contiguous
// (b_sk == 1: q.k^T's k^T) and B rows contiguous (b_sn == 1: attn.v's v, panels only); byte by byte
// otherwise.
void place_b(const Problem& p, bool panels, int64_t nblocks, uint8_t* w) {
  if (panels) {  // K block k / 4 of panel n / 16: 4 consecutive k of each of its 16 rows
    const int64_t pstride = nblocks * kBlockBytes;
    if (p.b_sk == 1) {
      for (int64_t n = 0; n < p.n; ++n) {
        const uint8_t* src = p.b + n * p.b_sn;
        uint8_t* dst = w + (n >> 4) * pstride + 4 * (n & 15);
        int64_t k = 0;
        for (; k + 4 <= p.k; k += 4) std::memcpy(dst + (k >> 2) * kBlockBytes, src + k, 4);
        for (; k < p.k; ++k) dst[(k >> 2) * kBlockBytes + (k & 3)] = src[k];
      }
      return;
    }
    if (p.b_sn == 1) {
      for (int64_t k = 0; k < p.k; k += 4) {
        const uint8_t* r0 = p.b + k * p.b_sk;
        const uint8_t* r1 = k + 1 < p.k ? r0 + p.b_sk : nullptr;
        const uint8_t* r2 = k + 2 < p.k ? r0 + 2 * p.b_sk : nullptr;
        const uint8_t* r3 = k + 3 < p.k ? r0 + 3 * p.b_sk : nullptr;
        for (int64_t n = 0; n < p.n; ++n) {
          const uint32_t v = bytes4(r0[n], r1 ? r1[n] : 0, r2 ? r2[n] : 0, r3 ? r3[n] : 0);
          std::memcpy(w + (n >> 4) * pstride + (k >> 2) * kBlockBytes + 4 * (n & 15), &v, 4);
        }
      }
      return;
    }
    for (int64_t n = 0; n < p.n; ++n)
      for (int64_t k = 0; k < p.k; ++k)
        w[(n >> 4) * pstride + (k >> 2) * kBlockBytes + 4 * (n & 15) + (k & 3)] = p.b[n * p.b_sn + k * p.b_sk];
    return;
  }
  // chunk k / 32 of tile n / 4: 32 consecutive k of each of its 4 rows
  const int64_t tstride = nblocks * kTileRows * kChunkBytes;
  for (int64_t n = 0; n < p.n; ++n) {
    const uint8_t* src = p.b + n * p.b_sn;
    uint8_t* dst = w + (n >> 2) * tstride + (n & 3) * kChunkBytes;
    if (p.b_sk == 1) {
      for (int64_t k = 0; k < p.k; k += kChunkBytes)
        std::memcpy(dst + (k >> 5) * kTileRows * kChunkBytes, src + k, std::min<int64_t>(kChunkBytes, p.k - k));
    } else {
      for (int64_t k = 0; k < p.k; ++k) dst[(k >> 5) * kTileRows * kChunkBytes + (k & 31)] = src[k * p.b_sk];
    }
  }
}

// B^T in the int16 layout (matmul.h), zero filled beforehand; the same two fast views as place_b.
void place_b16(const Problem& p, int64_t kpairs, int16_t* w) {
  const int64_t pstride = kpairs * kI16Panel * 2;
  if (p.b_sk == 1) {  // one (k, k + 1) pair per 32-bit move
    for (int64_t n = 0; n < p.n; ++n) {
      const uint8_t* src = p.b + n * p.b_sn;
      int16_t* dst = w + (n >> 4) * pstride + (n & 15) * 2;
      int64_t k = 0;
      for (; k + 2 <= p.k; k += 2) {
        const uint32_t v = uint32_t(src[k]) | uint32_t(src[k + 1]) << 16;
        std::memcpy(dst + (k >> 1) * kI16Panel * 2, &v, 4);
      }
      if (k < p.k) dst[(k >> 1) * kI16Panel * 2] = src[k];
    }
    return;
  }
  if (p.b_sn == 1) {
    for (int64_t k = 0; k < p.k; k += 2) {
      const uint8_t* r0 = p.b + k * p.b_sk;
      const uint8_t* r1 = k + 1 < p.k ? r0 + p.b_sk : nullptr;
      for (int64_t n = 0; n < p.n; ++n) {
        const uint32_t v = uint32_t(r0[n]) | uint32_t(r1 ? r1[n] : 0) << 16;
        std::memcpy(w + (n >> 4) * pstride + (k >> 1) * kI16Panel * 2 + (n & 15) * 2, &v, 4);
      }
    }
    return;
  }
  for (int64_t n = 0; n < p.n; ++n)
    for (int64_t k = 0; k < p.k; ++k)
      w[(n >> 4) * pstride + (k >> 1) * kI16Panel * 2 + (n & 15) * 2 + (k & 1)] = p.b[n * p.b_sn + k * p.b_sk];
}

// B^T and its correction triples {P = 128 * sum, zw, Q = sum - K * zw} per weight row (the int32 casts
// wrap like the kernels) for the tile or panel layout.
void pack_b(const Problem& p, int group_rows, int64_t nblocks, Scratch& s) {
  place_b(p, group_rows == kPanel, nblocks, s.b_packed.data());
  column_sums(p, s.b_sum);
  for (int64_t n = 0; n < p.n; ++n) {
    const int64_t zp = p.zb[n * p.zb_step], sum = s.b_sum[n];
    int32_t* c3 = s.b_corr.data() + (n / group_rows) * 3 * group_rows + n % group_rows;
    c3[0] = static_cast<int32_t>(kActOffset * sum);
    c3[group_rows] = static_cast<int32_t>(zp);
    c3[2 * group_rows] = static_cast<int32_t>(sum - p.k * zp);
  }
}

}  // namespace

void run(const Problem& p, Kernel fn, int group_rows, Scratch& s) {
  if (p.m <= 0 || p.n <= 0) return;
  const bool panels = group_rows == kPanel;
  const int64_t ck = chunk_k(8), kp = (p.k + ck - 1) / ck * ck;  // activation rows: whole 32-byte chunks
  const int64_t groups = (p.n + group_rows - 1) / group_rows;
  const int64_t nblocks = panels ? (p.k + panel_k(8) - 1) / panel_k(8) : kp / ck;
  s.a_rows.resize(static_cast<size_t>(p.m * kp));
  s.a_sum.resize(static_cast<size_t>(p.m));
  s.b_packed.assign(static_cast<size_t>(groups * nblocks * (panels ? kBlockBytes : kTileRows * kChunkBytes)), 0);
  s.b_corr.assign(static_cast<size_t>(groups * 3 * group_rows), 0);
  if (p.a_sk != 1) s.codes.resize(static_cast<size_t>(p.k));
  for (int64_t m = 0; m < p.m; ++m) {
    const uint8_t* row = p.a + m * p.a_sm;
    if (p.a_sk != 1) {  // gather a strided row (e.g. a transposed view)
      for (int64_t k = 0; k < p.k; ++k) s.codes[k] = row[k * p.a_sk];
      row = s.codes.data();
    }
    s.a_sum[m] = codes_to_act_row(row, p.k, kp, s.a_rows.data() + m * kp);
  }
  pack_b(p, group_rows, nblocks, s);

  Args g{};
  g.a = s.a_rows.data();
  g.lda = kp;
  g.a_sum = s.a_sum.data();
  g.a_zp = p.za;
  g.a_zp_step = p.za_step;
  g.w = s.b_packed.data();
  g.nchunks = nblocks;
  g.wbits = 8;
  g.group_rows = group_rows;
  g.corr = s.b_corr.data();
  g.n = p.n;
  g.out_i = p.out;
  g.ldo_m = p.n;
  g.ldo_n = 1;
  fn(g, 0, p.m, 0, groups);
}

void run_i16(const Problem& p, I16Kernel fn, Scratch& s) {
  if (p.m <= 0 || p.n <= 0) return;
  const int64_t kpairs = (p.k + 1) / 2, lda = 2 * kpairs;
  const int64_t panels = (p.n + kI16Panel - 1) / kI16Panel;
  s.a16.resize(static_cast<size_t>(p.m * lda));
  s.a_sum.resize(static_cast<size_t>(p.m));
  s.b16.assign(static_cast<size_t>(panels * kpairs * kI16Panel * 2), 0);
  s.b_corr.assign(static_cast<size_t>(2 * panels * kI16Panel), 0);  // zb, then q
  for (int64_t m = 0; m < p.m; ++m) {
    const uint8_t* src = p.a + m * p.a_sm;
    int16_t* dst = s.a16.data() + m * lda;
    int32_t sum = 0;
    if (p.a_sk == 1) {  // the usual row-major A: a loop the compiler vectorizes
      for (int64_t k = 0; k < p.k; ++k) {
        dst[k] = src[k];
        sum += src[k];
      }
    } else {
      for (int64_t k = 0; k < p.k; ++k) {
        dst[k] = src[k * p.a_sk];
        sum += src[k * p.a_sk];
      }
    }
    if (lda > p.k) dst[p.k] = 0;
    s.a_sum[m] = sum;
  }
  int32_t* zb = s.b_corr.data();
  int32_t* q = zb + panels * kI16Panel;
  place_b16(p, kpairs, s.b16.data());
  column_sums(p, s.b_sum);
  for (int64_t n = 0; n < p.n; ++n) {
    const int64_t z = p.zb[n * p.zb_step];
    zb[n] = static_cast<int32_t>(z);
    q[n] = static_cast<int32_t>(s.b_sum[n] - p.k * z);
  }
  I16Args g{s.a16.data(), lda, s.b16.data(), kpairs, s.a_sum.data(), p.za, p.za_step, zb, q, p.m, p.n, p.out};
  fn(g);
}

}  // namespace dfqkern::cpu::matmul
