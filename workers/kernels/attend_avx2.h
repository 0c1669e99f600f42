// AVX2 + FMA flash-decoding for paged decode attention (decode_attention.h): float32 and int8
// caches on CPUs without AVX-512 (there the generic three-pass loops read a sequence's keys,
// then its values, through scalar row walks: ~13 GB/s of KV on a 2-core AVX2 EPYC). The same
// single pass as attend_avx512, 8 tokens at a time: the chunk's scores for every query head of
// the task, an online-softmax update (running max m and sum l; sums rescaled by
// exp(m_old - m_new)), then the chunk's values. Value sums run over column groups of at most
// 32 floats and two query heads (int8 rows: 16 and four), so accumulators + value vectors fit
// the 16 ymm registers. Rows (cache_rows.h) says how a row becomes float32: int8 rows are
// widened in registers and their scales applied once per token (to the 8 scores, to the 8
// weights).
#pragma once

#include "cache_rows.h"
#include "common.h"
#include "row_cursor.h"

namespace flotilla {

#if FLOTILLA_AVX2
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// lane i = the sum of the 8 lanes of row i, for rows [8][8] (32-byte aligned)
inline __m256 reduce8(const float* rows) {
  __m256 h[4];
  for (int k = 0; k < 4; ++k)
    h[k] = _mm256_hadd_ps(_mm256_load_ps(rows + 16 * k), _mm256_load_ps(rows + 16 * k + 8));
  const __m256 a = _mm256_hadd_ps(h[0], h[1]), b = _mm256_hadd_ps(h[2], h[3]);
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// acc[g][0 .. DW) = corr[g] * acc[g] + sum_t p[g][t] v_t over nt <= 8 tokens, for GN query
// heads (p: [GN][8], already times the value rows' scales; acc rows D floats apart;
// vrows[t] + col: token t's DW value columns).
template <typename Rows, int DW, int GN>
inline void values_chunk8(const float* p, const float* corr, int nt,
                          const typename Rows::raw_t* const* vrows, int64_t col, float* acc,
                          int64_t D) {
  constexpr int NJ = DW / 8;
  __m256 a[GN][NJ];
  for (int g = 0; g < GN; ++g) {
    const __m256 c = _mm256_set1_ps(corr[g]);
    for (int j = 0; j < NJ; ++j)
      a[g][j] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * D + 8 * j), c);
  }
  for (int t = 0; t < nt; ++t) {
    const auto* vr = vrows[t] + col;
    __m256 v[NJ];
    for (int j = 0; j < NJ; ++j) v[j] = Rows::load8(vr + 8 * j);
    for (int g = 0; g < GN; ++g) {
      const __m256 w = _mm256_set1_ps(p[g * 8 + t]);
      for (int j = 0; j < NJ; ++j) a[g][j] = _mm256_fmadd_ps(w, v[j], a[g][j]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int j = 0; j < NJ; ++j) _mm256_storeu_ps(acc + g * D + 8 * j, a[g][j]);
}

// Scratch of one thread for attend_avx2, for up to nq query heads of head dim d.
struct AttendScratch8 {
  std::vector<float> buf;
  float *tile, *p, *ks, *vs, *corr, *m, *l, *acc;
  AttendScratch8(int64_t nq, int64_t d) : buf(nq * (64 + 8 + 16 + 3 + d) + 8) {
    tile = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 31) & ~uintptr_t(31));
    p = tile + nq * 64;  // [nq][8]
    ks = p + nq * 8;     // [KV heads][8]: the chunk's key row scales (scaled rows only)
    vs = ks + nq * 8;    // ... and value row scales
    corr = vs + nq * 8;
    m = corr + nq;
    l = m + nq;
    acc = l + nq;  // [nq][d]
  }
};

