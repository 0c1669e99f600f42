// The int8 KV cache's native ops (workers/kv_int8.py has the layout and why):
//
//   write_kv_cache_int8:         quantizes k, v [T, KVH, D] (float32 / bfloat16 / float16) into
//                                their cache slots, one symmetric scale per (slot, head) row.
//   paged_decode_attention_int8: paged_decode_attention (paged_attention.cpp) over that cache.
//
//   k_cache, v_cache [num_blocks, block_size, KVH, D + 4] int8: each (slot, head) row is D int8
//                    values, then its float32 scale's 4 bytes (unaligned: read by memcpy)
//   q, out [n, H, D] float32 / bfloat16 / float16; block_tables [n, max_blocks] and
//   context_lens [n] int32, scale, window: as paged_decode_attention's.
//
// Decode, per task (one sequence's KV head and its G query heads): scores
// s_t = scale_k[t] * (q . k_t) -- the row's scale applied once, to the int8 dot product --
// softmax in float32, then out = sum_t (p_t * scale_v[t]) v_t. The int8 values are widened to
// float32 in registers: AVX-512 (16 per vector) or AVX2 + FMA (8), for head dims that are a
// multiple of the width, as a compile-time count of vectors so a row stays in registers across
// the G query heads that share it; other head dims, and builds without either ISA, take plain
// loops the compiler vectorizes for its target. Tasks are balanced by length over
// at::parallel_for's threads as in paged_attention.cpp. (The names live in namespace kv8: the
// target-build test compiles every .cpp as one unit.)
#include "common.h"

namespace flotilla {
namespace kv8 {

constexpr int64_t kScaleBytes = 4;

inline float row_scale(const int8_t* row, int64_t D) {
  float s;
  std::memcpy(&s, row + D, sizeof(float));
  return s;
}

// f(t, row) for t = 0 .. len - start - 1 with token (start + t)'s row at column `col`; the
// block table is read once per block, not per token.
template <typename F>
inline void walk_cache_rows(const int8_t* base, const int32_t* table, int64_t bs,
                            int64_t row_stride, int64_t col, int64_t start, int64_t len,
                            const F& f) {
  for (int64_t pos = start; pos < len;) {
    const int64_t blk = pos / bs, end = std::min(len, (blk + 1) * bs);
    const int8_t* row = base + (static_cast<int64_t>(table[blk]) * bs + pos % bs) * row_stride + col;
    for (; pos < end; ++pos, row += row_stride) f(pos - start, row);
  }
}

// ---- one vector ISA for the rows ---------------------------------------------------------------
#if FLOTILLA_AVX512
struct Vec {  // (compiled on AVX-512 targets; on this AVX2 machine tested only by compiling)
  using V = __m512;
  static constexpr int W = 16;
  static V load_i8(const int8_t* p) {  // 16 int8 -> 16 float32
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#define FLOTILLA_KV8_VEC 1
#elif FLOTILLA_AVX2
struct Vec {
  using V = __m256;
  static constexpr int W = 8;
  static V load_i8(const int8_t* p) {  // 8 int8 -> 8 float32
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
#define FLOTILLA_KV8_VEC 1
#else
#define FLOTILLA_KV8_VEC 0
#endif

#if FLOTILLA_KV8_VEC
// sc[g * L] = ks * (qf[g] . k) for the G query heads sharing one key row (qf: [G][NV * W]).
// Two accumulators: a single FMA chain would wait on each FMA's latency.
template <int NV>
inline void scores_vec(const float* qf, int64_t G, const int8_t* kr, float ks, float* sc,
                       int64_t L) {
  Vec::V k[NV];
  for (int j = 0; j < NV; ++j) k[j] = Vec::load_i8(kr + j * Vec::W);
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qf + g * NV * Vec::W;
    Vec::V a0 = Vec::zero(), a1 = Vec::zero();
    for (int j = 0; j + 1 < NV; j += 2) {
      a0 = Vec::fma(Vec::load(qg + j * Vec::W), k[j], a0);
      a1 = Vec::fma(Vec::load(qg + (j + 1) * Vec::W), k[j + 1], a1);
    }
    if (NV % 2) a0 = Vec::fma(Vec::load(qg + (NV - 1) * Vec::W), k[NV - 1], a0);
    sc[g * L] = ks * Vec::sum(Vec::add(a0, a1));
  }
}

// acc[g] += (p[g * L] * vs) * v for the G query heads sharing one value row.
template <int NV>
inline void values_vec(const float* p, int64_t L, int64_t G, const int8_t* vr, float vs,
                       float* acc) {
  Vec::V v[NV];
  for (int j = 0; j < NV; ++j) v[j] = Vec::load_i8(vr + j * Vec::W);
  for (int64_t g = 0; g < G; ++g) {
    const Vec::V w = Vec::set1(p[g * L] * vs);
    float* ag = acc + g * NV * Vec::W;
    for (int j = 0; j < NV; ++j)
      Vec::store(ag + j * Vec::W, Vec::fma(w, v[j], Vec::load(ag + j * Vec::W)));
  }
}
#endif

// The portable forms (any head dim; kf: a float row of scratch).
inline void scores_any(const float* qf, int64_t G, int64_t D, const int8_t* kr, float ks,
                       float* sc, int64_t L, float* kf) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) kf[d] = static_cast<float>(kr[d]);
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qf + g * D;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
    sc[g * L] = ks * s;
  }
}

inline void values_any(const float* p, int64_t L, int64_t G, int64_t D, const int8_t* vr,
                       float vs, float* acc, float* kf) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) kf[d] = static_cast<float>(vr[d]);
  for (int64_t g = 0; g < G; ++g) {
    const float w = p[g * L] * vs;
    float* ag = acc + g * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ag[d] += w * kf[d];
  }
}

