// paged_prefill_attention: the query rows of prefill chunks against keys/values read from the
// block-paged KV cache (the chunk's own K/V are already written there), causal with the
// chunk's offset, optional sliding window. bfloat16 with AVX512-BF16 here, float32 queries
// over a float32 or int8 cache with AVX2 in prefill_attention_f32.cpp; returns false otherwise
// (and for head dims other than 16, 32, 64, 96, 128, 256): the caller uses SDPA.
//
// Layout (matches workers/attention.py):
//   out, q       [T, H, D]  bfloat16, contiguous; chunk c's rows are q_starts[c] ..
//                q_starts[c] + q_lens[c] - 1, at positions start_pos[c] + i
//   k/v_cache    [num_blocks, block_size, KVH, D]
//   block_tables [C, max_blocks] int32: the blocks of chunk c's sequence, in order
// Query row (position p, head g of KV head h) sees key t iff t <= p and (window == 0 or
// t > p - window).
//
// A task is (chunk, KV head, span of up to kSpan positions; common.h: prefill_spans), run in
// blocks of 16 positions: a block's rows are its positions x the G query heads sharing the KV
// head. It packs the keys/values the span can see, once, so that AVX512-BF16 dot products
// work as outer products -- K as [tile of 16 keys][D/2 dim pairs][16] (dims 2i, 2i+1 of one
// key in one 32-bit lane), V as [key pair][D/16][16] (keys 2j, 2j+1 of one dim in one lane)
// -- then: scores = Q K^T in float32 (16 rows x 16 keys per 16-register tile), scale, mask,
// exact softmax per row (max, exp, sum), probabilities rounded to bfloat16 (as torch's CPU
// flash kernel does), out = P V accumulated in float32 and divided by the row's sum. Tasks are spread over the threads by estimated cost (longest first).
// On CPUs with AMX-BF16 (head dims 32 .. 128) both products run as tile dot products on the
// same packed K/V (run_task_amx): 2.3x faster on the offline workload's prefill; the float32
// sums add each bf16 pair's two products in the other order, so ~0.04% of outputs differ from
// the AVX512-BF16 path by one bf16 step (both equally close to a float64 reference).
#include "common.h"

namespace flotilla {

#if FLOTILLA_AVX512_BF16
namespace {

constexpr int kQBlock = 16;  // positions per register-tiled block
constexpr int kSpan = 256;   // positions per task (its keys are packed once)

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// Packs keys [k0, k1) of KV head h: K as tiles of 16 keys x D/2 dim pairs, V as key pairs x
// D dims (see the top of this file), zero-padded to a multiple of 16 keys.
template <int D>
void pack_kv(const uint16_t* kc, const uint16_t* vc, const int32_t* table, int64_t bs,
             int64_t row_stride, int64_t h, int64_t k0, int64_t k1, std::vector<uint32_t>& kpack,
             std::vector<uint32_t>& vpack) {
  constexpr int DP = D / 2, NJ = D / 16;
  const int64_t L = k1 - k0, L16 = (L + 15) / 16 * 16;
  kpack.assign(L16 * DP, 0u);
  vpack.assign((L16 / 2 + 8) * NJ * 16, 0u);  // + 16 zero keys: AMX reads 32 keys a tile
  for (int64_t t = 0; t < L; ++t) {
    const int64_t pos = k0 + t;
    const int64_t off =
        (static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * row_stride + h * D;
    const uint32_t* kr = reinterpret_cast<const uint32_t*>(kc + off);
    uint32_t* kt = kpack.data() + (t / 16) * DP * 16 + (t % 16);
    for (int i = 0; i < DP; ++i) kt[i * 16] = kr[i];
    const uint16_t* vr = vc + off;
    uint16_t* vt = reinterpret_cast<uint16_t*>(vpack.data() + (t / 2) * NJ * 16) + (t % 2);
    for (int d = 0; d < D; ++d) vt[2 * d] = vr[d];
  }
}

// Softmax of one score row over its visible keys [lo, hi) of LB (relative to the row's first
// key tile): bf16 probabilities into pr (unnormalized, zero outside [lo, hi)); returns the sum
// of the rounded values.
inline float softmax_row_bf16(const float* s, int64_t LB, int64_t lo, int64_t hi, __m512 vscale,
                              uint16_t* pr) {
  const auto lanes = [&](int64_t t0) -> __mmask16 {  // visible lanes of keys t0 .. t0+15
    const int64_t a = std::max<int64_t>(lo - t0, 0), b = std::min<int64_t>(hi - t0, 16);
    return a >= b ? 0 : static_cast<__mmask16>(((1u << b) - 1u) & ~((1u << a) - 1u));
  };
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (int64_t t0 = 0; t0 < LB; t0 += 16)
    vm = _mm512_mask_max_ps(vm, lanes(t0), vm, _mm512_mul_ps(_mm512_loadu_ps(s + t0), vscale));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t0 = 0; t0 < LB; t0 += 16) {
    const __m512 x = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + t0), vscale), m);
    const __m256i e = reinterpret_cast<__m256i>(
        _mm512_cvtneps_pbh(_mm512_maskz_mov_ps(lanes(t0), exp512(x))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + t0), e);
    vsum = _mm512_add_ps(vsum,
                         _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(e), 16)));
  }
  return _mm512_reduce_add_ps(vsum);
}

