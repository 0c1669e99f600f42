// A dense Llama-family model's decoder layers in one call, for steps of up to a few hundred
// tokens (decode batches and small mixed steps).
//
// The Python path dispatches ~15 torch ops per layer through nn.Modules: ~5-10 ms per step of
// interpreter time on a 30-layer model (8-9 ms of a 25-41 ms batch-1 step on a Zen 1 EPYC),
// during which the other core waits. This runs the same kernels (the same functions, in the
// same order, on the same buffers) from C++, so its output is bit-identical to the module
// path, which stays the reference and the fallback (tensor parallelism, experts, q/k norms,
// biases other than the QKV bias, the int8 KV cache, other dtypes).
//
// The linears are one kind for the whole model (`kind`), as workers/linear_methods.py chose:
//   0 AMX (bf16): amx_linear; gate|up and SiLU-and-mul fused by amx_swiglu
//   1 float32 packed at load: linear_f32_packed
//   2 int8 weights (per-channel or group-wise scales in `aux`): linear_w8 up to `small_rows`
//     rows, linear_w8_gemm past it (Int8Linear's order); float32 activations only
// Weights: kPerLayer tensors per layer (see dense_weights in workers/models/native_forward.py):
//   input norm, post-attention norm, QKV bias (or empty), then (weight, aux) for qkv, o,
//   gate|up and down; aux is the int8 scales, empty otherwise.
// Per layer:
//   h = rmsnorm(x) (first layer) | fused residual add + rmsnorm
//   qkv = h W_qkv^T (+ b); rotary on q (into a contiguous copy) and k, k and v -> the paged
//   cache, in one pass (rope_qkv_cache: the same bits as the module path's three ops)
//   attention: decode rows by paged_decode_attention, prefill chunks by paged_prefill_attention
//   x = attn W_o^T; residual add + rmsnorm; silu(x W_g^T) * (x W_u^T); x = . W_down^T
// and the last layer's x + residual is returned (what the next pipeline stage receives).

#include "common.h"

namespace flotilla {

// dense_layers' `kind`, as workers/models/native_forward.py numbers it
enum DenseKind : int64_t { kAmx = 0, kF32Packed = 1, kInt8 = 2 };

at::Tensor dense_layers(const at::Tensor& x_in, at::TensorList weights, at::TensorList kv_caches,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                        const c10::optional<at::Tensor>& decode_tables,
                        const c10::optional<at::Tensor>& decode_lens,
                        const c10::optional<at::Tensor>& prefill_tables,
                        const c10::optional<at::Tensor>& q_starts,
                        const c10::optional<at::Tensor>& q_lens,
                        const c10::optional<at::Tensor>& start_pos, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, double scale,
                        at::IntArrayRef windows, double eps, int64_t kind, int64_t small_rows) {
  constexpr int64_t kPerLayer = 11;
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kPerLayer * L &&
                  static_cast<int64_t>(windows.size()) == L,
              "dense_layers: 11 weights and one window per layer, one KV cache per layer");
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_contiguous(), "dense_layers: x must be [T, hidden]");
  TORCH_CHECK(kind == kAmx || kind == kF32Packed || kind == kInt8, "dense_layers: kind 0, 1 or 2");
  const bool decodes = decode_tables.has_value() && decode_tables->defined();
  const bool prefills = prefill_tables.has_value() && prefill_tables->defined();
  TORCH_CHECK(!decodes || (decode_lens.has_value() && decode_lens->defined()),
              "dense_layers: decode_tables without decode_lens");
  TORCH_CHECK(!prefills || (q_starts && q_lens && start_pos),
              "dense_layers: prefill_tables without q_starts / q_lens / start_pos");
  if (kind == kAmx) {
#if FLOTILLA_AMX
    if (!amx_ready()) return at::Tensor();
#else
    return at::Tensor();  // no AMX kernel in this build: the caller takes the module path
#endif
  } else if (x_in.scalar_type() != at::kFloat) {
    return at::Tensor();  // the float32 and int8 kinds serve float32 activations only
  }
  const int64_t T = x_in.size(0), H = num_heads, KVH = num_kv_heads, D = head_dim;
  const int64_t nd = decodes ? decode_tables->size(0) : 0;
  const auto linear = [&](const at::Tensor& in, const at::Tensor& w, const at::Tensor& aux,
                          const at::Tensor& bias, int64_t n) {
    at::Tensor out = in.new_empty({T, n});
    const c10::optional<at::Tensor> b =
        bias.defined() && bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
    switch (kind) {
      case kAmx:
        TORCH_CHECK(amx_linear(out, in, w, b), "dense_layers: the AMX linear declined");
        return out;
      case kF32Packed:
        TORCH_CHECK(linear_f32_packed(out, in, w, b), "dense_layers: linear_f32_packed declined");
        return out;
      default:  // (both take what dense_weights admits: float32, G a multiple of 16)
        TORCH_CHECK(T <= small_rows ? linear_w8(out, in, w, aux, b)
                                    : linear_w8_gemm(out, in, w, aux, b),
                    "dense_layers: the int8 linear declined");
        return out;
    }
  };
  at::Tensor x = x_in, residual;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* w = weights.data() + kPerLayer * i;
    const at::Tensor &in_norm = w[0], &post_norm = w[1], &qkv_b = w[2], &qkv_w = w[3],
                     &qkv_aux = w[4], &o_w = w[5], &o_aux = w[6], &gu_w = w[7], &gu_aux = w[8],
                     &down_w = w[9], &down_aux = w[10];
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
    at::Tensor qkv = linear(h, qkv_w, qkv_aux, qkv_b, nq + 2 * nkv);
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
    at::Tensor o = linear(attn.view({T, nq}), o_w, o_aux, at::Tensor(), hidden);
    fused_add_rms_norm(o, residual, post_norm, eps);
    at::Tensor act = x.new_empty({T, intermediate});
    if (kind == kAmx) {
      TORCH_CHECK(amx_swiglu(act, o, gu_w), "dense_layers: the AMX linear declined");
    } else {
      silu_and_mul(act, linear(o, gu_w, gu_aux, at::Tensor(), 2 * intermediate));
    }
    x = linear(act, down_w, down_aux, at::Tensor(), hidden);
  }
  return L ? x.add(residual) : x;
}

}  // namespace flotilla

TORCH_LIBRARY_IMPL(flotilla, CPU, m) { m.impl("dense_layers", &flotilla::dense_layers); }