// NV: the head dim in vectors of the build's ISA (0: the portable loops).
template <typename T, int NV>
void decode(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
            const at::Tensor& v_cache, const at::Tensor& block_tables,
            const at::Tensor& context_lens, double scale_d, int64_t window) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH, max_blocks = block_tables.size(1);
  const int64_t row_stride = KVH * (D + kScaleBytes);
  const float scale = static_cast<float>(scale_d);
  const raw_t* qp = reinterpret_cast<const raw_t*>(q.data_ptr());
  raw_t* op = reinterpret_cast<raw_t*>(out.data_ptr());
  const int8_t* kp = k_cache.data_ptr<int8_t>();
  const int8_t* vp = v_cache.data_ptr<int8_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  int64_t max_len = 1;
  for (int64_t i = 0; i < n; ++i) max_len = std::max<int64_t>(max_len, lens[i]);
  // A task: one sequence's KV head (its row segment is D + 4 bytes: a few cache lines).
  std::vector<int64_t> costs(n * KVH);
  for (int64_t task = 0; task < n * KVH; ++task) {
    const int64_t len = lens[task / KVH];
    costs[task] = (window > 0 ? std::min<int64_t>(len, window) : len) + 16;
  }
  const auto bins = balance_by_cost(costs);
  at::parallel_for(0, static_cast<int64_t>(bins.size()), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qf(G * D), acc(G * D), kf(D), scores(G * max_len);
    for (int64_t bin = b0; bin < b1; ++bin)
      for (const int64_t task : bins[bin]) {
        const int64_t i = task / KVH, h = task % KVH, len = lens[i];
        const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        const int64_t L = len - start, col = h * (D + kScaleBytes);
        const int32_t* table = tables + i * max_blocks;
        const raw_t* qsrc = qp + (i * H + h * G) * D;
#pragma omp simd
        for (int64_t e = 0; e < G * D; ++e) qf[e] = R::load(qsrc[e]) * scale;
        walk_cache_rows(kp, table, bs, row_stride, col, start, len,
                        [&](int64_t t, const int8_t* kr) {
                          const float ks = row_scale(kr, D);
#if FLOTILLA_KV8_VEC
                          if constexpr (NV > 0) {
                            scores_vec<NV>(qf.data(), G, kr, ks, scores.data() + t, L);
                            return;
                          }
#endif
                          scores_any(qf.data(), G, D, kr, ks, scores.data() + t, L, kf.data());
                        });
        for (int64_t g = 0; g < G; ++g) {  // softmax per query head
          float* sr = scores.data() + g * L;
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
        std::fill(acc.begin(), acc.end(), 0.0f);
        walk_cache_rows(vp, table, bs, row_stride, col, start, len,
                        [&](int64_t t, const int8_t* vr) {
                          const float vs = row_scale(vr, D);
#if FLOTILLA_KV8_VEC
                          if constexpr (NV > 0) {
                            values_vec<NV>(scores.data() + t, L, G, vr, vs, acc.data());
                            return;
                          }
#endif
                          values_any(scores.data() + t, L, G, D, vr, vs, acc.data(), kf.data());
                        });
        raw_t* dst = op + (i * H + h * G) * D;
#pragma omp simd
        for (int64_t e = 0; e < G * D; ++e) dst[e] = R::store(acc[e]);
      }
  });
}

template <typename T>
void decode_any(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                const at::Tensor& v_cache, const at::Tensor& block_tables,
                const at::Tensor& context_lens, double scale, int64_t window) {
#if FLOTILLA_KV8_VEC
  const int64_t D = q.size(2);
  if (D % Vec::W == 0) {
    switch (D / Vec::W) {
#define FLOTILLA_KV8_NV(NV)                                                                   \
  case NV:                                                                                    \
    return decode<T, NV>(out, q, k_cache, v_cache, block_tables, context_lens, scale, window);
      FLOTILLA_KV8_NV(1)
      FLOTILLA_KV8_NV(2)
      FLOTILLA_KV8_NV(4)
      FLOTILLA_KV8_NV(6)
      FLOTILLA_KV8_NV(8)
      FLOTILLA_KV8_NV(16)
#undef FLOTILLA_KV8_NV
      default:
        break;
    }
  }
#endif
  decode<T, 0>(out, q, k_cache, v_cache, block_tables, context_lens, scale, window);
}

