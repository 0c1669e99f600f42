// paged_decode_attention: one query token per sequence, keys/values read in place from the
// block-paged KV cache (no gather into a padded copy).
//
// Layout (matches workers/attention.py):
//   q            [n, H, D]                       contiguous, float32 / bfloat16 / float16
//   k_cache      [num_blocks, block_size, KVH, D] contiguous, same dtype as q (v_cache alike)
//   block_tables [n, max_blocks] int32           row i: the blocks of sequence i, in order
//   context_lens [n] int32                       tokens of sequence i in the cache (incl. new)
//   out          [n, H, D]                       written in place
// Grouped-query attention: query heads h*G .. h*G+G-1 share KV head h (G = H / KVH). A sliding
// window w > 0 makes key t visible iff t >= len - w. Scores, softmax and the weighted sum are
// computed in float32. AVX-512 (float32 / bfloat16, head dim a multiple of 16): one pass over
// a sequence's keys and values, 16 positions at a time, with an online softmax
// (flash-decoding, attend_avx512); AVX2 (float32; attend_avx2.h): the same, 8 at a time;
// other dtypes / head dims: scores, softmax and weighted sum in three plain passes. Work is split over sequences (all their heads) or, with few
// sequences, (sequence, KV head) pairs, balanced by length over at::parallel_for's threads.
// Weighted sums run one KV head at a time with a compile-time number of query heads per pass,
// so their accumulators stay in registers (a runtime count made the compiler keep them on the
// stack: a store per FMA, the kernel's hot spot).
#include "attend_avx2.h"
#include "common.h"
#include "row_cursor.h"

namespace flotilla {

#if FLOTILLA_AVX512
// ---- AVX-512 decode attention (float32 / bfloat16, head dim a multiple of 16) -----------------

template <typename T>
inline __m512 load16(const typename Raw<T>::type* p);
template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load16<c10::BFloat16>(const uint16_t* p) {
  return bf16x16_load(p);
}

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
// (the elements of the heads this task reads) so the next block's lines are in flight.
constexpr int64_t kAhead = 16;
template <typename raw_t>
inline void prefetch_next(RowCursor<raw_t>& pf, int64_t count) {
  if (pf.pos >= pf.len) return;
  const char* p = reinterpret_cast<const char*>(pf.row);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(raw_t)); b += 64)
    _mm_prefetch(p + b, _MM_HINT_T1);
  pf.next();
}

// acc[g] (float [GN][DC]) = corr[g] * acc[g] + sum_t p[g][t] v_t over one chunk of nt <= 16
// tokens, for GN query heads of one KV head (p: [GN][16]; vrows[t] + col: token t's slice).
// GN and DC are compile-time constants so that the GN * DC / 16 accumulators live in
// registers for the chunk.
template <typename T, int DC, int GN>
inline void values_chunk(const float* p, const float* corr, int nt,
                         const typename Raw<T>::type* const* vrows, int64_t col, float* acc) {
  constexpr int NJ = DC / 16;
  __m512 a[GN][NJ];
  for (int g = 0; g < GN; ++g) {
    const __m512 c = _mm512_set1_ps(corr[g]);
    for (int j = 0; j < NJ; ++j) a[g][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * DC + 16 * j), c);
  }
  for (int t = 0; t < nt; ++t) {
    const auto* vr = vrows[t] + col;
    __m512 v[NJ];
    for (int j = 0; j < NJ; ++j) v[j] = load16<T>(vr + 16 * j);
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
  float *tile, *p, *corr, *m, *l, *acc;
  AttendScratch(int64_t nq, int64_t d) : buf(nq * (256 + 16 + 3 + d) + 16) {
    tile = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    p = tile + nq * 256;  // [nq][16]
    corr = p + nq * 16;
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
template <typename T, int DC>
void attend_avx512(const float* qf, int64_t nh, int64_t G, const typename Raw<T>::type* kp,
                   const typename Raw<T>::type* vp, const int32_t* table, int64_t bs,
                   int64_t row_stride, int64_t h0, int64_t start, int64_t len,
                   AttendScratch& s) {
  using raw_t = typename Raw<T>::type;
  constexpr int NJ = DC / 16;
  // HP query heads per value pass: HP * NJ accumulators + NJ value registers fit the 32 zmm
  constexpr int HP = NJ >= 16 ? 1 : (NJ >= 8 ? 2 : 4);
  const int64_t L = len - start, NQ = nh * G, col = h0 * DC;
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
      prefetch_next(kpf, nh * DC);
      prefetch_next(vpf, nh * DC);
      for (int64_t hh = 0; hh < nh; ++hh) {
        __m512 k[NJ];
        for (int j = 0; j < NJ; ++j) k[j] = load16<T>(row + hh * DC + 16 * j);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf + (hh * G + g) * DC;
          __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
          for (int j = 1; j < NJ; ++j) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * j), k[j], a);
          _mm512_store_ps(s.tile + ((hh * G + g) * 16 + t) * 16, a);
        }
      }
    }
    const __mmask16 live = static_cast<__mmask16>((1u << nt) - 1u);
    for (int64_t r = 0; r < NQ; ++r) {
      const __m512 sc = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY),
                                             reduce16(s.tile + r * 256));
      const float m_new = std::max(s.m[r], _mm512_reduce_max_ps(sc));
      const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
      _mm512_storeu_ps(s.p + r * 16, e);
      s.corr[r] = exp_nonpos(s.m[r] - m_new);  // 0 on the first chunk (m = -inf)
      s.l[r] = s.l[r] * s.corr[r] + _mm512_reduce_add_ps(e);
      s.m[r] = m_new;
    }
    for (int64_t hh = 0; hh < nh; ++hh) {  // one KV head at a time: registers hold its sums
      for (int64_t g0 = 0; g0 < G; g0 += HP) {
        const int64_t r0 = hh * G + g0, gn = std::min<int64_t>(HP, G - g0);
        const float *pr = s.p + r0 * 16, *cr = s.corr + r0;
        float* ar = s.acc + r0 * DC;
        const int64_t c = (h0 + hh) * DC;
        // a compile-time head count keeps the accumulators in registers
        if (gn == 1) {
          values_chunk<T, DC, 1>(pr, cr, nt, vrows, c, ar);
        } else if constexpr (HP >= 2) {
          if (gn == 2) values_chunk<T, DC, 2>(pr, cr, nt, vrows, c, ar);
          if constexpr (HP >= 4) {
            if (gn == 3) values_chunk<T, DC, 3>(pr, cr, nt, vrows, c, ar);
            if (gn == 4) values_chunk<T, DC, 4>(pr, cr, nt, vrows, c, ar);
          }
        }
      }
    }
  }
}