template <int D>
void run_task(const PrefillSpan& task, uint16_t* out, const uint16_t* q, const uint16_t* kc,
              const uint16_t* vc, const int32_t* tables, int64_t max_blocks, const int32_t* q_starts,
              const int32_t* start_pos, int64_t H, int64_t KVH, int64_t bs, float scale,
              int64_t window, std::vector<uint32_t>& kpack, std::vector<uint32_t>& vpack,
              std::vector<float>& scores, std::vector<uint16_t>& probs) {
  constexpr int DP = D / 2;   // dim pairs
  constexpr int NJ = D / 16;  // 16-lane chunks of a row
  const int64_t G = H / KVH, h = task.head, c = task.chunk;
  const int64_t sp = start_pos[c], qs = q_starts[c];
  const auto first_key = [&](int64_t p) {  // first key position p0's row may see
    return window > 0 ? std::max<int64_t>(0, sp + p - window + 1) : 0;
  };
  // keys the task's rows see: [K0, K1), packed once for all its blocks of positions
  const int64_t K0 = first_key(task.p0), K1 = sp + task.p1;
  pack_kv<D>(kc, vc, tables + c * max_blocks, bs, KVH * D, h, K0, K1, kpack, vpack);
  const __m512 vscale = _mm512_set1_ps(scale);

  for (int64_t b0 = task.p0; b0 < task.p1; b0 += kQBlock) {
    const int64_t b1 = std::min<int64_t>(task.p1, b0 + kQBlock), R = (b1 - b0) * G;
    // this block's keys, relative to K0: tiles [t_lo, t_hi) (multiples of 16)
    const int64_t t_lo = (first_key(b0) - K0) / 16 * 16;
    const int64_t t_hi = (sp + b1 - K0 + 15) / 16 * 16, LB = t_hi - t_lo;
    const auto qrow = [&](int64_t r) {  // row r = (position b0 + r / G, head h*G + r % G)
      return reinterpret_cast<const uint32_t*>(q + ((qs + b0 + r / G) * H + h * G + r % G) * D);
    };

    // scores [R][LB] = Q K^T, 16 rows x 16 keys per register tile
    scores.resize(R * LB);
    for (int64_t r0 = 0; r0 < R; r0 += 16) {
      const int rn = static_cast<int>(std::min<int64_t>(16, R - r0));
      const uint32_t* qr[16];
      for (int i = 0; i < rn; ++i) qr[i] = qrow(r0 + i);
      for (int64_t t0 = t_lo; t0 < t_hi; t0 += 16) {
        __m512 acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
        const uint32_t* kt = kpack.data() + (t0 / 16) * DP * 16;
        for (int i = 0; i < DP; ++i) {
          const __m512i kv = _mm512_loadu_si512(kt + i * 16);
          for (int j = 0; j < 16; ++j) {
            if (j >= rn) break;
            acc[j] = _mm512_dpbf16_ps(acc[j], as_bh(_mm512_set1_epi32(qr[j][i])), as_bh(kv));
          }
        }
        for (int j = 0; j < rn; ++j)
          _mm512_storeu_ps(scores.data() + (r0 + j) * LB + (t0 - t_lo), acc[j]);
      }
    }

    // softmax per row over its visible keys [lo, hi) -> bf16 probabilities (unnormalized, zero
    // elsewhere) and the sum of the rounded values
    probs.resize(R * LB);
    float sums[kQBlock * 16];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t p = b0 + r / G;
      const int64_t lo = first_key(p) - K0 - t_lo, hi = sp + p + 1 - K0 - t_lo;
      sums[r] = softmax_row_bf16(scores.data() + r * LB, LB, lo, hi, vscale,
                                 probs.data() + r * LB);
    }

    // out rows = P V / sum; 16 / NJ rows at a time keep their accumulators in registers
    constexpr int RG = NJ >= 16 ? 1 : 16 / NJ;
    for (int64_t r0 = 0; r0 < R; r0 += RG) {
      const int rn = static_cast<int>(std::min<int64_t>(RG, R - r0));
      __m512 acc[RG][NJ];
      for (int i = 0; i < RG; ++i)
        for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
      const uint32_t* pr[RG];
      for (int i = 0; i < rn; ++i)
        pr[i] = reinterpret_cast<const uint32_t*>(probs.data() + (r0 + i) * LB);
      for (int64_t tp = 0; tp < LB / 2; ++tp) {
        const uint32_t* vt = vpack.data() + (t_lo / 2 + tp) * NJ * 16;
        __m512i v[NJ];
        for (int j = 0; j < NJ; ++j) v[j] = _mm512_loadu_si512(vt + j * 16);
        for (int i = 0; i < RG; ++i) {
          if (i >= rn) break;
          const __m512bh w = as_bh(_mm512_set1_epi32(pr[i][tp]));
          for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w, as_bh(v[j]));
        }
      }
      for (int i = 0; i < rn; ++i) {
        const int64_t r = r0 + i;
        uint16_t* dst = out + ((qs + b0 + r / G) * H + h * G + r % G) * D;
        const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
        for (int j = 0; j < NJ; ++j)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * j),
                              reinterpret_cast<__m256i>(
                                  _mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][j], inv))));
      }
    }
  }
}

