"""The one-call native forward of a dense Llama-family model (torch.ops.flotilla.dense_layers,
workers/kernels/dense_layers.cpp): which models can take it, the weights it is handed, and the
call. It runs the same kernels as the module path in the same order, so the output is
bit-identical; LlamaForCausalLM uses it for steps of up to DENSE_MAX_ROWS tokens where every
layer's linears are of one native kind -- AMX (bf16), float32 packed at load, or int8 (float32
activations) -- and keeps the module path for everything else (tensor parallelism, experts,
q/k norms, biases past the QKV one, the int8 KV cache, weights of other kinds)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from workers.attention import AttentionMetadata
from workers.linear_methods import AMX_MAX_ROWS, AmxLinear, AmxSwiGLU, F32Linear, Int8Linear

if TYPE_CHECKING:
    from workers.models.llama import LlamaForCausalLM

DENSE_MAX_ROWS = AMX_MAX_ROWS
"""Steps of up to this many tokens take the one call; past it a step is compute-bound and the
module path's per-op overhead is noise."""

AMX, F32_PACKED, INT8 = 0, 1, 2  # dense_layers' `kind`


class DenseWeights(NamedTuple):
    kind: int
    dtype: torch.dtype  # the activations it serves
    small_rows: int  # int8: linear_w8 up to this many rows (Int8Linear.max_rows)
    tensors: list[torch.Tensor]
    windows: list[int]  # each layer's sliding window (0: none), fixed at load


def _kind(methods: list) -> tuple[int, torch.dtype, int] | None:
    """The one kind all of a layer's linear methods share, or None."""
    if all(isinstance(m, AmxLinear) for m in methods[:2] + methods[3:]) and isinstance(
        methods[2], AmxSwiGLU
    ):
        return AMX, torch.bfloat16, 0
    if all(isinstance(m, F32Linear) and m.packed is not None and not m.dot_rows for m in methods):
        return F32_PACKED, torch.float32, 0
    if all(isinstance(m, Int8Linear) and m.gemm for m in methods):
        rows = {m.max_rows for m in methods}
        return (INT8, torch.float32, rows.pop()) if len(rows) == 1 else None
    return None


def dense_weights(model: LlamaForCausalLM) -> DenseWeights | None:
    """The 11 tensors per layer dense_layers takes (norms, QKV bias, then (weight, aux) per
    linear: the packed weight or the int8 weight and its scales), or None when some layer
    needs the module path."""
    a = model.arch
    if a.moe_layers or a.qk_norm or a.o_bias or a.mlp_bias:
        return None
    kind = None
    out: list[torch.Tensor] = []
    empty = torch.empty(0)
    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(m.tp.size > 1 for m in linears):
            return None
        methods = [m.linear_method for m in linears]
        k = _kind(methods)
        if k is None or (kind is not None and k != kind):
            return None
        kind = k
        # AmxLinear adds its own float32 copy of the bias; the others the layer's
        qkv_bias = methods[0].bias if kind[0] == AMX else attn.qkv_proj.bias
        out += [
            layer.input_layernorm.weight,
            layer.post_attention_layernorm.weight,
            empty if qkv_bias is None else qkv_bias,
        ]
        for lin, m in zip(linears, methods, strict=True):
            if isinstance(m, Int8Linear):
                out += [lin.weight, lin.weight_scale]
            else:  # AMX / float32: the packed weight (only the QKV bias exists: above)
                out += [m.packed, empty]
    if kind is None:
        return None
    windows = [layer.self_attn.window or 0 for layer in model.layers.values()]
    return DenseWeights(kind[0], kind[1], kind[2], out, windows)


def dense_layers(
    model: LlamaForCausalLM, x: torch.Tensor, meta: AttentionMetadata, kv_caches
) -> torch.Tensor | None:
    """All of `model`'s layers on hidden states x; None when the kernels declined (no AMX at
    run time, activations of another dtype, or the prefill kernel refusing the dtype), before
    anything but KV rows that the module path rewrites with the same values."""
    attn = next(iter(model.layers.values())).self_attn
    pk = meta.prefill_kernel or (None, None, None, None)
    dense = model._dense
    assert dense is not None
    out = torch.ops.flotilla.dense_layers(
        x,
        dense.tensors,
        kv_caches,
        model.cos[meta.positions].to(x.dtype),
        model.sin[meta.positions].to(x.dtype),
        meta.slot_mapping,
        meta.decode_tables,
        meta.decode_lens,
        *pk,
        attn.num_heads,
        attn.num_kv_heads,
        attn.head_dim,
        model.arch.intermediate_size,
        attn.scale,
        dense.windows,
        model.arch.rms_norm_eps,
        dense.kind,
        dense.small_rows,
    )
    return out if out is not None and out.numel() else None
