// Native CPU kernels of the model's hot path, registered as torch ops `flotilla::*`.
//
// Elementwise kernels (rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul) reproduce
// torch's own rounding step by step: every intermediate that the eager torch code stores in the
// model dtype (bf16/fp16) is rounded to it here too, so outputs match the eager path exactly up
// to float32 summation order. Built with -ffp-contract=off for the same reason.
//
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
// accumulated in float32; work is split over (sequence, KV head) pairs with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
struct Raw {
  using type = T;
  static inline float load(T x) { return static_cast<float>(x); }
  static inline T store(float x) { return static_cast<T>(x); }
};

template <>
struct Raw<c10::BFloat16> {
  using type = uint16_t;  // bit pattern: widening is a shift, so the loops vectorize
  static inline float load(uint16_t x) {
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline uint16_t store(float x) {  // round to nearest even, like torch
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

// exp(x) for x <= 0 (scores minus their max): 2^(x log2 e) split into 2^round and 2^frac,
// frac in [-0.5, 0.5] by a degree-6 Taylor polynomial (relative error ~1e-7). Written without
// calls so that the compiler vectorizes the softmax loop.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.4426950408889634f;
  // round to nearest by the 1.5 * 2^23 trick: no libm call, so the loop vectorizes
  const float r = (t + 12582912.0f) - 12582912.0f;
  const float f = t - r;
  float p = 1.5403530393381608e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(r) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return p * s;
}

#if defined(__AVX512F__)
// ---- AVX-512 decode attention (float32 / bfloat16, head dim a multiple of 16) -----------------

template <typename T>
inline __m512 load16(const typename Raw<T>::type* p);
template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load16<c10::BFloat16>(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
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
constexpr int64_t kAhead = 8;
template <typename raw_t>
inline void prefetch_row(const raw_t* base, const int32_t* table, int64_t bs, int64_t row_stride,
                         int64_t col, int64_t pos, int64_t count) {
  const char* p = reinterpret_cast<const char*>(
      base + (static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * row_stride + col);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(raw_t)); b += 64)
    _mm_prefetch(p + b, _MM_HINT_T0);
}

// One task covers KV heads h0 .. h0+nh-1 of one sequence and their nh * G query heads (qf:
// [nh*G][DC] float, pre-scaled). Walking tokens in order and all nh heads of a token together
// reads each cache row front to back. scores: [nh*G][L] for the L keys from `start`.
template <typename T, int DC>
void scores_avx512(const float* qf, int64_t nh, int64_t G, const typename Raw<T>::type* kp,
                   const int32_t* table, int64_t bs, int64_t row_stride, int64_t h0,
                   int64_t start, int64_t len, float* scores, float* tile /* [nh*G][16][16] */) {
  constexpr int NJ = DC / 16;
  const int64_t L = len - start, NQ = nh * G;
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int nt = static_cast<int>(std::min<int64_t>(16, L - t0));
    for (int t = 0; t < nt; ++t) {
      const int64_t pos = start + t0 + t;
      const auto* row = kp + (static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * row_stride +
                        h0 * DC;
      if (pos + kAhead < len) prefetch_row(kp, table, bs, row_stride, h0 * DC, pos + kAhead, nh * DC);
      for (int64_t hh = 0; hh < nh; ++hh) {
        __m512 k[NJ];
        for (int j = 0; j < NJ; ++j) k[j] = load16<T>(row + hh * DC + 16 * j);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf + (hh * G + g) * DC;
          __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
          for (int j = 1; j < NJ; ++j) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * j), k[j], a);
          _mm512_store_ps(tile + ((hh * G + g) * 16 + t) * 16, a);
        }
      }
    }
    const __mmask16 m = static_cast<__mmask16>((1u << nt) - 1u);
    for (int64_t r = 0; r < NQ; ++r)
      _mm512_mask_storeu_ps(scores + r * L + t0, m, reduce16(tile + r * 256));
  }
}