#if FLOTILLA_AMX
// The same task with AMX tile dot products (head dims 32 .. 128 in steps of 32). The packed
// K is already in the B-tile layout of S = Q K^T (rows: dim pairs, columns: 16 keys) and the
// packed V in that of O = P V (rows: key pairs, columns: 16 dims). A tile's 16 rows are 16
// positions of one query head (a constant stride in q), so a block of positions runs as G
// row groups. tiles: 0 = C, 1 .. 4 = Q chunks of 32 dims, 5 = B (K or V), 6 = P.
template <int D>
void run_task_amx(const PrefillSpan& task, uint16_t* out, const uint16_t* q, const uint16_t* kc,
                  const uint16_t* vc, const int32_t* tables, int64_t max_blocks,
                  const int32_t* q_starts, const int32_t* start_pos, int64_t H, int64_t KVH,
                  int64_t bs, float scale, int64_t window, std::vector<uint32_t>& kpack,
                  std::vector<uint32_t>& vpack, std::vector<float>& scores,
                  std::vector<uint16_t>& probs) {
  constexpr int DP = D / 2, NJ = D / 16, NC = D / 32;
  static_assert(NC >= 1 && NC <= 4 && D % 32 == 0, "AMX prefill: head dim 32 .. 128");
  const int64_t G = H / KVH, h = task.head, c = task.chunk;
  const int64_t sp = start_pos[c], qs = q_starts[c];
  const auto first_key = [&](int64_t p) {
    return window > 0 ? std::max<int64_t>(0, sp + p - window + 1) : 0;
  };
  const int64_t K0 = first_key(task.p0), K1 = sp + task.p1;
  pack_kv<D>(kc, vc, tables + c * max_blocks, bs, KVH * D, h, K0, K1, kpack, vpack);
  const __m512 vscale = _mm512_set1_ps(scale);
  alignas(64) uint16_t qpad[16 * D];
  alignas(64) float ctile[256];

  for (int64_t b0 = task.p0; b0 < task.p1; b0 += kQBlock) {
    const int64_t rn = std::min<int64_t>(task.p1, b0 + kQBlock) - b0;
    const int64_t t_lo = (first_key(b0) - K0) / 16 * 16;
    const int64_t t_hi = (sp + b0 + rn - K0 + 15) / 16 * 16, LB = t_hi - t_lo;
    const int64_t LB32 = (LB + 31) / 32 * 32;  // probability rows padded with zeros
    scores.resize(G * 16 * LB);
    probs.assign(G * 16 * LB32, 0);
    float sums[16 * 16];
    for (int64_t g = 0; g < G; ++g) {
      // Q rows: positions b0 .. b0+15 of query head h*G + g (zero rows past the chunk)
      const uint16_t* qa = q + ((qs + b0) * H + h * G + g) * D;
      int64_t qstride = H * D * 2;
      if (rn < 16) {
        std::memset(qpad, 0, sizeof(qpad));
        for (int64_t i = 0; i < rn; ++i) std::memcpy(qpad + i * D, qa + i * H * D, D * 2);
        qa = qpad, qstride = D * 2;
      }
      _tile_loadd(1, qa, qstride);
      if constexpr (NC > 1) _tile_loadd(2, qa + 32, qstride);
      if constexpr (NC > 2) _tile_loadd(3, qa + 64, qstride);
      if constexpr (NC > 3) _tile_loadd(4, qa + 96, qstride);
      float* sg = scores.data() + g * 16 * LB;
      for (int64_t t0 = t_lo; t0 < t_hi; t0 += 16) {
        const uint32_t* kt = kpack.data() + (t0 / 16) * DP * 16;
        _tile_zero(0);
        _tile_loadd(5, kt, 64);
        _tile_dpbf16ps(0, 1, 5);
        if constexpr (NC > 1) {
          _tile_loadd(5, kt + 256, 64);
          _tile_dpbf16ps(0, 2, 5);
        }
        if constexpr (NC > 2) {
          _tile_loadd(5, kt + 512, 64);
          _tile_dpbf16ps(0, 3, 5);
        }
        if constexpr (NC > 3) {
          _tile_loadd(5, kt + 768, 64);
          _tile_dpbf16ps(0, 4, 5);
        }
        _tile_stored(0, sg + (t0 - t_lo), LB * 4);
      }
      // softmax of each valid row over its visible keys [lo, hi) -> bf16 probabilities
      for (int64_t i = 0; i < rn; ++i) {
        const int64_t p = b0 + i, r = g * 16 + i;
        const int64_t lo = first_key(p) - K0 - t_lo, hi = sp + p + 1 - K0 - t_lo;
        sums[r] = softmax_row_bf16(sg + i * LB, LB, lo, hi, vscale, probs.data() + r * LB32);
      }
      // out rows = P V / sum, 16 dims per C tile, 32 keys per tile product
      const uint16_t* pg = probs.data() + g * 16 * LB32;
      for (int j = 0; j < NJ; ++j) {
        _tile_zero(0);
        for (int64_t k0 = 0; k0 < LB32; k0 += 32) {
          _tile_loadd(6, pg + k0, LB32 * 2);
          _tile_loadd(5, vpack.data() + ((t_lo + k0) / 2) * NJ * 16 + j * 16, D * 4);
          _tile_dpbf16ps(0, 6, 5);
        }
        _tile_stored(0, ctile, 64);
        for (int64_t i = 0; i < rn; ++i) {
          uint16_t* dst = out + ((qs + b0 + i) * H + h * G + g) * D + 16 * j;
          const __m512 v = _mm512_mul_ps(_mm512_load_ps(ctile + 16 * i),
                                         _mm512_set1_ps(1.0f / sums[g * 16 + i]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                              reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
        }
      }
    }
  }
}

template <int D>
constexpr bool kAmxPrefill = D % 32 == 0 && D >= 32 && D <= 128;
#else
template <int D>
constexpr bool kAmxPrefill = false;
#endif

template <int D>
void prefill(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
             const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& q_starts,
             const at::Tensor& q_lens, const at::Tensor& start_pos, double scale, int64_t window) {
  const int64_t C = q_starts.size(0), H = q.size(1);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), max_blocks = block_tables.size(1);
  const int32_t* qs = q_starts.data_ptr<int32_t>();
  const int32_t* ql = q_lens.data_ptr<int32_t>();
  const int32_t* sp = start_pos.data_ptr<int32_t>();
  const PrefillWork work = prefill_spans(C, ql, sp, KVH, kSpan, window, 64);
  const auto& tasks = work.spans;
  const auto& bins = work.bins;
  const int64_t nt = static_cast<int64_t>(bins.size());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
#if FLOTILLA_AMX
  const bool amx = kAmxPrefill<D> && amx_ready();
#endif
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> kpack, vpack;
    std::vector<float> scores;
    std::vector<uint16_t> probs;
#if FLOTILLA_AMX
    if constexpr (kAmxPrefill<D>) {
      if (amx) {
        amx_config_16x64();
        for (int64_t b = begin; b < end; ++b)
          for (const int64_t t : bins[b])
            run_task_amx<D>(tasks[t], op, qp, kp, vp, tables, max_blocks, qs, sp, H, KVH, bs,
                            static_cast<float>(scale), window, kpack, vpack, scores, probs);
        _tile_release();
        return;
      }
    }
#endif
    for (int64_t b = begin; b < end; ++b)
      for (const int64_t t : bins[b])
        run_task<D>(tasks[t], op, qp, kp, vp, tables, max_blocks, qs, sp, H, KVH, bs,
                    static_cast<float>(scale), window, kpack, vpack, scores, probs);
  });
}

}  // namespace
#endif

