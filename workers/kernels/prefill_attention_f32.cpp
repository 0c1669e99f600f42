// paged_prefill_attention for float32 queries, AVX2 + FMA (it runs on AVX-512 CPUs too): the
// query rows of prefill chunks against keys/values read through the block tables, causal from
// each chunk's offset, optional sliding window -- the layout and visibility rule of
// prefill_attention.cpp. Without it a float32 prefill ran torch's flash kernel per chunk on K/V
// gathered out of the paged cache (index_select) and copied its output back: ~30% of a
// 512-token SmolLM2 prefill on a 2-core EPYC went to attention, the gathers and the copies.
//
// The cache is float32 or int8 (workers/kv_int8.py); one loop reads both through its row
// format (cache_rows.h: PlainRows<float>, Int8Rows, as the decode kernels do). A task is
// (chunk, KV head, span of up to kSpan positions; common.h: prefill_spans). It packs the keys
// its positions can see once, as float32 -- K as tiles of 8 keys x D dims x 8 lanes (one key
// per lane), V as rows of D; an int8 row is widened and multiplied by its scale there, the
// float32 values kv_int8.dequantize gives, so the tiles below never see the format -- then
// walks its rows (position-major, the G query heads of the KV head inside) kRows at a time:
// scores = Q K^T in a 4-row x 16-key register tile, exact softmax per row over its visible keys
// (exp256, the decode kernel's exp), out = P V in a 4-row x 16-dim tile divided by the row's
// sum. Every sum runs in float32 (the order differs from torch's; the tests compare both to a
// float64 reference). Packing is O(keys x D) against O(rows x keys x D) for the products.
#include "attend_avx2.h"
#include "cache_rows.h"
#include "common.h"

namespace flotilla {

#if FLOTILLA_AVX2
namespace f32prefill {  // (named: the kernel-target test builds every source as one unit)

constexpr int kRows = 4;     // query rows per register tile
constexpr int64_t kSpan = 64;  // positions per task: 8 tasks per KV head for a 512-token chunk

struct Scratch {
  std::vector<float> kpack, vpack, scores;
};

// scores[r][t] = sum_d q[r][d] k[t][d] for kRows rows and the key tiles [j0, j1) of 16 keys
// (kpack: tiles of 8 keys as [D][8]); row r's scores start at s + r * ld.
template <int D>
inline void qk_tile(const float* q, const float* kpack, int64_t j0, int64_t j1, float* s,
                    int64_t ld) {
  for (int64_t j = j0; j < j1; j += 16) {
    const float* k0 = kpack + j * D;  // tile j / 8: 8 keys x D
    const float* k1 = k0 + 8 * D;
    __m256 a[kRows][2];
    for (int r = 0; r < kRows; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m256 x0 = _mm256_loadu_ps(k0 + 8 * d), x1 = _mm256_loadu_ps(k1 + 8 * d);
      for (int r = 0; r < kRows; ++r) {
        const __m256 qb = _mm256_broadcast_ss(q + r * D + d);
        a[r][0] = _mm256_fmadd_ps(qb, x0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(qb, x1, a[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(s + r * ld + j, a[r][0]);
      _mm256_storeu_ps(s + r * ld + j + 8, a[r][1]);
    }
  }
}

// Row softmax over keys [lo, hi) of the row s[0 .. n16) (scaled by `scale`): unnormalized
// probabilities in place, zero outside [lo, hi); returns their sum.
inline float softmax_row(float* s, int64_t n16, int64_t lo, int64_t hi, float scale) {
  const __m256 vs = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const auto visible = [&](int64_t t0) {  // lanes t0 + i in [lo, hi)
    const __m256i t = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(t0)), lane);
    const __m256i ge = _mm256_cmpgt_epi32(t, _mm256_set1_epi32(static_cast<int>(lo) - 1));
    const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), t);
    return _mm256_castsi256_ps(_mm256_and_si256(ge, lt));
  };
  __m256 vm = ninf;
  for (int64_t t0 = 0; t0 < n16; t0 += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + t0), vs);
    vm = _mm256_max_ps(vm, _mm256_blendv_ps(ninf, x, visible(t0)));
  }
  const __m256 m = _mm256_set1_ps(hmax8(vm));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t t0 = 0; t0 < n16; t0 += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + t0), vs), m);
    const __m256 p = _mm256_and_ps(exp256(_mm256_min_ps(x, _mm256_setzero_ps())), visible(t0));
    _mm256_storeu_ps(s + t0, p);
    sum = _mm256_add_ps(sum, p);
  }
  return hsum8(sum);
}