// acc[r] (float [nh*G][DC]) = sum_t p[r][t] v_t(head of r). One head (nh == 1): the
// accumulators stay in registers, 4 query heads per pass; several: accumulated in acc (L1).
template <typename T, int DC>
void values_avx512(const float* p, int64_t nh, int64_t G, const typename Raw<T>::type* vp,
                   const int32_t* table, int64_t bs, int64_t row_stride, int64_t h0,
                   int64_t start, int64_t len, float* acc) {
  constexpr int NJ = DC / 16;
  const int64_t L = len - start;
  const auto row_at = [&](int64_t t) {
    const int64_t pos = start + t;
    return vp + (static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * row_stride + h0 * DC;
  };
  if (nh > 1) {
    std::fill(acc, acc + nh * G * DC, 0.0f);
    for (int64_t t = 0; t < L; ++t) {
      const auto* row = row_at(t);
      if (t + kAhead < L) prefetch_row(vp, table, bs, row_stride, h0 * DC, start + t + kAhead, nh * DC);
      for (int64_t hh = 0; hh < nh; ++hh) {
        __m512 v[NJ];
        for (int j = 0; j < NJ; ++j) v[j] = load16<T>(row + hh * DC + 16 * j);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = hh * G + g;
          const __m512 w = _mm512_set1_ps(p[r * L + t]);
          float* ar = acc + r * DC;
          for (int j = 0; j < NJ; ++j)
            _mm512_storeu_ps(ar + 16 * j, _mm512_fmadd_ps(w, v[j], _mm512_loadu_ps(ar + 16 * j)));
        }
      }
    }
    return;
  }
  for (int64_t g0 = 0; g0 < G; g0 += 4) {  // 4 heads at a time: 4 * NJ accumulators
    const int64_t gn = std::min<int64_t>(4, G - g0);
    __m512 a[4][NJ];
    for (int g = 0; g < 4; ++g)
      for (int j = 0; j < NJ; ++j) a[g][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      const auto* vr = row_at(t);
      if (t + kAhead < L) prefetch_row(vp, table, bs, row_stride, h0 * DC, start + t + kAhead, DC);
      __m512 v[NJ];
      for (int j = 0; j < NJ; ++j) v[j] = load16<T>(vr + 16 * j);
      for (int g = 0; g < 4; ++g) {
        if (g >= gn) break;
        const __m512 w = _mm512_set1_ps(p[(g0 + g) * L + t]);
        for (int j = 0; j < NJ; ++j) a[g][j] = _mm512_fmadd_ps(w, v[j], a[g][j]);
      }
    }
    for (int g = 0; g < gn; ++g)
      for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(acc + (g0 + g) * DC + 16 * j, a[g][j]);
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
// `col`, walking the block table one block at a time (rows within a block are contiguous).
template <typename raw_t, typename F>
inline void walk_rows(const raw_t* base, const int32_t* table, int64_t bs, int64_t row_stride,
                      int64_t col, int64_t start, int64_t len, const F& f) {
  for (int64_t pos = start; pos < len;) {
    const int64_t off0 = pos % bs;
    const int64_t stop = std::min<int64_t>(len, pos - off0 + bs);
    const raw_t* row =
        base + (static_cast<int64_t>(table[pos / bs]) * bs + off0) * row_stride + col;
    for (; pos < stop; ++pos, row += row_stride) f(pos - start, row);
  }
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
  const bool vec = kAvx512Path<T, DC>;
  const int64_t nh = (vec && n >= 2 * at::get_num_threads()) ? KVH : 1;
  const int64_t NQ = nh * G;  // query heads per task
  at::parallel_for(0, n * (KVH / nh), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(NQ * std::max<int64_t>(max_len, 1));
    std::vector<float> qf(NQ * D), acc(NQ * D), row(D);
    float* kf = row.data();
    std::vector<float> tile_buf(NQ * 256 + 16);  // [NQ][16][16], 64-byte aligned below
    float* tile = reinterpret_cast<float*>(
        (reinterpret_cast<uintptr_t>(tile_buf.data()) + 63) & ~uintptr_t(63));
    (void)tile;
    (void)kf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / (KVH / nh), h0 = (task % (KVH / nh)) * nh;
      const int64_t len = lens[i];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t L = len - start;
      const int32_t* table = tables + i * max_blocks;
      // query heads h0*G .. (h0+nh)*G - 1 are contiguous in q and out
      const raw_t* qsrc = qp + (i * H + h0 * G) * D;
#pragma omp simd
      for (int64_t e = 0; e < NQ * D; ++e) qf[e] = R::load(qsrc[e]) * scale;
      if constexpr (kAvx512Path<T, DC>) {
#if defined(__AVX512F__)
        scores_avx512<T, DC>(qf.data(), nh, G, kp, table, bs, row_stride, h0, start, len,
                             scores.data(), tile);
#endif
      } else {  // scores[g][t] = q_g . k_t (nh = 1)
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
      }
      // softmax per query head
      for (int64_t r = 0; r < NQ; ++r) {
        float* sr = scores.data() + r * L;
        float m = -INFINITY;
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sr[t]);
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
      if constexpr (kAvx512Path<T, DC>) {
#if defined(__AVX512F__)
        values_avx512<T, DC>(scores.data(), nh, G, vp, table, bs, row_stride, h0, start, len,
                             acc.data());
#endif
      } else {  // acc[g] = sum_t p[g][t] v_t (nh = 1)
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
      }
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

// ---- elementwise -----------------------------------------------------------------------------

// Round a float to the storage dtype and back (identity for float32).
template <typename T>
inline float rnd(float x) {
  return Raw<T>::load(Raw<T>::store(x));
}

template <typename F>
void for_rows(int64_t rows, int64_t cost_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cost_per_row));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) f(r);
  });
}