template <typename T, int DC>
constexpr bool kAvx512Path =
    DC > 0 && DC % 16 == 0 && (std::is_same<T, float>::value ||
                               std::is_same<T, c10::BFloat16>::value);
#else
template <typename T, int DC>
constexpr bool kAvx512Path = false;
#endif

// Calls f(t, row) for t = 0 .. len - start - 1 with token (start + t)'s cache row at column
// `col`.
template <typename raw_t, typename F>
inline void walk_rows(const raw_t* base, const int32_t* table, int64_t bs, int64_t row_stride,
                      int64_t col, int64_t start, int64_t len, const F& f) {
  for (RowCursor<raw_t> cur(base, table, bs, row_stride, col, start, len); cur.pos < len;
       cur.next())
    f(cur.pos - start, cur.row);
}

// DC: the head dim as a compile-time constant (0 = use D at run time), so that the inner loops
// over D have fixed trip counts and compile to a few unrolled vector instructions.
template <typename T, int DC>
void decode_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, double scale_d, int64_t window) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  const int64_t n = q.size(0), H = q.size(1);
  const int64_t D = DC ? DC : q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH, max_blocks = block_tables.size(1);
  const int64_t row_stride = KVH * D;  // between consecutive tokens of a block
  const float scale = static_cast<float>(scale_d);
  const raw_t* qp = reinterpret_cast<const raw_t*>(q.data_ptr());
  const raw_t* kp = reinterpret_cast<const raw_t*>(k_cache.data_ptr());
  const raw_t* vp = reinterpret_cast<const raw_t*>(v_cache.data_ptr());
  raw_t* op = reinterpret_cast<raw_t*>(out.data_ptr());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t i = 0; i < n; ++i) max_len = std::max<int64_t>(max_len, lens[i]);

  // A task: one sequence's KV heads [h0, h0 + nh). All heads of a sequence together when there
  // are enough sequences to keep every thread busy (rows read front to back); else one head.
  const bool vec = kAvx512Path<T, DC> || kAvx2Path<T, DC>;
  const int64_t nh = (vec && n >= 2 * at::get_num_threads()) ? KVH : 1;
  const int64_t NQ = nh * G;  // query heads per task
  // Tasks onto threads by cost, longest first onto the least-loaded thread: a plain split of
  // the task range would hand one thread all the long sequences (the caller sorts decodes by
  // length), ~1.4x the balanced time for lengths spread like 32 .. 640.
  std::vector<int64_t> costs(n * (KVH / nh));
  for (int64_t task = 0; task < static_cast<int64_t>(costs.size()); ++task) {
    const int64_t len = lens[task / (KVH / nh)];
    costs[task] = (window > 0 ? std::min<int64_t>(len, window) : len) + 16;
  }
  const auto bins = balance_by_cost(costs);
  const int64_t nt = static_cast<int64_t>(bins.size());
  at::parallel_for(0, nt, 1, [&](int64_t bin_begin, int64_t bin_end) {
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
    if constexpr (kAvx512Path<T, DC>) {
#if FLOTILLA_AVX512
      AttendScratch sc(NQ, D);
      for (int64_t bin = bin_begin; bin < bin_end; ++bin)
        for (const int64_t task : bins[bin]) {
          const TaskView tv = begin_task(task);
          attend_avx512<T, DC>(qf.data(), nh, G, kp, vp, tables + tv.i * max_blocks, bs,
                               row_stride, tv.h0, tv.start, tv.len, sc);
          raw_t* dst = op + (tv.i * H + tv.h0 * G) * D;
          for (int64_t r = 0; r < NQ; ++r) {
            const float inv = 1.0f / sc.l[r];
            if constexpr (std::is_same<T, c10::BFloat16>::value) {
              const __m512 vinv = _mm512_set1_ps(inv);
              for (int64_t d = 0; d < D; d += 16)
                bf16x16_store_fast(reinterpret_cast<uint16_t*>(dst) + r * D + d,
                                   _mm512_mul_ps(_mm512_loadu_ps(sc.acc + r * D + d), vinv));
            } else {
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) dst[r * D + d] = R::store(sc.acc[r * D + d] * inv);
            }
          }
        }
#endif
      return;
    } else if constexpr (kAvx2Path<T, DC>) {
#if FLOTILLA_AVX2
      AttendScratch8 sc(NQ, D);
      for (int64_t bin = bin_begin; bin < bin_end; ++bin)
        for (const int64_t task : bins[bin]) {
          const TaskView tv = begin_task(task);
          attend_avx2<DC>(qf.data(), nh, G, kp, vp, tables + tv.i * max_blocks, bs, row_stride,
                          tv.h0, tv.start, tv.len, sc);
          float* dst = op + (tv.i * H + tv.h0 * G) * D;
          for (int64_t r = 0; r < NQ; ++r) {
            const float inv = 1.0f / sc.l[r];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[r * D + d] = sc.acc[r * D + d] * inv;
          }
        }
#endif
      return;
    }
    std::vector<float> scores(NQ * std::max<int64_t>(max_len, 1)), acc(NQ * D), row(D);
    float* kf = row.data();
    for (int64_t bin = bin_begin; bin < bin_end; ++bin)
    for (const int64_t task : bins[bin]) {
      const TaskView tv = begin_task(task);
      const int64_t i = tv.i, h0 = tv.h0, len = tv.len, start = tv.start;
      const int64_t L = len - start;
      const int32_t* table = tables + i * max_blocks;
      // scores[g][t] = q_g . k_t (nh = 1)
      walk_rows(kp, table, bs, row_stride, h0 * D, start, len, [&](int64_t t, const raw_t* kr) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kf[d] = R::load(kr[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * L + t] = s;
        }
      });
      // softmax per query head
      for (int64_t r = 0; r < NQ; ++r) {
        float* sr = scores.data() + r * L;
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
      // acc[g] = sum_t p[g][t] v_t (nh = 1)
      std::fill(acc.begin(), acc.end(), 0.0f);
      walk_rows(vp, table, bs, row_stride, h0 * D, start, len, [&](int64_t t, const raw_t* vr) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kf[d] = R::load(vr[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * kf[d];
        }
      });
      raw_t* dst = op + (i * H + h0 * G) * D;
#pragma omp simd
      for (int64_t e = 0; e < NQ * D; ++e) dst[e] = R::store(acc[e]);
    }
  });
}

