// paged_decode_attention: one query token per sequence, keys/values read in place from the
// block-paged KV cache of the query's dtype (no gather into a padded copy). The layout, the
// paths (AVX-512 / AVX2 flash-decoding, three plain passes elsewhere) and the work split are
// decode_attention.h's, shared with the int8 cache's op (paged_attention_int8.cpp):
//
//   q            [n, H, D]                       contiguous, float32 / bfloat16 / float16
//   k_cache      [num_blocks, block_size, KVH, D] contiguous, same dtype as q (v_cache alike)
//   block_tables [n, max_blocks] int32, context_lens [n] int32, out [n, H, D]
#include "cache_rows.h"
#include "common.h"
#include "decode_attention.h"

namespace flotilla {

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
  FLOTILLA_DISPATCH(q.scalar_type(), "paged_decode_attention",
                    decode_attention_any<scalar_t, PlainRows<scalar_t>>(
                        out, q, k_cache, v_cache, block_tables, context_lens, scale, window));
}

}  // namespace flotilla

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("paged_decode_attention", &flotilla::paged_decode_attention);
}
