"""The one-call native forward of a dense Llama-family model (torch.ops.flotilla.dense_layers,
workers/kernels/dense_layers.cpp): which models can take it, the weights it is handed, and the
call. It runs the same kernels as the module path in the same order, so the output is
bit-identical; LlamaForCausalLM uses it for steps of up to AMX_MAX_ROWS tokens on AMX CPUs and
keeps the module path for everything else (tensor parallelism, experts, q/k norms, biases past
the QKV one, weights not packed for the AMX kernel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from workers.attention import AttentionMetadata
from workers.linear_methods import AmxLinear, AmxSwiGLU

if TYPE_CHECKING:
    from workers.models.llama import LlamaForCausalLM


def dense_weights(model: LlamaForCausalLM) -> list[torch.Tensor] | None:
    """The 7 tensors per layer dense_layers takes, or None when some layer needs the module
    path."""
    a = model.arch
    if a.moe_layers or a.qk_norm or a.o_bias or a.mlp_bias:
        return None
    out: list[torch.Tensor] = []
    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.down_proj)
        if any(not isinstance(m.linear_method, AmxLinear) or m.tp.size > 1 for m in linears):
            return None
        gate_up = mlp.gate_up_proj
        if not isinstance(gate_up.linear_method, AmxSwiGLU) or gate_up.tp.size > 1:
            return None
        qkv, o, down = (m.linear_method for m in linears)
        out += [
            layer.input_layernorm.weight,
            qkv.packed,
            torch.empty(0) if qkv.bias is None else qkv.bias,
            o.packed,
            layer.post_attention_layernorm.weight,
            gate_up.linear_method.packed,
            down.packed,
        ]
    return out


def dense_layers(
    model: LlamaForCausalLM, x: torch.Tensor, meta: AttentionMetadata, kv_caches
) -> torch.Tensor | None:
    """All of `model`'s layers on hidden states x; None when the kernels declined (no AMX at
    run time, or the prefill kernel refusing the dtype), before anything but KV rows that the
    module path rewrites with the same values."""
    attn = next(iter(model.layers.values())).self_attn
    pk = meta.prefill_kernel or (None, None, None, None)
    out = torch.ops.flotilla.dense_layers(
        x,
        model._dense,
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
        [layer.self_attn.window or 0 for layer in model.layers.values()],
        model.arch.rms_norm_eps,
    )
    return out if out is not None and out.numel() else None