// out = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), x in float32 (transformers' LlamaRMSNorm).
// With `residual`: first residual = to_dtype(residual + x) (in place), then the norm of it into x.
template <typename T>
void rms_norm_impl(const at::Tensor& out, const at::Tensor& x, const at::Tensor* residual,
                   const at::Tensor& weight, double eps_d) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  const int64_t H = x.size(-1), rows = x.numel() / std::max<int64_t>(H, 1);
  const float eps = static_cast<float>(eps_d);
  raw_t* xp = reinterpret_cast<raw_t*>(x.data_ptr());
  raw_t* op = reinterpret_cast<raw_t*>(out.data_ptr());
  raw_t* rp = residual ? reinterpret_cast<raw_t*>(residual->data_ptr()) : nullptr;
  const raw_t* wp = reinterpret_cast<const raw_t*>(weight.data_ptr());
  for_rows(rows, H, [&](int64_t r) {
    raw_t* xr = xp + r * H;
    raw_t* orow = op + r * H;
    const raw_t* src = xr;
    if (rp) {
      raw_t* res = rp + r * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) res[i] = R::store(R::load(res[i]) + R::load(xr[i]));
      src = res;
    }
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) {
      const float v = R::load(src[i]);
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i)
      orow[i] = R::store(R::load(wp[i]) * rnd<T>(R::load(src[i]) * inv));
  });
}

// Rotate-half rotary embedding, in place on x [T, heads, D] (token stride free, heads and dims
// contiguous). cos/sin [T, D] in x's dtype. out = x*cos + rotate_half(x)*sin, each product
// rounded to the dtype like the eager code.
template <typename T>
void rotary_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  const int64_t Tn = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  const int64_t ts = x.stride(0);
  raw_t* xp = reinterpret_cast<raw_t*>(x.data_ptr());
  const raw_t* cp = reinterpret_cast<const raw_t*>(cos.data_ptr());
  const raw_t* sp = reinterpret_cast<const raw_t*>(sin.data_ptr());
  for_rows(Tn, heads * D, [&](int64_t t) {
    const raw_t* c = cp + t * D;
    const raw_t* s = sp + t * D;
    for (int64_t h = 0; h < heads; ++h) {
      raw_t* v = xp + t * ts + h * D;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = R::load(v[i]), b = R::load(v[i + half]);
        const float lo = rnd<T>(a * R::load(c[i])) + rnd<T>(-b * R::load(s[i]));
        const float hi = rnd<T>(b * R::load(c[i + half])) + rnd<T>(a * R::load(s[i + half]));
        v[i] = R::store(lo);
        v[i + half] = R::store(hi);
      }
    }
  });
}