bool paged_prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& q_starts, const at::Tensor& q_lens,
                             const at::Tensor& start_pos, double scale, int64_t window) {
  // the int8 KV cache: rows of D values and the float32 scale's 4 bytes (workers/kv_int8.py)
  const bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  out.sizes() == q.sizes(),
              "paged_prefill_attention: out/q [T, H, D], caches [blocks, block_size, KVH, D]");
  TORCH_CHECK(int8 == (v_cache.scalar_type() == at::kChar),
              "paged_prefill_attention: k_cache and v_cache must both be int8 or neither");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && block_tables.is_contiguous() &&
                  q_starts.is_contiguous() && q_lens.is_contiguous() && start_pos.is_contiguous(),
              "paged_prefill_attention: inputs must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && q_starts.scalar_type() == at::kInt &&
                  q_lens.scalar_type() == at::kInt && start_pos.scalar_type() == at::kInt,
              "paged_prefill_attention: block_tables, q_starts, q_lens, start_pos must be int32");
  TORCH_CHECK(q_starts.size(0) == q_lens.size(0) && q_lens.size(0) == start_pos.size(0) &&
                  block_tables.size(0) == q_starts.size(0),
              "paged_prefill_attention: one block table, start, length and offset per chunk");
  TORCH_CHECK(k_cache.size(3) == q.size(2) + (int8 ? 4 : 0) && q.size(1) % k_cache.size(2) == 0,
              "paged_prefill_attention: head_dim mismatch (int8 cache rows: head_dim + 4) or H "
              "not a multiple of KVH");
  if (q.scalar_type() == at::kFloat)  // float32 or int8 cache: prefill_attention_f32.cpp
    return paged_prefill_attention_f32(out, q, k_cache, v_cache, block_tables, q_starts, q_lens,
                                       start_pos, scale, window);
  if (int8) return false;  // bf16 queries over int8: attention.py's SDPA path dequantizes
#if FLOTILLA_AVX512_BF16
  if (q.scalar_type() != at::kBFloat16 || out.scalar_type() != at::kBFloat16 ||
      k_cache.scalar_type() != at::kBFloat16 || v_cache.scalar_type() != at::kBFloat16 ||
      q.size(1) / k_cache.size(2) > kQBlock)
    return false;
  switch (q.size(2)) {
#define FLOTILLA_HEAD_DIM(DIM)                                                                 \
  case DIM:                                                                                    \
    prefill<DIM>(out, q, k_cache, v_cache, block_tables, q_starts, q_lens, start_pos, scale,  \
                 window);                                                                      \
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
#else
  (void)scale;
  (void)window;
  return false;
#endif
}

}  // namespace flotilla

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("paged_prefill_attention", &flotilla::paged_prefill_attention);
}
