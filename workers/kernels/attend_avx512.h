// AVX-512 flash-decoding for paged decode attention (decode_attention.h): float32, bfloat16
// and int8 caches, head dim a multiple of 16. One pass over a sequence's keys and values, 16
// tokens at a time, with an online softmax; attend_avx2.h is the same loop 8 tokens at a time.
// Rows (cache_rows.h) says how a row becomes float32 (int8 rows: widened in registers, their
// scales applied once per token, to the 16 scores and to the 16 weights).
// (Compiled on AVX-512 targets; on the AVX2 machines of this project tested only by compiling.)
#pragma once

#include "cache_rows.h"
#include "common.h"
#include "row_cursor.h"

namespace flotilla {

#if FLOTILLA_AVX512
// r[i] = sum of the 16 lanes of v[i], for 16 vectors at once (a transpose-add tree: 45
// shuffles/adds instead of 16 full horizontal reductions).
inline __m512 reduce16(const float* rows /* [16][16] */) {
  __m512 w[8], x[4];
  for (int k = 0; k < 8; ++k) {
    const __m512 a = _mm512_load_ps(rows + 32 * k), b = _mm512_load_ps(rows + 32 * k + 16);
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 c = w[2 * k], d = w[2 * k + 1];
    x[k] = _mm512_add_ps(_mm512_shuffle_ps(c, d, 0x44), _mm512_shuffle_ps(c, d, 0xEE));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x44),
                                   _mm512_shuffle_f32x4(x[0], x[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x44),
                                   _mm512_shuffle_f32x4(x[2], x[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88),
                       _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// Rows are read in block-table order, which jumps between blocks: prefetch kAhead tokens ahead
// (the `bytes` of the heads this task reads, every line they touch) so the next block's lines
// are in flight.
constexpr int64_t kAhead = 16;
template <typename raw_t>
inline void prefetch_next(RowCursor<raw_t>& pf, int64_t bytes) {
  if (pf.pos >= pf.len) return;
  const char* p = reinterpret_cast<const char*>(pf.row);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
  _mm_prefetch(p + bytes - 1, _MM_HINT_T1);
  pf.next();
}

// acc[g] (float [GN][DC]) = corr[g] * acc[g] + sum_t p[g][t] v_t over one chunk of nt <= 16
// tokens, for GN query heads of one KV head (p: [GN][16], already times the value rows'
// scales; vrows[t] + col: token t's slice). GN and DC are compile-time constants so that the
// GN * DC / 16 accumulators live in registers for the chunk.
template <typename Rows, int DC, int GN>
inline void values_chunk(const float* p, const float* corr, int nt,
                         const typename Rows::raw_t* const* vrows, int64_t col, float* acc) {
  constexpr int NJ = DC / 16;
  __m512 a[GN][NJ];
  for (int g = 0; g < GN; ++g) {
    const __m512 c = _mm512_set1_ps(corr[g]);
    for (int j = 0; j < NJ; ++j) a[g][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * DC + 16 * j), c);
  }
  for (int t = 0; t < nt; ++t) {
    const auto* vr = vrows[t] + col;
    __m512 v[NJ];
    for (int j = 0; j < NJ; ++j) v[j] = Rows::load16(vr + 16 * j);
    for (int g = 0; g < GN; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * 16 + t]);
      for (int j = 0; j < NJ; ++j) a[g][j] = _mm512_fmadd_ps(w, v[j], a[g][j]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(acc + g * DC + 16 * j, a[g][j]);
}

// Scratch of one thread for attend_avx512, for up to nq query heads.
struct AttendScratch {
  std::vector<float> buf;
  float *tile, *p, *ks, *vs, *corr, *m, *l, *acc;
  AttendScratch(int64_t nq, int64_t d) : buf(nq * (256 + 16 + 32 + 3 + d) + 16) {
    tile = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    p = tile + nq * 256;  // [nq][16]
    ks = p + nq * 16;     // [KV heads][16]: the chunk's key row scales (scaled rows only)
    vs = ks + nq * 16;    // ... and value row scales
    corr = vs + nq * 16;
    m = corr + nq;
    l = m + nq;
    acc = l + nq;  // [nq][d]
  }
};

// One task: KV heads h0 .. h0+nh-1 of one sequence and their nh * G query heads (qf:
// [nh*G][DC] float, pre-scaled), in a single pass over the keys and values 16 tokens at a
// time (flash-decoding): the chunk's scores for every query head (all nh heads of a token
// together, so each key row is read front to back), an online-softmax update (running max
// m and sum l; the accumulators are rescaled by exp(m_old - m_new)), then the chunk's values.
// A block's key rows and value rows are read once each, close together in time. On return
// s.acc holds sum_t exp(s_t - m) v_t and s.l the sum of the weights.
template <typename Rows, int DC>
void attend_avx512(const float* qf, int64_t nh, int64_t G, const typename Rows::raw_t* kp,
                   const typename Rows::raw_t* vp, const int32_t* table, int64_t bs,
                   int64_t row_stride, int64_t h0, int64_t start, int64_t len,
                   AttendScratch& s) {
  using raw_t = typename Rows::raw_t;
  constexpr int NJ = DC / 16;
  // HP query heads per value pass: HP * NJ accumulators + NJ value registers fit the 32 zmm
  constexpr int HP = NJ >= 16 ? 1 : (NJ >= 8 ? 2 : 4);
  constexpr int64_t HS = DC + Rows::kTail;  // a head's row segment
  const int64_t L = len - start, NQ = nh * G, col = h0 * HS;
  const int64_t span = nh * HS * static_cast<int64_t>(sizeof(raw_t));
  for (int64_t r = 0; r < NQ; ++r) {
    s.m[r] = -INFINITY;
    s.l[r] = 0.0f;
  }
  std::fill(s.acc, s.acc + NQ * DC, 0.0f);
  RowCursor<raw_t> kc(kp, table, bs, row_stride, col, start, len);
  RowCursor<raw_t> vc(vp, table, bs, row_stride, col, start, len);
  RowCursor<raw_t> kpf(kp, table, bs, row_stride, col, std::min(start + kAhead, len), len);
  RowCursor<raw_t> vpf(vp, table, bs, row_stride, col, std::min(start + kAhead, len), len);
  const raw_t* vrows[16];
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int nt = static_cast<int>(std::min<int64_t>(16, L - t0));
    for (int t = 0; t < nt; ++t, kc.next(), vc.next()) {
      const raw_t* row = kc.row;
      vrows[t] = vc.row - col;
      prefetch_next(kpf, span);
      prefetch_next(vpf, span);
      for (int64_t hh = 0; hh < nh; ++hh) {
        const raw_t* kr = row + hh * HS;
        if constexpr (Rows::kScaled) {
          s.ks[hh * 16 + t] = Rows::scale(kr, DC);
          s.vs[hh * 16 + t] = Rows::scale(vc.row + hh * HS, DC);
        }
        __m512 k[NJ];
        for (int j = 0; j < NJ; ++j) k[j] = Rows::load16(kr + 16 * j);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf + (hh * G + g) * DC;
          __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
          for (int j = 1; j < NJ; ++j) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * j), k[j], a);
          _mm512_store_ps(s.tile + ((hh * G + g) * 16 + t) * 16, a);
        }
      }
    }
    const __mmask16 live = static_cast<__mmask16>((1u << nt) - 1u);
    for (int64_t hh = 0; hh < nh; ++hh)
      for (int64_t r = hh * G; r < (hh + 1) * G; ++r) {
        __m512 sc = reduce16(s.tile + r * 256);
        if constexpr (Rows::kScaled) sc = _mm512_mul_ps(sc, _mm512_loadu_ps(s.ks + hh * 16));
        sc = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), sc);
        const float m_new = std::max(s.m[r], _mm512_reduce_max_ps(sc));
        __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
        s.corr[r] = exp_nonpos(s.m[r] - m_new);  // 0 on the first chunk (m = -inf)
        s.l[r] = s.l[r] * s.corr[r] + _mm512_reduce_add_ps(e);
        s.m[r] = m_new;
        if constexpr (Rows::kScaled) e = _mm512_mul_ps(e, _mm512_loadu_ps(s.vs + hh * 16));
        _mm512_storeu_ps(s.p + r * 16, e);
      }
    for (int64_t hh = 0; hh < nh; ++hh) {  // one KV head at a time: registers hold its sums
      for (int64_t g0 = 0; g0 < G; g0 += HP) {
        const int64_t r0 = hh * G + g0, gn = std::min<int64_t>(HP, G - g0);
        const float *pr = s.p + r0 * 16, *cr = s.corr + r0;
        float* ar = s.acc + r0 * DC;
        const int64_t c = (h0 + hh) * HS;
        // a compile-time head count keeps the accumulators in registers
        if (gn == 1) {
          values_chunk<Rows, DC, 1>(pr, cr, nt, vrows, c, ar);
        } else if constexpr (HP >= 2) {
          if (gn == 2) values_chunk<Rows, DC, 2>(pr, cr, nt, vrows, c, ar);
          if constexpr (HP >= 4) {
            if (gn == 3) values_chunk<Rows, DC, 3>(pr, cr, nt, vrows, c, ar);
            if (gn == 4) values_chunk<Rows, DC, 4>(pr, cr, nt, vrows, c, ar);
          }
        }
      }
    }
  }
}

template <typename Rows, int DC>
constexpr bool kAvx512Path = Rows::kAvx512 && DC > 0 && DC % 16 == 0;
#else
template <typename Rows, int DC>
constexpr bool kAvx512Path = false;
#endif

}  // namespace flotilla