// out[t] = to_dtype(silu(gate)) * up for x[t] = [gate | up] (transformers' LlamaMLP).
template <typename T>
void silu_and_mul_impl(const at::Tensor& out, const at::Tensor& x) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  const int64_t n = out.size(-1), rows = out.numel() / std::max<int64_t>(n, 1);
  const raw_t* xp = reinterpret_cast<const raw_t*>(x.data_ptr());
  raw_t* op = reinterpret_cast<raw_t*>(out.data_ptr());
  for_rows(rows, n, [&](int64_t r) {
    const raw_t* g = xp + r * 2 * n;
    const raw_t* u = g + n;
    raw_t* o = op + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float a = R::load(g[i]);
      const float silu = a / (1.0f + exp_nonpos(-a));
      o[i] = R::store(rnd<T>(silu) * R::load(u[i]));
    }
  });
}

#define FLOTILLA_DISPATCH(dtype, NAME, ...)                              \
  switch (dtype) {                                                       \
    case at::kFloat: {                                                   \
      using scalar_t = float;                                            \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
    case at::kBFloat16: {                                                \
      using scalar_t = c10::BFloat16;                                    \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
    case at::kHalf: {                                                    \
      using scalar_t = c10::Half;                                        \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
    default:                                                             \
      TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);            \
  }

void check_rows(const char* name, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_contiguous(), name, ": x must be contiguous");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1) && w.scalar_type() == x.scalar_type(),
              name, ": weight must be [hidden] in x's dtype");
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows("rms_norm", x, weight);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() &&
                  out.scalar_type() == x.scalar_type(),
              "rms_norm: out must be contiguous, shaped and typed like x");
  FLOTILLA_DISPATCH(x.scalar_type(), "rms_norm",
                    rms_norm_impl<scalar_t>(out, x, nullptr, weight, eps));
}

void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_rows("fused_add_rms_norm", x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm: residual must be contiguous, shaped and typed like x");
  FLOTILLA_DISPATCH(x.scalar_type(), "fused_add_rms_norm",
                    rms_norm_impl<scalar_t>(x, x, &residual, weight, eps));
}

void rotary_embedding(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rotary_embedding: x must be [T, heads, D] with heads and dims contiguous, D even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                  cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
                  sin.sizes() == cos.sizes() && cos.scalar_type() == x.scalar_type() &&
                  sin.scalar_type() == x.scalar_type(),
              "rotary_embedding: cos/sin must be contiguous [T, D] in x's dtype");
  FLOTILLA_DISPATCH(x.scalar_type(), "rotary_embedding", rotary_impl<scalar_t>(x, cos, sin));
}

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.size(-1) == 2 * out.size(-1) &&
                  x.numel() == 2 * out.numel() && x.scalar_type() == out.scalar_type(),
              "silu_and_mul: x [.., 2n] and out [.., n], contiguous, same dtype");
  FLOTILLA_DISPATCH(x.scalar_type(), "silu_and_mul", silu_and_mul_impl<scalar_t>(out, x));
}

// ---- small-batch bf16 linear (decode) -------------------------------------------------------
//
// out[m, n] = sum_k x[m, k] * w[n, k] for a handful of rows m: at decode batch sizes a linear
// layer is a stream over its weight from DRAM, and oneDNN's blocked GEMM reaches ~12 GB/s of the
// ~30 GB/s this machine reads. Here each thread walks a contiguous range of weight rows front
// to back (the hardware prefetcher's best case), with AVX512-BF16 dot products (bf16 pairs
// multiplied exactly and summed in float32), all M input rows per weight load.

#if defined(__AVX512BF16__)
template <int M>
void gemv_bf16_rows(uint16_t* out, const uint16_t* x, const uint16_t* w, int64_t N, int64_t K) {
  const int64_t K32 = K / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((K - K32) ? ((1ull << (K - K32)) - 1) : 0);
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint16_t* wr = w + n * K;
      __m512 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K32; k += 32) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
        for (int m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
      }
      if (tail) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + K32);
        for (int m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(
              acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + K32), wv);
      }
      for (int m = 0; m < M; ++m)
        out[m * N + n] = Raw<c10::BFloat16>::store(_mm512_reduce_add_ps(acc[m]));
    }
  });
}
#endif