// out[r][0 .. D) = inv[r] * sum_t p[r][t] v[t] over keys [t0, t1) (vpack rows of D floats).
template <int D>
inline void pv_tile(const float* p, int64_t ld, const float* vpack, int64_t t0, int64_t t1,
                    const float* inv, float* const* out) {
  for (int c = 0; c < D; c += 16) {
    __m256 a[kRows][2];
    for (int r = 0; r < kRows; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {
      const __m256 v0 = _mm256_loadu_ps(vpack + t * D + c), v1 = _mm256_loadu_ps(vpack + t * D + c + 8);
      for (int r = 0; r < kRows; ++r) {
        const __m256 pb = _mm256_broadcast_ss(p + r * ld + t);
        a[r][0] = _mm256_fmadd_ps(pb, v0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(pb, v1, a[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      if (out[r] == nullptr) continue;  // a padding row of the last tile
      const __m256 w = _mm256_set1_ps(inv[r]);
      _mm256_storeu_ps(out[r] + c, _mm256_mul_ps(a[r][0], w));
      _mm256_storeu_ps(out[r] + c + 8, _mm256_mul_ps(a[r][1], w));
    }
  }
}

// Key t of the span (its cache rows kr, vr) into the packs: K into lane t % 8 of tile t / 8,
// V as row t; Rows' scale (1 for float32: the product folds away) applied once per value.
template <int D, typename Rows>
inline void pack_key(const typename Rows::raw_t* kr, const typename Rows::raw_t* vr, int64_t t,
                     float* kpack, float* vpack) {
  const float ks = Rows::scale(kr, D);
  const __m256 vs = _mm256_set1_ps(Rows::scale(vr, D));
  float* kt = kpack + (t / 8) * 8 * D + (t % 8);
  for (int d = 0; d < D; ++d) kt[8 * d] = Rows::load(kr[d]) * ks;
  for (int d = 0; d < D; d += 8)
    _mm256_storeu_ps(vpack + t * D + d, _mm256_mul_ps(Rows::load8(vr + d), vs));
}

template <int D, typename Rows>
void run_span(const PrefillSpan& task, float* out, const float* q,
              const typename Rows::raw_t* kc, const typename Rows::raw_t* vc,
              const int32_t* tables, int64_t max_blocks, const int32_t* qs, const int32_t* sp,
              int64_t H, int64_t KVH, int64_t bs, float scale, int64_t window, Scratch& w) {
  constexpr int64_t HS = D + Rows::kTail;  // a head's row segment, in Rows::raw_t
  const int64_t c = task.chunk, h = task.head, G = H / KVH, s0 = sp[c];
  const int32_t* table = tables + c * max_blocks;
  // keys the span's positions see: [K0, K1)
  const auto first_key = [&](int64_t p) {  // p: absolute position
    return window > 0 ? std::max<int64_t>(0, p - window + 1) : int64_t{0};
  };
  const int64_t K0 = first_key(s0 + task.p0), K1 = s0 + task.p1, L = K1 - K0;
  const int64_t L16 = (L + 15) / 16 * 16;
  w.kpack.assign(L16 * D, 0.0f);
  w.vpack.assign(L16 * D, 0.0f);
  for (int64_t t = 0; t < L; ++t) {
    const int64_t pos = K0 + t;
    const int64_t row = (static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * KVH + h;
    pack_key<D, Rows>(kc + row * HS, vc + row * HS, t, w.kpack.data(), w.vpack.data());
  }
  const int64_t rows = (task.p1 - task.p0) * G;
  w.scores.resize(kRows * L16 + kRows * D);
  float* s = w.scores.data();
  float* qbuf = s + kRows * L16;  // the tile's query rows (zero rows pad the last tile)
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t rn = std::min<int64_t>(kRows, rows - r0);
    float* dst[kRows] = {nullptr, nullptr, nullptr, nullptr};
    int64_t lo[kRows], hi[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t rr = r0 + std::min<int64_t>(r, rn - 1);
      const int64_t i = task.p0 + rr / G, head = h * G + rr % G;  // position in the chunk
      const int64_t t = (qs[c] + i) * H + head;
      std::memcpy(qbuf + r * D, q + t * D, D * sizeof(float));
      if (r < rn) dst[r] = out + t * D;
      lo[r] = first_key(s0 + i) - K0;
      hi[r] = s0 + i + 1 - K0;
    }
    const int64_t jlo = *std::min_element(lo, lo + kRows) / 16 * 16;
    const int64_t jhi = (*std::max_element(hi, hi + kRows) + 15) / 16 * 16;
    qk_tile<D>(qbuf, w.kpack.data(), jlo, jhi, s, L16);
    float inv[kRows];
    for (int r = 0; r < kRows; ++r)
      inv[r] = 1.0f / softmax_row(s + r * L16 + jlo, jhi - jlo, lo[r] - jlo, hi[r] - jlo, scale);
    pv_tile<D>(s, L16, w.vpack.data(), jlo, jhi, inv, dst);
  }
}

template <int D, typename Rows>
void prefill_f32(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                 const at::Tensor& q_starts, const at::Tensor& q_lens, const at::Tensor& start_pos,
                 double scale, int64_t window) {
  using row_t = typename Rows::raw_t;
  const int64_t C = q_starts.size(0), H = q.size(1);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), max_blocks = block_tables.size(1);
  const int32_t* qs = q_starts.data_ptr<int32_t>();
  const int32_t* sp = start_pos.data_ptr<int32_t>();
  const PrefillWork work =
      prefill_spans(C, q_lens.data_ptr<int32_t>(), sp, KVH, kSpan, window, 32);
  float* op = out.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const row_t* kp = reinterpret_cast<const row_t*>(k_cache.data_ptr());
  const row_t* vp = reinterpret_cast<const row_t*>(v_cache.data_ptr());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t nt = static_cast<int64_t>(work.bins.size());
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t b = begin; b < end; ++b)
      for (const int64_t t : work.bins[b])
        run_span<D, Rows>(work.spans[t], op, qp, kp, vp, tables, max_blocks, qs, sp, H, KVH, bs,
                          static_cast<float>(scale), window, w);
  });
}

// The head dims compiled in; false for any other.
template <typename Rows>
bool prefill_any(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                 const at::Tensor& q_starts, const at::Tensor& q_lens, const at::Tensor& start_pos,
                 double scale, int64_t window) {
  switch (q.size(2)) {
#define FLOTILLA_HEAD_DIM(DIM)                                                                \
  case DIM:                                                                                   \
    prefill_f32<DIM, Rows>(out, q, k_cache, v_cache, block_tables, q_starts, q_lens,          \
                           start_pos, scale, window);                                         \
    return true;
    FLOTILLA_HEAD_DIM(16)
    FLOTILLA_HEAD_DIM(32)
    FLOTILLA_HEAD_DIM(64)
    FLOTILLA_HEAD_DIM(96)
    FLOTILLA_HEAD_DIM(128)
    FLOTILLA_HEAD_DIM(256)
#undef FLOTILLA_HEAD_DIM
    default:
      return false;
  }
}

}  // namespace f32prefill
#endif

bool paged_prefill_attention_f32(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& q_starts, const at::Tensor& q_lens,
                                 const at::Tensor& start_pos, double scale, int64_t window) {
#if FLOTILLA_AVX2
  if (q.scalar_type() != at::kFloat || out.scalar_type() != at::kFloat ||
      v_cache.scalar_type() != k_cache.scalar_type())
    return false;
  if (k_cache.scalar_type() == at::kFloat)
    return f32prefill::prefill_any<PlainRows<float>>(out, q, k_cache, v_cache, block_tables,
                                                     q_starts, q_lens, start_pos, scale, window);
  if (k_cache.scalar_type() == at::kChar)
    return f32prefill::prefill_any<Int8Rows>(out, q, k_cache, v_cache, block_tables, q_starts,
                                             q_lens, start_pos, scale, window);
  return false;
#else
  (void)out, (void)q, (void)k_cache, (void)v_cache, (void)block_tables, (void)q_starts;
  (void)q_lens, (void)start_pos, (void)scale, (void)window;
  return false;
#endif
}

}  // namespace flotilla
