// Shared by the CPU kernels of workers/kernels: a call-free exp, the AVX-512 bf16 helpers, the
// AMX tile set-up, work balancing and the ops' declarations. The ISA path macros
// (FLOTILLA_AVX512, ...) and the dtype plumbing (Raw, rnd, FLOTILLA_DISPATCH) come from
// parallel/kernels/isa.h and dtypes.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

// (from parallel/kernels: one definition of the ISA paths and the dtype plumbing for both
// native libraries; the build puts that folder on the include path)
#include "dtypes.h"
#include "isa.h"

namespace flotilla {

// exp(x) for x <= 0 (scores minus their max): 2^(x log2 e) split into 2^round and 2^frac,
// frac in [-0.5, 0.5] by a degree-6 Taylor polynomial (relative error ~1e-7). Written without
// calls so that the compiler vectorizes the softmax loop. kExpPoly: the polynomial's
// coefficients, highest degree first (Horner).
constexpr float kExpPoly[7] = {1.5403530393381608e-4f, 1.3333558146428443e-3f,
                               9.6181291076284772e-3f, 5.5504108664821580e-2f,
                               2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};

inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.4426950408889634f;
  // round to nearest by the 1.5 * 2^23 trick: no libm call, so the loop vectorizes
  const float r = (t + 12582912.0f) - 12582912.0f;
  const float f = t - r;
  float p = kExpPoly[0];
  for (int i = 1; i < 7; ++i) p = p * f + kExpPoly[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(r) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return p * s;
}

#if FLOTILLA_AVX2
// exp_nonpos for 8 lanes (the same split and polynomial).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpPoly[i]));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

#if FLOTILLA_AVX512
// exp_nonpos for 16 lanes at once (same split and polynomial, fused multiply-adds).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpPoly[i]));
  return _mm512_scalef_ps(p, r);
}

// 16 bf16 values (bit patterns) to float32 and back; the store rounds to nearest even and keeps
// denormals, as Raw<c10::BFloat16>::store (VCVTNEPS2BF16 would flush them).
inline __m512 bf16x16_load(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512i bf16x16_bits(__m512 x) {  // rounded bf16 in the high half of each lane
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc00000));
}
inline __m512 bf16x16_round(__m512 x) { return _mm512_castsi512_ps(bf16x16_bits(x)); }
// x already holds bf16 values (e.g. from bf16x16_round): the store needs no rounding
inline void bf16x16_store_exact(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16)));
}
inline void bf16x16_store(uint16_t* p, __m512 x) { bf16x16_store_exact(p, bf16x16_round(x)); }
#if FLOTILLA_AVX512_BF16
// The same rounding by AVX512-BF16's conversion, one instruction, where it agrees: it flushes
// denormals and quiets NaNs its own way, so a vector holding either takes bf16x16_bits.
inline __m256i bf16x16_cvt(__m512 x) {
  const __mmask16 odd = _mm512_fpclass_ps_mask(x, 0x01 | 0x80 | 0x20);  // QNaN, SNaN, denormal
  if (__builtin_expect(odd != 0, 0))
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16x16_bits(x), 16));
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
}
inline __m512 bf16x16_round_fast(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16_cvt(x)), 16));
}
inline void bf16x16_store_fast(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16x16_cvt(x));
}
#else
inline __m512 bf16x16_round_fast(__m512 x) { return bf16x16_round(x); }
inline void bf16x16_store_fast(uint16_t* p, __m512 x) { bf16x16_store(p, x); }
#endif

// bf16(silu(gate)) * up in float32 (round to bf16 when storing), for gate and up holding bf16
// values: transformers' LlamaMLP in bf16 (silu rounded to the dtype, then the product).
inline __m512 silu_mul16(__m512 gate, __m512 up) {
  const __m512 e =
      exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate), _mm512_set1_ps(88.0f)));
  const __m512 silu = bf16x16_round_fast(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
  return _mm512_mul_ps(silu, up);
}
#endif

// AMX tile state: Linux hands it out per process on request (oneDNN asks too; asking twice
// is harmless), and refuses where the CPU or kernel has none. Defined for every x86 build so
// that build_info can report it whatever the library was compiled for.
inline bool amx_ready() {
#if FLOTILLA_X86 && defined(__linux__) && defined(SYS_arch_prctl)
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#if FLOTILLA_AMX
// The tile configuration is per thread: a kernel loads its own at the start of each parallel
// chunk and releases the tiles at its end.

// All eight tiles as 16 rows x 64 bytes (16 x 16 float32, or 16 x 32 bf16).
inline void amx_config_16x64() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
  } cfg;
  _tile_loadconfig(&cfg);
}
#endif

// Work items 0 .. costs.size() - 1 spread over the threads (at most one list per item):
// longest first onto the least-loaded thread. Returns each thread's item indices; run them
// with at::parallel_for(0, lists.size(), 1, ...).
inline std::vector<std::vector<int64_t>> balance_by_cost(const std::vector<int64_t>& costs) {
  const int64_t n = static_cast<int64_t>(costs.size());
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  std::vector<std::vector<int64_t>> lists(nt);
  std::vector<int64_t> load(nt, 0);
  for (const int64_t i : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    lists[t].push_back(i);
    load[t] += costs[i];
  }
  return lists;
}

