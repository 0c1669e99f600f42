"""Graph compilation (model.compile: torch_compile) of the torch path of a dense Llama-family
model: per layer, the dense code before attention (residual add + RMSNorm, QKV projection,
q/k norms, rotary) and after it (o_proj, residual add + RMSNorm, MLP) each run as one
torch.compile'd graph; paged attention, with its Python metadata, stays eager between them.

Recompiles are bounded by marking the token dimension dynamic (maybe_mark_dynamic) on every
input instead of bucketing and padding: the graphs are symbolic in T, so a step of any token
count reuses them and no padded rows are computed. torch still specializes a size of 1, and
the first layer's `before` has no residual yet, so each function compiles at most twice per
variant: `before` 4 graphs (residual or not, T = 1 or T >= 2), `after` 2 (MAX_GRAPHS; tested
over many batch sizes), under torch's recompile_limit (8). Every layer shares those graphs:
the layer is an argument, and its parameters are graph inputs (torch's inlining of
nn.Modules), not constants. Bucketing would have bounded them too, at the cost of computing
padded rows and of one graph per bucket.

It wraps the torch path only: the native CPU kernels are custom ops with in-place writes and
already fuse what inductor would (model_runner refuses or skips it there).
"""

from __future__ import annotations

import logging
import types
from typing import TYPE_CHECKING

import torch

from workers.attention import AttentionMetadata, paged_attention

if TYPE_CHECKING:
    from workers.models.llama import LlamaForCausalLM, LlamaLayer

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")
MAX_GRAPHS = {"before": 4, "after": 2}
"""Graphs per compiled function at most (see the module's docstring)."""


def _before(layer: LlamaLayer, x, residual, cos, sin):
    if residual is None:
        residual, x = x, layer.input_layernorm(x)
    else:
        x, residual = layer.input_layernorm.add(x, residual)
    attn = layer.self_attn
    q, k, v = attn.qkv_rope(attn.qkv_proj(x), cos, sin)
    return q, k, v, residual


def _after(layer: LlamaLayer, o, residual):
    x = layer.self_attn.o_proj(o.view(o.shape[0], -1))
    x, residual = layer.post_attention_layernorm.add(x, residual)
    return layer.mlp(x), residual


def _own(f):
    return types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__)


def why_not(model: LlamaForCausalLM) -> str | None:
    """Why this model cannot take the compiled path, or None when it can."""
    if model.arch.moe_layers:
        return "mixture-of-experts layers route tokens with data-dependent shapes"
    for m in model.modules():
        if getattr(m, "native", False):
            return "native CPU kernels are active (custom in-place ops); use model.kernels=torch"
        tp = getattr(m, "tp", None)
        if tp is not None and tp.size > 1:
            return f"tensor parallelism (tp={tp.size}) all-reduces inside the layers"
    return None


def _dynamic_tokens(*ts: torch.Tensor | None) -> None:
    for t in ts:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)


class CompiledLayers:
    """The layer loop of LlamaForCausalLM.forward with its dense parts compiled."""

    def __init__(self, backend: str = "inductor"):
        if backend not in BACKENDS:
            raise ValueError(f"compile backend {backend!r}: one of {', '.join(BACKENDS)}")
        self.backend = backend
        # Own copies of the functions: torch keys its graph cache (and recompile_limit) on the
        # code object, so another model in the process must not share (or use up) ours.
        self.functions = {"before": _own(_before), "after": _own(_after)}
        # fullgraph: a graph break would silently split the graph (and multiply recompiles)
        opts = dict(backend=backend, fullgraph=True)
        self.before = torch.compile(self.functions["before"], **opts)
        self.after = torch.compile(self.functions["after"], **opts)

    def graphs(self) -> dict[str, int]:
        """Graphs compiled so far per function (at most MAX_GRAPHS)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {k: len(_debug_get_cache_entry_list(f.__code__)) for k, f in self.functions.items()}

    def __call__(
        self, model: LlamaForCausalLM, x, cos, sin, meta: AttentionMetadata, kv_caches
    ) -> torch.Tensor:
        residual = None
        for layer, cache in zip(model.layers.values(), kv_caches, strict=True):
            _dynamic_tokens(x, residual, cos, sin)
            q, k, v, residual = self.before(layer, x, residual, cos, sin)
            attn = layer.self_attn
            o = paged_attention(q, k, v, cache, meta, attn.scale, attn.window)
            _dynamic_tokens(o, residual)
            x, residual = self.after(layer, o, residual)
        return x + residual