template <typename T>
void decode_attention_any(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables,
                          const at::Tensor& context_lens, double scale, int64_t window) {
  switch (q.size(2)) {
#define FLOTILLA_HEAD_DIM(DIM)                                                               \
  case DIM:                                                                                  \
    return decode_attention<T, DIM>(out, q, k_cache, v_cache, block_tables, context_lens, \
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
      return decode_attention<T, 0>(out, q, k_cache, v_cache, block_tables, context_lens, scale,
                                    window);
  }
}

void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: q [n, H, D], caches [blocks, block_size, KVH, D]");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && block_tables.is_contiguous() &&
                  context_lens.is_contiguous(),
              "paged_decode_attention: inputs must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() &&
                  k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              "paged_decode_attention: out/q/k_cache/v_cache must share shape and dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_decode_attention: block_tables and context_lens must be int32");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "paged_decode_attention: head_dim mismatch or H not a multiple of KVH");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
              "paged_decode_attention: one block table and length per query row");
  switch (q.scalar_type()) {
    case at::kFloat:
      decode_attention_any<float>(out, q, k_cache, v_cache, block_tables, context_lens, scale, window);
      break;
    case at::kBFloat16:
      decode_attention_any<c10::BFloat16>(out, q, k_cache, v_cache, block_tables, context_lens, scale,
                                      window);
      break;
    case at::kHalf:
      decode_attention_any<c10::Half>(out, q, k_cache, v_cache, block_tables, context_lens, scale,
                                  window);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace flotilla

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("paged_decode_attention", &flotilla::paged_decode_attention);
}
