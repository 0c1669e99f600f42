// Paged decode attention, one query token per sequence, over any cache row format
// (cache_rows.h): the float caches' op (paged_attention.cpp) and the int8 cache's
// (paged_attention_int8.cpp) are this one driver with another Rows.
//
//   q            [n, H, D]                       contiguous, float32 / bfloat16 / float16 (T)
//   k_cache      [num_blocks, block_size, KVH, D + Rows::kTail] contiguous (v_cache alike)
//   block_tables [n, max_blocks] int32           row i: the blocks of sequence i, in order
//   context_lens [n] int32                       tokens of sequence i in the cache (incl. new)
//   out          [n, H, D]                       written in place, dtype T
//
// Grouped-query attention: query heads h*G .. h*G+G-1 share KV head h (G = H / KVH). A sliding
// window w > 0 makes key t visible iff t >= len - w. Scores, softmax and the weighted sum are
// computed in float32; a scaled row format's scale multiplies the row's score (keys) and its
// softmax weight (values), once per row. Paths, by what the build has and the head dim:
//   - AVX-512 (attend_avx512.h: float32 / bfloat16 / int8 rows, head dim % 16 = 0) and AVX2 +
//     FMA (attend_avx2.h: float32 / int8 rows, head dim % 8 = 0): one pass over a sequence's
//     keys and values with an online softmax (flash-decoding);
//   - anything else (other dtypes / head dims, the portable build): scores, softmax and
//     weighted sum in three plain passes the compiler vectorizes for its target.
// Work is split over sequences (all their heads) or, with few sequences, (sequence, KV head)
// pairs, claimed by the threads longest first (balanced by length, robust to preemption).
#pragma once

#include "attend_avx2.h"
#include "attend_avx512.h"
#include "cache_rows.h"
#include "common.h"
#include "row_cursor.h"

namespace flotilla {

// Calls f(t, row) for t = 0 .. len - start - 1 with token (start + t)'s cache row at column
// `col`.
template <typename raw_t, typename F>
inline void walk_rows(const raw_t* base, const int32_t* table, int64_t bs, int64_t row_stride,
                      int64_t col, int64_t start, int64_t len, const F& f) {
  for (RowCursor<raw_t> cur(base, table, bs, row_stride, col, start, len); cur.pos < len;
       cur.next())
    f(cur.pos - start, cur.row);
}

// The three plain passes for one task (one KV head h0 of a sequence, its G query heads in qf,
// pre-scaled): scores, softmax, weighted sum into acc [G][D] (normalized). scores: [G][L]
// scratch, kf: [D].
template <typename Rows>
void attend_three_pass(const float* qf, int64_t G, int64_t D, const typename Rows::raw_t* kp,
                       const typename Rows::raw_t* vp, const int32_t* table, int64_t bs,
                       int64_t row_stride, int64_t h0, int64_t start, int64_t len,
                       float* scores, float* acc, float* kf) {
  using raw_t = typename Rows::raw_t;
  const int64_t L = len - start, col = h0 * (D + Rows::kTail);
  // scores[g][t] = ks_t * (q_g . k_t)
  walk_rows(kp, table, bs, row_stride, col, start, len, [&](int64_t t, const raw_t* kr) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) kf[d] = Rows::load(kr[d]);
    const float ks = Rows::scale(kr, D);  // (1 for the float formats: the product folds away)
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
      scores[g * L + t] = s * ks;
    }
  });
  // softmax per query head
  for (int64_t g = 0; g < G; ++g) {
    float* sr = scores + g * L;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < L; ++t) m = sr[t] > m ? sr[t] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < L; ++t) {
      const float e = exp_nonpos(sr[t] - m);
      sr[t] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) sr[t] *= inv;
  }
  // acc[g] = sum_t (p[g][t] vs_t) v_t
  std::fill(acc, acc + G * D, 0.0f);
  walk_rows(vp, table, bs, row_stride, col, start, len, [&](int64_t t, const raw_t* vr) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) kf[d] = Rows::load(vr[d]);
    const float vs = Rows::scale(vr, D);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * L + t] * vs;
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p * kf[d];
    }
  });
}

// dst[r] = acc[r] / l[r] for a one-pass task's nq query heads (rounded to T).
template <typename T, int DC>
inline void finish_task(typename Raw<T>::type* dst, const float* acc, const float* l,
                        int64_t nq, int64_t D) {
  for (int64_t r = 0; r < nq; ++r) {
    const float inv = 1.0f / l[r];
#if FLOTILLA_AVX512
    if constexpr (std::is_same<T, c10::BFloat16>::value && DC > 0 && DC % 16 == 0) {
      const __m512 vinv = _mm512_set1_ps(inv);
      for (int64_t d = 0; d < DC; d += 16)
        bf16x16_store_fast(dst + r * DC + d,
                           _mm512_mul_ps(_mm512_loadu_ps(acc + r * DC + d), vinv));
      continue;
    }
#endif
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = Raw<T>::store(acc[r * D + d] * inv);
  }
}