// Work claimed a chunk at a time from a shared counter. A static split (at::parallel_for's,
// or balance_by_cost's lists) makes a call wait for its slowest thread's whole share; on a
// busy machine -- 2 cores shared with a server's router, proxy and Ray processes -- the OS
// preempts one thread mid-call often, and the other then idles at the join for the rest of the
// preempted share. Claimed dynamically, the running threads take what is left: a preemption
// delays only the chunk in hand. (Which thread computes an item never changes its bits.)
class WorkQueue {
 public:
  explicit WorkQueue(int64_t n, int64_t chunk = 1) : n_(n), chunk_(std::max<int64_t>(1, chunk)) {}
  // The next chunk [b, e); false once every item is claimed.
  bool next(int64_t& b, int64_t& e) {
    b = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (b >= n_) return false;
    e = std::min(n_, b + chunk_);
    return true;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_, chunk_;
};

// Runs body(q) once on each of up to `max_threads` intra-op threads, which share the queue q
// (per-thread set-up goes before the claim loop in body).
template <class Body>
inline void parallel_claims(WorkQueue& q, int64_t max_threads, const Body& body) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), max_threads));
  if (nt == 1) return body(q);
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { body(q); });
}

// f(b, e) over [0, n) in chunks of `chunk`, claimed dynamically by the intra-op threads.
template <class F>
inline void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  WorkQueue q(n, chunk);
  parallel_claims(q, (n + chunk - 1) / chunk, [&](WorkQueue& wq) {
    int64_t b, e;
    while (wq.next(b, e)) f(b, e);
  });
}

// Item indices longest first: claimed one at a time in this order (greedy list scheduling),
// they balance like balance_by_cost and a preempted thread holds back only its current item.
inline std::vector<int64_t> order_by_cost(const std::vector<int64_t>& costs) {
  std::vector<int64_t> order(costs.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  return order;
}

// Prefill attention's work (prefill_attention.cpp, bf16; prefill_attention_f32.cpp, float32 over
// float32 or int8 caches): tasks of (chunk, KV head, up to `span` positions [p0, p1)), each
// costing ~ (keys its positions see + `overhead`) x positions (`overhead`: a row's fixed work
// in key units), spread over the threads by balance_by_cost. C chunks of q_lens[c] positions
// after start_pos[c] cached ones; window > 0 caps the keys a position sees.
struct PrefillSpan {
  int64_t chunk, head, p0, p1;
};

struct PrefillWork {
  std::vector<PrefillSpan> spans;
  std::vector<std::vector<int64_t>> bins;  // each thread's span indices (balance_by_cost)
};

inline PrefillWork prefill_spans(int64_t C, const int32_t* q_lens, const int32_t* start_pos,
                                 int64_t KVH, int64_t span, int64_t window, int64_t overhead) {
  PrefillWork w;
  std::vector<int64_t> costs;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p0 = 0; p0 < q_lens[c]; p0 += span) {
      const int64_t p1 = std::min<int64_t>(q_lens[c], p0 + span);
      int64_t keys = start_pos[c] + p1;
      if (window > 0) keys = std::min<int64_t>(keys, window + p1 - p0);
      for (int64_t h = 0; h < KVH; ++h) {
        w.spans.push_back({c, h, p0, p1});
        costs.push_back((keys + overhead) * (p1 - p0));
      }
    }
  w.bins = balance_by_cost(costs);
  return w;
}

// The layout of int8 weight scales (workers/quantization.py) for w [N, K]: 0 for [N] (one per
// output row), G for [N, K / G] (one per row and group of G consecutive columns), -1 for any
// other shape.
inline int64_t w8_group_size(const at::Tensor& scales, int64_t N, int64_t K) {
  if (scales.dim() == 1) return scales.size(0) == N ? 0 : -1;
  if (scales.dim() != 2 || scales.size(0) != N || scales.size(1) == 0 || K == 0 ||
      K % scales.size(1) != 0)
    return -1;
  return K / scales.size(1);
}

// The ops, for kernels that call each other (dense_layers.cpp); defined in cpu_ops.cpp,
// paged_attention.cpp, prefill_attention.cpp, prefill_attention_f32.cpp, gemm_amx.cpp,
// gemm_f32.cpp, gemm_w8.cpp.
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
void rotary_embedding(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin);
void silu_and_mul(at::Tensor out, const at::Tensor& x);
void rope_qkv_cache(at::Tensor q_out, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& qkv,
                    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots);
void write_kv_cache(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& slots);
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, int64_t window);
bool paged_prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& q_starts, const at::Tensor& q_lens,
                             const at::Tensor& start_pos, double scale, int64_t window);
bool paged_prefill_attention_f32(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& q_starts, const at::Tensor& q_lens,
                                 const at::Tensor& start_pos, double scale, int64_t window);
bool amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& wp,
                const c10::optional<at::Tensor>& bias);
bool amx_swiglu(at::Tensor out, const at::Tensor& x, const at::Tensor& wp);
bool linear_f32_packed(at::Tensor out, const at::Tensor& x, const at::Tensor& wp,
                       const c10::optional<at::Tensor>& bias);
bool linear_w8(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
               const c10::optional<at::Tensor>& bias);
bool linear_w8_gemm(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& scales, const c10::optional<at::Tensor>& bias);

}  // namespace flotilla
