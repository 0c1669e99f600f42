// A dense Llama-family model's decoder layers in one call, for steps of up to a few hundred
// tokens on an AMX CPU (decode batches and small mixed steps).
//
// The Python path dispatches ~15 torch ops per layer through nn.Modules: ~5-10 ms per step of
// interpreter time on a 30-layer model, during which the other core waits. This runs the same
// kernels (the same functions, in the same order, on the same buffers) from C++, so its output
// is bit-identical to the module path, which stays the reference and the fallback (tensor
// parallelism, experts, q/k norms, biases other than the QKV bias, other dtypes and CPUs).
//
// Per layer (weights: 7 tensors each; gate|up packed by amx_pack_swiglu):
//   h = rmsnorm(x) (first layer) | fused residual add + rmsnorm
//   qkv = h W_qkv^T (+ b); rotary on q (into a contiguous copy) and k, k and v -> the paged
//   cache, in one pass (rope_qkv_cache: the same bits as the module path's three ops)
//   attention: decode rows by paged_decode_attention, prefill chunks by paged_prefill_attention
//   x = attn W_o^T; residual add + rmsnorm; silu(x W_g^T) * (x W_u^T) (one call, amx_swiglu);
//   x = . W_down^T
// and the last layer's x + residual is returned (what the next pipeline stage receives).

#include "common.h"

namespace flotilla {

at::Tensor dense_layers(const at::Tensor& x_in, at::TensorList weights, at::TensorList kv_caches,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                        const c10::optional<at::Tensor>& decode_tables,
                        const c10::optional<at::Tensor>& decode_lens,
                        const c10::optional<at::Tensor>& prefill_tables,
                        const c10::optional<at::Tensor>& q_starts,
                        const c10::optional<at::Tensor>& q_lens,
                        const c10::optional<at::Tensor>& start_pos, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, double scale,
                        at::IntArrayRef windows, double eps) {
  constexpr int64_t kPerLayer = 7;
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kPerLayer * L &&
                  static_cast<int64_t>(windows.size()) == L,
              "dense_layers: 7 weights and one window per layer, one KV cache per layer");
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_contiguous(), "dense_layers: x must be [T, hidden]");
  const bool decodes = decode_tables.has_value() && decode_tables->defined();
  const bool prefills = prefill_tables.has_value() && prefill_tables->defined();
  TORCH_CHECK(!decodes || (decode_lens.has_value() && decode_lens->defined()),
              "dense_layers: decode_tables without decode_lens");
  TORCH_CHECK(!prefills || (q_starts && q_lens && start_pos),
              "dense_layers: prefill_tables without q_starts / q_lens / start_pos");
#if FLOTILLA_AMX
  if (!amx_ready()) return at::Tensor();
#else
  return at::Tensor();  // the linears here are the AMX kernel's: the caller takes the module path
#endif
  const int64_t T = x_in.size(0), H = num_heads, KVH = num_kv_heads, D = head_dim;
  const int64_t nd = decodes ? decode_tables->size(0) : 0;
  const auto linear = [&](const at::Tensor& in, const at::Tensor& wp, const at::Tensor& bias,
                          int64_t n) {
    at::Tensor out = in.new_empty({T, n});
    const c10::optional<at::Tensor> b =
        bias.defined() && bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
    TORCH_CHECK(amx_linear(out, in, wp, b), "dense_layers: the AMX linear declined");
    return out;
  };
  at::Tensor x = x_in, residual;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* w = weights.data() + kPerLayer * i;
    const at::Tensor &in_norm = w[0], &qkv_w = w[1], &qkv_b = w[2], &o_w = w[3],
                     &post_norm = w[4], &gu_w = w[5], &down_w = w[6];
    at::Tensor h;
    if (!residual.defined()) {
      residual = x;
      h = x.new_empty(x.sizes());
      rms_norm(h, x, in_norm, eps);
    } else {
      h = x;
      fused_add_rms_norm(h, residual, in_norm, eps);
    }
    const int64_t nq = H * D, nkv = KVH * D;
    at::Tensor qkv = linear(h, qkv_w, qkv_b, nq + 2 * nkv);
    const at::Tensor& cache = kv_caches[i];
    at::Tensor kc = cache.select(0, 0), vc = cache.select(0, 1);
    at::Tensor qc = x.new_empty({T, H, D});
    rope_qkv_cache(qc, kc, vc, qkv, cos, sin, slots);  // rotary, KV write and q copy in one pass
    at::Tensor attn = x.new_empty({T, H, D});
    if (nd)
      paged_decode_attention(attn.narrow(0, 0, nd), qc.narrow(0, 0, nd), kc, vc, *decode_tables,
                             *decode_lens, scale, windows[i]);
    if (prefills && !paged_prefill_attention(attn, qc, kc, vc, *prefill_tables, *q_starts,
                                             *q_lens, *start_pos, scale, windows[i])) {
      // declines by dtype / head size / CPU, before writing: the same for every layer, so
      // only the first can get here; the module path redoes the step (the KV rows it wrote
      // are rewritten with the same values)
      TORCH_CHECK(i == 0, "dense_layers: the prefill kernel declined after layer 0");
      return at::Tensor();
    }
    const int64_t hidden = x.size(1);
    at::Tensor o = linear(attn.view({T, nq}), o_w, at::Tensor(), hidden);
    fused_add_rms_norm(o, residual, post_norm, eps);
    at::Tensor act = x.new_empty({T, intermediate});
    TORCH_CHECK(amx_swiglu(act, o, gu_w), "dense_layers: the AMX linear declined");
    x = linear(act, down_w, at::Tensor(), hidden);
  }
  return L ? x.add(residual) : x;
}

}  // namespace flotilla

TORCH_LIBRARY_IMPL(flotilla, CPU, m) { m.impl("dense_layers", &flotilla::dense_layers); }
