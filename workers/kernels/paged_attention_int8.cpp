// The int8 KV cache's native ops (workers/kv_int8.py has the layout and why):
//
//   write_kv_cache_int8:         quantizes k, v [T, KVH, D] (float32 / bfloat16 / float16) into
//                                their cache slots, one symmetric scale per (slot, head) row.
//   paged_decode_attention_int8: paged_decode_attention over that cache: the same driver and
//                                loops (decode_attention.h) with the int8 row format
//                                (cache_rows.h: Int8Rows).
//
//   k_cache, v_cache [num_blocks, block_size, KVH, D + 4] int8: each (slot, head) row is D int8
//                    values, then its float32 scale's 4 bytes (unaligned: read by memcpy)
//   q, out [n, H, D] float32 / bfloat16 / float16; block_tables [n, max_blocks] and
//   context_lens [n] int32, scale, window: as paged_decode_attention's.
//
// Decode: s_t = scale_k[t] * (q . k_t) -- the row's scale applied once, to the int8 dot
// product -- an online softmax in float32, out = sum_t (p_t * scale_v[t]) v_t / sum_t p_t. The
// int8 values are widened to float32 in registers (AVX-512: 16 at a time, head dim % 16 = 0;
// AVX2 + FMA: 8, head dim % 8 = 0), in one pass over a sequence's keys and values; other head
// dims and builds without either ISA take decode_attention.h's three plain passes. (The names
// live in namespace kv8: the target-build test compiles every .cpp as one unit.)
#include "cache_rows.h"
#include "common.h"
#include "decode_attention.h"

namespace flotilla {
namespace kv8 {

constexpr int64_t kScaleBytes = Int8Rows::kTail;

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
                    decode_attention_any<scalar_t, Int8Rows>(out, q, k_cache, v_cache,
                                                             block_tables, context_lens, scale,
                                                             window));
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