// DC: the head dim as a compile-time constant (0 = use D at run time), so that the inner loops
// over D have fixed trip counts and compile to a few unrolled vector instructions.
template <typename T, typename Rows, int DC>
void decode_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, double scale_d, int64_t window) {
  using R = Raw<T>;
  using raw_t = typename R::type;      // q and out
  using row_t = typename Rows::raw_t;  // the caches
  const int64_t n = q.size(0), H = q.size(1);
  const int64_t D = DC ? DC : q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH, max_blocks = block_tables.size(1);
  const int64_t row_stride = KVH * (D + Rows::kTail);  // between consecutive tokens of a block
  const float scale = static_cast<float>(scale_d);
  const raw_t* qp = reinterpret_cast<const raw_t*>(q.data_ptr());
  const row_t* kp = reinterpret_cast<const row_t*>(k_cache.data_ptr());
  const row_t* vp = reinterpret_cast<const row_t*>(v_cache.data_ptr());
  raw_t* op = reinterpret_cast<raw_t*>(out.data_ptr());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t i = 0; i < n; ++i) max_len = std::max<int64_t>(max_len, lens[i]);

  // A task: one sequence's KV heads [h0, h0 + nh). All heads of a sequence together when there
  // are enough sequences to keep every thread busy (rows read front to back); else one head.
  constexpr bool avx512 = kAvx512Path<Rows, DC>;
  constexpr bool avx2 = !avx512 && kAvx2Path<Rows, DC>;
  const int64_t nh = ((avx512 || avx2) && n >= 2 * at::get_num_threads()) ? KVH : 1;
  const int64_t NQ = nh * G;  // query heads per task
  // Tasks by cost, longest first, each to the next free thread: a plain split of the task
  // range would hand one thread all the long sequences (the caller sorts decodes by length),
  // ~1.4x the balanced time for lengths spread like 32 .. 640.
  std::vector<int64_t> costs(n * (KVH / nh));
  for (int64_t task = 0; task < static_cast<int64_t>(costs.size()); ++task) {
    const int64_t len = lens[task / (KVH / nh)];
    costs[task] = (window > 0 ? std::min<int64_t>(len, window) : len) + 16;
  }
  // Claimed one at a time (common.h: WorkQueue), so a thread the OS preempts holds back one
  // task, not its whole share.
  const auto order = order_by_cost(costs);
  WorkQueue queue(static_cast<int64_t>(order.size()));
  parallel_claims(queue, static_cast<int64_t>(order.size()), [&](WorkQueue& wq) {
    // the next task, or -1 when all are claimed
    const auto claim = [&]() -> int64_t {
      int64_t b, e;
      return wq.next(b, e) ? order[b] : -1;
    };
    std::vector<float> qf(NQ * D);
    // A task's sequence i, first KV head h0, length and window start; its query heads
    // h0*G .. (h0+nh)*G - 1 (contiguous in q and out) scaled into qf as float32.
    struct TaskView {
      int64_t i, h0, len, start;
    };
    const auto begin_task = [&](int64_t task) {
      TaskView tv;
      tv.i = task / (KVH / nh);
      tv.h0 = (task % (KVH / nh)) * nh;
      tv.len = lens[tv.i];
      tv.start = window > 0 ? std::max<int64_t>(0, tv.len - window) : 0;
      const raw_t* qsrc = qp + (tv.i * H + tv.h0 * G) * D;
#pragma omp simd
      for (int64_t e = 0; e < NQ * D; ++e) qf[e] = R::load(qsrc[e]) * scale;
      return tv;
    };
    if constexpr (avx512) {
#if FLOTILLA_AVX512
      AttendScratch sc(NQ, D);
      for (int64_t task = claim(); task >= 0; task = claim()) {
        const TaskView tv = begin_task(task);
        attend_avx512<Rows, DC>(qf.data(), nh, G, kp, vp, tables + tv.i * max_blocks, bs,
                                row_stride, tv.h0, tv.start, tv.len, sc);
        finish_task<T, DC>(op + (tv.i * H + tv.h0 * G) * D, sc.acc, sc.l, NQ, D);
      }
#endif
    } else if constexpr (avx2) {
#if FLOTILLA_AVX2
      AttendScratch8 sc(NQ, D);
      for (int64_t task = claim(); task >= 0; task = claim()) {
        const TaskView tv = begin_task(task);
        attend_avx2<Rows, DC>(qf.data(), nh, G, kp, vp, tables + tv.i * max_blocks, bs,
                              row_stride, tv.h0, tv.start, tv.len, sc);
        finish_task<T, DC>(op + (tv.i * H + tv.h0 * G) * D, sc.acc, sc.l, NQ, D);
      }
#endif
    } else {  // nh = 1
      std::vector<float> scores(G * std::max<int64_t>(max_len, 1)), acc(G * D), kf(D);
      for (int64_t task = claim(); task >= 0; task = claim()) {
        const TaskView tv = begin_task(task);
        attend_three_pass<Rows>(qf.data(), G, D, kp, vp, tables + tv.i * max_blocks, bs,
                                row_stride, tv.h0, tv.start, tv.len, scores.data(),
                                acc.data(), kf.data());
        raw_t* dst = op + (tv.i * H + tv.h0 * G) * D;
#pragma omp simd
        for (int64_t e = 0; e < G * D; ++e) dst[e] = R::store(acc[e]);
      }
    }
  });
}

// decode_attention with the head dim as a compile-time constant where it is a common one.
template <typename T, typename Rows>
void decode_attention_any(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables,
                          const at::Tensor& context_lens, double scale, int64_t window) {
  switch (q.size(2)) {
#define FLOTILLA_HEAD_DIM(DIM)                                                                 \
  case DIM:                                                                                    \
    return decode_attention<T, Rows, DIM>(out, q, k_cache, v_cache, block_tables, context_lens, \
                                          scale, window);
    FLOTILLA_HEAD_DIM(16)
    FLOTILLA_HEAD_DIM(32)
    FLOTILLA_HEAD_DIM(64)
    FLOTILLA_HEAD_DIM(80)
    FLOTILLA_HEAD_DIM(96)
    FLOTILLA_HEAD_DIM(128)
    FLOTILLA_HEAD_DIM(256)
#undef FLOTILLA_HEAD_DIM
    default:
      return decode_attention<T, Rows, 0>(out, q, k_cache, v_cache, block_tables, context_lens,
                                          scale, window);
  }
}

}  // namespace flotilla