// One row of D values (x, any float dtype) -> D int8 and the float32 scale, the same float32
// operations as workers/kv_int8.quantize (so the same bits): amax, 127 / amax (0 for a zero
// row), x * that rounded half-to-even (nearbyint in the default rounding mode), amax / 127.
template <typename T>
inline void quantize_row(const typename Raw<T>::type* x, int64_t D, int8_t* dst) {
  using R = Raw<T>;
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t d = 0; d < D; ++d) {
    const float a = std::fabs(R::load(x[d]));
    amax = a > amax ? a : amax;
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const float r = std::nearbyint(R::load(x[d]) * inv);
    dst[d] = static_cast<int8_t>(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
  }
  const float s = amax / 127.0f;
  std::memcpy(dst + D, &s, sizeof(float));
}

template <typename T>
void write_impl(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                const at::Tensor& v, const int64_t* slots) {
  using raw_t = typename Raw<T>::type;
  const int64_t T_ = k.size(0), KVH = k.size(1), D = k.size(2);
  const int64_t row = KVH * (D + kScaleBytes);
  int8_t* kc = k_cache.data_ptr<int8_t>();
  int8_t* vc = v_cache.data_ptr<int8_t>();
  const raw_t* kp = reinterpret_cast<const raw_t*>(k.data_ptr());
  const raw_t* vp = reinterpret_cast<const raw_t*>(v.data_ptr());
  const int64_t ks = k.stride(0), vs = v.stride(0);
  at::parallel_for(0, T_, std::max<int64_t>(1, 4096 / std::max<int64_t>(KVH * D, 1)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t t = b; t < e; ++t)
                       for (int64_t h = 0; h < KVH; ++h) {
                         const int64_t at_ = slots[t] * row + h * (D + kScaleBytes);
                         quantize_row<T>(kp + t * ks + h * D, D, kc + at_);
                         quantize_row<T>(vp + t * vs + h * D, D, vc + at_);
                       }
                   });
}

void check_cache(const char* name, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 int64_t head_dim) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              name, ": caches [blocks, block_size, KVH, D + 4], contiguous");
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar, name,
              ": the caches must be int8");
  TORCH_CHECK(k_cache.size(3) == head_dim + kScaleBytes, name, ": cache rows of ",
              k_cache.size(3), " bytes, expected head_dim ", head_dim, " + 4 (the scale)");
}

}  // namespace kv8

void paged_decode_attention_int8(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, double scale, int64_t window) {
  constexpr const char* name = "paged_decode_attention_int8";
  TORCH_CHECK(q.dim() == 3, name, ": q [n, H, D]");
  kv8::check_cache(name, k_cache, v_cache, q.size(2));
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && block_tables.is_contiguous() &&
                  context_lens.is_contiguous(),
              name, ": inputs must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), name,
              ": out must be shaped and typed like q");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              name, ": block_tables and context_lens must be int32");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, name, ": H not a multiple of KVH");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0), name,
              ": one block table and length per query row");
  FLOTILLA_DISPATCH(q.scalar_type(), "paged_decode_attention_int8",
                    kv8::decode_any<scalar_t>(out, q, k_cache, v_cache, block_tables,
                                              context_lens, scale, window));
}

void write_kv_cache_int8(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& slots) {
  constexpr const char* name = "write_kv_cache_int8";
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), name, ": k/v [T, KVH, D]");
  kv8::check_cache(name, k_cache, v_cache, k.size(2));
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              name, ": k/v [T, KVH, D] with each token's heads and dims contiguous");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), name, ": k and v must share a dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong &&
                  slots.is_contiguous(),
              name, ": slots [T] int64");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, name, ": slot ", sp[t], " outside the cache's ",
                num_slots, " slots");
  FLOTILLA_DISPATCH(k.scalar_type(), "write_kv_cache_int8",
                    kv8::write_impl<scalar_t>(k_cache, v_cache, k, v, sp));
}

}  // namespace flotilla

TORCH_LIBRARY_FRAGMENT(flotilla, m) {
  m.def(
      "paged_decode_attention_int8(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor context_lens, float scale, int window) -> ()");
  m.def(
      "write_kv_cache_int8(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
      "Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("paged_decode_attention_int8", &flotilla::paged_decode_attention_int8);
  m.impl("write_kv_cache_int8", &flotilla::write_kv_cache_int8);
}