bool gemv_bf16(at::Tensor out, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2 && x.size(1) == w.size(1) &&
                  out.size(0) == x.size(0) && out.size(1) == w.size(0),
              "gemv_bf16: x [M, K], w [N, K], out [M, N]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous() &&
                  x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16,
              "gemv_bf16: contiguous bfloat16 tensors only");
#if defined(__AVX512BF16__)
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  switch (M) {
#define FLOTILLA_GEMV(R) \
  case R:                \
    gemv_bf16_rows<R>(op, xp, wp, N, K); \
    return true;
    FLOTILLA_GEMV(1)
    FLOTILLA_GEMV(2)
    FLOTILLA_GEMV(3)
    FLOTILLA_GEMV(4)
    FLOTILLA_GEMV(5)
    FLOTILLA_GEMV(6)
    FLOTILLA_GEMV(7)
    FLOTILLA_GEMV(8)
#undef FLOTILLA_GEMV
    default:
      return false;
  }
#else
  return false;  // no AVX512-BF16: the caller uses torch's linear
#endif
}

// ---- shared-memory all-reduce (ranks of one node) --------------------------------------------
//
// `buf` maps one shared file (every rank of the group maps the same one):
//   [world flags, 64 bytes apart][2 phases x world slots of slot_bytes]
// Call k (seq = k, counting from 1, the same on every rank) copies this rank's chunk into its
// slot of phase seq & 1, publishes flag[rank] = seq (release), waits until every flag >= seq
// (acquire), then sums the world slots in rank order -- so every rank gets bitwise the same
// result -- and rounds once to the dtype. A rank reuses a phase's slot two calls later, which it
// can only reach after every peer has published the call in between, i.e. finished reading.
// Tensors larger than a slot go in chunks, one seq each. Returns the last seq used.

constexpr int64_t kFlagStride = 64;

template <typename T>
void shm_sum_chunk(T* out, const uint8_t* data, int64_t world, int64_t slot_bytes, int phase,
                   int64_t off, int64_t count) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  raw_t* o = reinterpret_cast<raw_t*>(out) + off;
  const auto slot = [&](int64_t r) {
    return reinterpret_cast<const raw_t*>(data + (phase * world + r) * slot_bytes);
  };
  at::parallel_for(0, count, 4096, [&](int64_t b, int64_t e) {
    const raw_t* s0 = slot(0);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) o[i] = s0[i];
    if (std::is_same<T, float>::value) {
      for (int64_t r = 1; r < world; ++r) {
        const raw_t* sr = slot(r);
#pragma omp simd
        for (int64_t i = b; i < e; ++i) o[i] = R::store(R::load(o[i]) + R::load(sr[i]));
      }
      return;
    }
    // bf16/fp16: accumulate in float32 (chunk of 256 on the stack), round once.
    float acc[256];
    for (int64_t i0 = b; i0 < e; i0 += 256) {
      const int64_t m = std::min<int64_t>(256, e - i0);
      for (int64_t i = 0; i < m; ++i) acc[i] = R::load(s0[i0 + i]);
      for (int64_t r = 1; r < world; ++r) {
        const raw_t* sr = slot(r) + i0;
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) acc[i] += R::load(sr[i]);
      }
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) o[i0 + i] = R::store(acc[i]);
    }
  });
}

struct ShmView {
  uint8_t* base;
  uint8_t* data;
  int64_t slot_bytes;
  int64_t rank, world;
  double timeout_s;
  std::chrono::steady_clock::time_point deadline;

