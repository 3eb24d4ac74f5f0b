// AVX2 kernel of the activation x activation matmul in the int16 layout (matmul.h): strips of up to
// 6 rows x 16 columns, 12 int32 accumulators in registers (+ 2 weight vectors and a broadcast: 15 of
// the 16 ymm), one vpmaddwd + vpaddd per 16 multiply-adds, the zero-point epilogue in registers.
// The GEMM's tile kernels fit long K: at attention's K = 32 / 65 their per-tile horizontal sums and
// K padding to 32 cost more than the products.
#include <algorithm>
#include <cstring>

#include "matmul.h"

#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

namespace dfqkern::cpu::matmul {
namespace {

inline __m256i ld(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline __m256i bcast(const int16_t* p) {  // one (k, k + 1) pair of a row, to all 8 lanes
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <int MR>
void strip(const I16Args& g, int64_t m, int64_t p) {
  // named accumulators, not an array: GCC kept the array in memory (stores and reloads every k pair)
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
          c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const int16_t* bp = g.b + p * g.kpairs * kI16Panel * 2;
  const int16_t* a0 = g.a + m * g.lda;
  const int64_t lda = g.lda;
  for (int64_t j = 0; j < g.kpairs; ++j, bp += kI16Panel * 2, a0 += 2) {
    const __m256i b0 = ld(bp), b1 = ld(bp + 16);
#define DFQ_I16_ROW(r)                                                      \
    if constexpr (MR > r) {                                                 \
      const __m256i av = bcast(a0 + r * lda);                               \
      c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(b0, av));       \
      c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(b1, av));       \
    }
    DFQ_I16_ROW(0)
    DFQ_I16_ROW(1)
    DFQ_I16_ROW(2)
    DFQ_I16_ROW(3)
    DFQ_I16_ROW(4)
    DFQ_I16_ROW(5)
#undef DFQ_I16_ROW
  }
  const __m256i acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  const int64_t n0 = p * kI16Panel;
  const int nvalid = static_cast<int>(std::min<int64_t>(kI16Panel, g.n - n0));
  const __m256i zb0 = ld(g.zb + n0), zb1 = ld(g.zb + n0 + 8), q0 = ld(g.q + n0), q1 = ld(g.q + n0 + 8);
  for (int r = 0; r < MR; ++r) {
    const __m256i sa = _mm256_set1_epi32(g.a_sum[m + r]), za = _mm256_set1_epi32(g.za[(m + r) * g.za_step]);
    const __m256i o0 = _mm256_sub_epi32(_mm256_sub_epi32(acc[r][0], _mm256_mullo_epi32(zb0, sa)), _mm256_mullo_epi32(za, q0));
    const __m256i o1 = _mm256_sub_epi32(_mm256_sub_epi32(acc[r][1], _mm256_mullo_epi32(zb1, sa)), _mm256_mullo_epi32(za, q1));
    int32_t* o = g.out + (m + r) * g.n + n0;
    if (nvalid == kI16Panel) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), o0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), o1);
    } else {
      alignas(32) int32_t tmp[kI16Panel];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), o0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), o1);
      std::memcpy(o, tmp, sizeof(int32_t) * nvalid);
    }
  }
}

constexpr int kMR = 6;

}  // namespace

void i16_avx2(const I16Args& g) {
  const int64_t panels = (g.n + kI16Panel - 1) / kI16Panel;
  for (int64_t m = 0; m < g.m; m += kMR) {  // a strip's rows stay in L1 while it sweeps every panel
    const int mr = static_cast<int>(std::min<int64_t>(kMR, g.m - m));
    for (int64_t p = 0; p < panels; ++p) {
      switch (mr) {
        case 6: strip<6>(g, m, p); break;
        case 5: strip<5>(g, m, p); break;
        case 4: strip<4>(g, m, p); break;
        case 3: strip<3>(g, m, p); break;
        case 2: strip<2>(g, m, p); break;
        default: strip<1>(g, m, p); break;
      }
    }
  }
}

}  // namespace dfqkern::cpu::matmul