// One task: KV heads h0 .. h0+nh-1 of one sequence and their nh * G query heads (qf:
// [nh*G][DC], pre-scaled). On return s.acc holds sum_t exp(s_t - m) v_t and s.l the sum of the
// weights (as attend_avx512). row_stride: between a block's tokens, in Rows::raw_t.
template <typename Rows, int DC>
void attend_avx2(const float* qf, int64_t nh, int64_t G, const typename Rows::raw_t* kp,
                 const typename Rows::raw_t* vp, const int32_t* table, int64_t bs,
                 int64_t row_stride, int64_t h0, int64_t start, int64_t len, AttendScratch8& s) {
  using raw_t = typename Rows::raw_t;
  constexpr int NJ = DC / 8;
  // Value columns per pass and query heads per pass. A float value vector is one load, so
  // passes of 32 columns x 2 heads; widening int8 takes two instructions per vector, so 16
  // columns x up to 4 heads (G <= 4: each value vector widened once per token).
  constexpr int kCols = Rows::kScaled ? 16 : 32;
  constexpr int DW = DC < kCols ? DC : kCols;
  constexpr int HP = DW == 32 ? 2 : 4;
  constexpr int64_t HS = DC + Rows::kTail;  // a head's row segment
  const int64_t L = len - start, NQ = nh * G, col = h0 * HS;
  const int64_t span = nh * HS * static_cast<int64_t>(sizeof(raw_t));  // bytes of a token read
  for (int64_t r = 0; r < NQ; ++r) {
    s.m[r] = -INFINITY;
    s.l[r] = 0.0f;
  }
  std::fill(s.acc, s.acc + NQ * DC, 0.0f);
  RowCursor<raw_t> kc(kp, table, bs, row_stride, col, start, len);
  RowCursor<raw_t> vc(vp, table, bs, row_stride, col, start, len);
  RowCursor<raw_t> pf(kp, table, bs, row_stride, col, std::min<int64_t>(start + 8, len), len);
  const raw_t* vrows[8];
  const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t t0 = 0; t0 < L; t0 += 8) {
    const int nt = static_cast<int>(std::min<int64_t>(8, L - t0));
    for (int t = 0; t < nt; ++t, kc.next(), vc.next()) {
      const raw_t* row = kc.row;
      vrows[t] = vc.row - col;
      if (pf.pos < pf.len) {  // the key and value lines of the token 8 ahead (and the last one)
        const char* kl = reinterpret_cast<const char*>(pf.row);
        const char* vl = reinterpret_cast<const char*>(vp + (pf.row - kp));
        for (int64_t b = 0; b < span; b += 64) {
          _mm_prefetch(kl + b, _MM_HINT_T0);
          _mm_prefetch(vl + b, _MM_HINT_T0);
        }
        _mm_prefetch(kl + span - 1, _MM_HINT_T0);
        _mm_prefetch(vl + span - 1, _MM_HINT_T0);
        pf.next();
      }
      for (int64_t hh = 0; hh < nh; ++hh) {
        const raw_t* kr = row + hh * HS;
        if constexpr (Rows::kScaled) {
          s.ks[hh * 8 + t] = Rows::scale(kr, DC);
          s.vs[hh * 8 + t] = Rows::scale(vc.row + hh * HS, DC);
        }
        __m256 k[NJ];
        for (int j = 0; j < NJ; ++j) k[j] = Rows::load8(kr + 8 * j);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf + (hh * G + g) * DC;
          __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qg), k[0]);
          for (int j = 1; j < NJ; ++j) a = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * j), k[j], a);
          _mm256_store_ps(s.tile + ((hh * G + g) * 8 + t) * 8, a);
        }
      }
    }
    const __m256 live = _mm256_cmp_ps(iota, _mm256_set1_ps(static_cast<float>(nt)), _CMP_LT_OQ);
    for (int64_t hh = 0; hh < nh; ++hh)
      for (int64_t r = hh * G; r < (hh + 1) * G; ++r) {
        __m256 sc = reduce8(s.tile + r * 64);
        if constexpr (Rows::kScaled) sc = _mm256_mul_ps(sc, _mm256_loadu_ps(s.ks + hh * 8));
        sc = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sc, live);
        const float m_new = std::max(s.m[r], hmax8(sc));
        __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(sc, _mm256_set1_ps(m_new))), live);
        s.corr[r] = exp_nonpos(s.m[r] - m_new);  // ~0 on the first chunk (m = -inf)
        s.l[r] = s.l[r] * s.corr[r] + hsum8(e);
        s.m[r] = m_new;
        if constexpr (Rows::kScaled) e = _mm256_mul_ps(e, _mm256_loadu_ps(s.vs + hh * 8));
        _mm256_storeu_ps(s.p + r * 8, e);
      }
    for (int64_t hh = 0; hh < nh; ++hh) {  // one KV head at a time
      const int64_t c = (h0 + hh) * HS;
      for (int64_t g0 = 0; g0 < G; g0 += HP) {
        const int64_t r0 = hh * G + g0, gn = std::min<int64_t>(HP, G - g0);
        const float *pr = s.p + r0 * 8, *cr = s.corr + r0;
        float* ar = s.acc + r0 * DC;
        for (int64_t c0 = 0; c0 < DC; c0 += DW) {
          // a compile-time head count keeps the accumulators in registers
          if (gn == 1) values_chunk8<Rows, DW, 1>(pr, cr, nt, vrows, c + c0, ar + c0, DC);
          if constexpr (HP >= 2)
            if (gn == 2) values_chunk8<Rows, DW, 2>(pr, cr, nt, vrows, c + c0, ar + c0, DC);
          if constexpr (HP >= 4) {
            if (gn == 3) values_chunk8<Rows, DW, 3>(pr, cr, nt, vrows, c + c0, ar + c0, DC);
            if (gn == 4) values_chunk8<Rows, DW, 4>(pr, cr, nt, vrows, c + c0, ar + c0, DC);
          }
        }
      }
    }
  }
}

template <typename Rows, int DC>
constexpr bool kAvx2Path = Rows::kAvx2 && DC > 0 && DC % 8 == 0 && (DC <= 32 || DC % 32 == 0);
#else
template <typename Rows, int DC>
constexpr bool kAvx2Path = false;
#endif

}  // namespace flotilla