  ShmView(at::Tensor& buf, int64_t rank_, int64_t world_, double timeout)
      : rank(rank_), world(world_), timeout_s(timeout) {
    TORCH_CHECK(buf.scalar_type() == at::kByte && buf.is_contiguous(),
                "shm collectives: buf must be a contiguous uint8 mapping");
    TORCH_CHECK(0 <= rank && rank < world, "shm collectives: rank out of range");
    base = buf.data_ptr<uint8_t>();
    data = base + world * kFlagStride;
    slot_bytes = ((buf.numel() - world * kFlagStride) / (2 * world)) / 64 * 64;
    TORCH_CHECK(slot_bytes > 0, "shm collectives: buffer too small");
    deadline = std::chrono::steady_clock::now() +
               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                   std::chrono::duration<double>(timeout));
  }
  std::atomic<int64_t>* flag(int64_t r) const {
    return reinterpret_cast<std::atomic<int64_t>*>(base + r * kFlagStride);
  }
  uint8_t* slot(int phase, int64_t r) const { return data + (phase * world + r) * slot_bytes; }
  // Publish this rank's slot for call `seq`, then wait for every peer's.
  void publish_and_wait(int64_t seq) const {
    flag(rank)->store(seq, std::memory_order_release);
    for (int64_t r = 0; r < world; ++r) {
      int64_t spins = 0;
      while (flag(r)->load(std::memory_order_acquire) < seq) {
        if (++spins < 4096) {
          _mm_pause();
          continue;
        }
        spins = 0;
        sched_yield();  // let a peer (or its threads) run on this core
        TORCH_CHECK(std::chrono::steady_clock::now() < deadline, "shm collective: rank ", r,
                    " did not arrive within ", timeout_s, " s (seq ", seq, ")");
      }
    }
  }
};

int64_t shm_all_reduce(at::Tensor x, at::Tensor buf, int64_t rank, int64_t world, int64_t seq,
                       double timeout_s) {
  TORCH_CHECK(x.is_contiguous(), "shm_all_reduce: x must be contiguous");
  const ShmView shm(buf, rank, world, timeout_s);
  const int64_t elem = x.element_size(), per_chunk = shm.slot_bytes / elem, n = x.numel();
  uint8_t* xp = reinterpret_cast<uint8_t*>(x.data_ptr());
  for (int64_t off = 0; off < n; off += per_chunk) {
    ++seq;
    const int64_t count = std::min(per_chunk, n - off);
    const int phase = static_cast<int>(seq & 1);
    std::memcpy(shm.slot(phase, rank), xp + off * elem, count * elem);
    shm.publish_and_wait(seq);
    FLOTILLA_DISPATCH(x.scalar_type(), "shm_all_reduce",
                      shm_sum_chunk<scalar_t>(reinterpret_cast<scalar_t*>(xp), shm.data, world,
                                              shm.slot_bytes, phase, off, count));
  }
  return seq;
}

// out [world, *x.shape]: out[r] = rank r's x. Same protocol, copying instead of summing.
int64_t shm_all_gather(at::Tensor out, const at::Tensor& x, at::Tensor buf, int64_t rank,
                       int64_t world, int64_t seq, double timeout_s) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.numel() == world * x.numel() &&
                  out.scalar_type() == x.scalar_type(),
              "shm_all_gather: out must be contiguous [world, *x.shape] in x's dtype");
  const ShmView shm(buf, rank, world, timeout_s);
  const int64_t nbytes = x.numel() * x.element_size();
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(x.data_ptr());
  uint8_t* op = reinterpret_cast<uint8_t*>(out.data_ptr());
  for (int64_t off = 0; off < nbytes; off += shm.slot_bytes) {
    ++seq;
    const int64_t count = std::min(shm.slot_bytes, nbytes - off);
    const int phase = static_cast<int>(seq & 1);
    std::memcpy(shm.slot(phase, rank), xp + off, count);
    shm.publish_and_wait(seq);
    for (int64_t r = 0; r < world; ++r) std::memcpy(op + r * nbytes + off, shm.slot(phase, r), count);
  }
  return seq;
}

}  // namespace

TORCH_LIBRARY(flotilla, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor context_lens, float scale, int window) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("gemv_bf16(Tensor(a!) out, Tensor x, Tensor w) -> bool");
  m.def(
      "shm_all_reduce(Tensor(a!) x, Tensor(b!) buf, int rank, int world, int seq, "
      "float timeout_s) -> int");
  m.def(
      "shm_all_gather(Tensor(a!) out, Tensor x, Tensor(b!) buf, int rank, int world, int seq, "
      "float timeout_s) -> int");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("shm_all_reduce", &shm_all_reduce);
  m.impl("shm_all_gather", &shm_all_gather);
}
