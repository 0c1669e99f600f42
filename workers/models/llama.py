"""The Llama family over a paged KV cache: Llama 2/3, SmolLM2, Qwen2 (QKV bias), Qwen3 (q/k
norm), Mistral (sliding window), and their mixture-of-experts siblings Mixtral, Qwen2-MoE
(shared expert) and Qwen3-MoE. One definition; the differences are fields of `LlamaArch`.

Numerics follow the Hugging Face reference: RMSNorm in float32 then cast back, rotary tables
from transformers' own rope-init functions, residual adds in the model dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import (
    SINGLE,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
)
from parallel.moe import EP_SINGLE, EPGroup, FusedExperts, route
from workers.attention import AttentionMetadata, paged_attention
from workers.kernels.dispatch import KernelPlan
from workers.linear_methods import AmxSwiGLU, attach_linear_methods
from workers.models import native_forward
from workers.models.rope import apply_rope, rope_tables

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe")
_QKV_BIAS = ("qwen2", "qwen2_moe")
_QK_NORM = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class LlamaArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    windows: tuple[int | None, ...]  # sliding window per layer (None = full attention)
    max_position_embeddings: int
    # Mixture of experts (num_experts == 0: dense).
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    renormalize: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: frozenset[int] = frozenset()

    @classmethod
    def from_hf(cls, cfg) -> LlamaArch:
        mt = cfg.model_type
        if mt not in SUPPORTED:
            raise ValueError(f"model_type={mt!r} is not supported (supported: {', '.join(SUPPORTED)})")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        window = getattr(cfg, "sliding_window", None)
        if mt in ("mistral", "mixtral") and window:
            windows = (window,) * cfg.num_hidden_layers
        elif getattr(cfg, "layer_types", None) and window:
            windows = tuple(window if t == "sliding_attention" else None for t in cfg.layer_types)
        else:
            windows = (None,) * cfg.num_hidden_layers
        return cls(
            model_type=mt,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            qkv_bias=True if mt in _QKV_BIAS else attn_bias,
            o_bias=False if mt in _QKV_BIAS else attn_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=mt in _QK_NORM,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            windows=windows,
            max_position_embeddings=cfg.max_position_embeddings,
            **_moe_fields(cfg),
        )


def check_parallel(arch: LlamaArch, tp: int, pp: int, ep: int) -> None:
    """Raise ValueError naming the numbers when a parallel layout cannot hold this model."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"{arch.model_type}: {msg}")

    need(arch.num_heads % tp == 0, f"tp={tp} does not divide {arch.num_heads} attention heads")
    kv = arch.num_kv_heads
    need(
        kv % tp == 0 or tp % kv == 0,
        f"tp={tp} and {kv} key/value heads: one must divide the other",
    )
    dense = set(range(arch.num_layers)) - arch.moe_layers
    if dense:
        need(
            arch.intermediate_size % tp == 0,
            f"tp={tp} does not divide the intermediate size {arch.intermediate_size}",
        )
    if arch.shared_expert_intermediate_size:
        need(
            arch.shared_expert_intermediate_size % tp == 0,
            f"tp={tp} does not divide the shared expert size {arch.shared_expert_intermediate_size}",
        )
    if ep > 1:
        need(arch.num_experts > 0, f"ep={ep} but the model has no experts")
        need(arch.num_experts % ep == 0, f"ep={ep} does not divide {arch.num_experts} experts")
    elif arch.num_experts:
        need(
            arch.moe_intermediate_size % tp == 0,
            f"tp={tp} does not divide the expert intermediate size {arch.moe_intermediate_size}",
        )
    need(pp <= arch.num_layers, f"pp={pp} is larger than the {arch.num_layers} layers")


def _moe_fields(cfg) -> dict:
    mt = cfg.model_type
    if mt == "mixtral":
        return dict(
            num_experts=cfg.num_local_experts,
            top_k=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.intermediate_size,
            renormalize=True,
            moe_layers=frozenset(range(cfg.num_hidden_layers)),
        )
    if mt in ("qwen2_moe", "qwen3_moe"):
        experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        skip = set(getattr(cfg, "mlp_only_layers", None) or [])
        return dict(
            num_experts=experts,
            top_k=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            renormalize=bool(cfg.norm_topk_prob),
            shared_expert_intermediate_size=getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
            moe_layers=frozenset(
                i for i in range(cfg.num_hidden_layers) if i not in skip and (i + 1) % step == 0
            ),
        )
    return {}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    native = False  # set by LlamaForCausalLM.use_kernels

    def _native_ok(self, *xs: torch.Tensor) -> bool:
        return self.native and all(x.is_contiguous() and x.dtype == self.weight.dtype for x in xs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native_ok(x):
            out = torch.empty_like(x)
            torch.ops.flotilla.rms_norm(out, x, self.weight, self.eps)
            return out
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """residual += x; return (norm(residual), residual). Native: both in place, one pass."""
        if self._native_ok(x, residual):
            torch.ops.flotilla.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        residual = residual + x
        return self(residual), residual


class LlamaAttention(nn.Module):
    def __init__(self, arch: LlamaArch, window: int | None, tp: TPGroup):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.qkv_bias, tp
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = arch.head_dim
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, arch.o_bias, tp)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm
        self.window = window
        self.scale = arch.head_dim**-0.5
        self.native = False

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        if (
            self.native
            and meta.native
            and not self.qk_norm
            and qkv.dtype == cos.dtype == kv_cache.dtype  # (not the int8 cache: it quantizes)
        ):
            # rotary on q (into the contiguous copy the kernels read) and k, and the KV-cache
            # write, in one pass: the same bits as the three ops below (tested)
            q = qkv.new_empty(T, self.num_heads, self.head_dim)
            torch.ops.flotilla.rope_qkv_cache(
                q, kv_cache[0], kv_cache[1], qkv, cos.view(T, -1), sin.view(T, -1),
                meta.slot_mapping,
            )
            o = paged_attention(q, None, None, kv_cache, meta, self.scale, self.window)
            return self.o_proj(o.view(T, -1))
        q, k, v = self.qkv_rope(qkv, cos, sin)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale, self.window)
        return self.o_proj(o.view(T, -1))

    def qkv_rope(self, qkv: torch.Tensor, cos, sin) -> tuple[torch.Tensor, ...]:
        """q, k, v [T, heads, D] of the QKV projection's output, q/k normed and rotated: the
        dense part before attention (workers/models/compiled.py compiles it)."""
        T = qkv.shape[0]
        q, k, v = qkv.split(self.qkv_proj.sizes, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.native and q.dtype == cos.dtype:
            cos2, sin2 = cos.view(T, -1), sin.view(T, -1)
            torch.ops.flotilla.rotary_embedding(q, cos2, sin2)  # in place
            torch.ops.flotilla.rotary_embedding(k, cos2, sin2)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v


class LlamaMLP(nn.Module):
    def __init__(self, arch: LlamaArch, tp: TPGroup, intermediate: int | None = None):
        super().__init__()
        n = intermediate or arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [n, n], arch.mlp_bias, tp)
        self.down_proj = RowParallelLinear(n, arch.hidden_size, arch.mlp_bias, tp)
        # gate|up may be packed for amx_swiglu (its tiles pair 16 gate with 16 up columns)
        self.fused_swiglu = self.gate_up_proj.local_sizes[0] % 16 == 0 and not arch.mlp_bias

    native = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        method = self.gate_up_proj.linear_method
        if isinstance(method, AmxSwiGLU):
            # gate|up linear and SiLU-and-mul in one AMX call (bit-identical to the two)
            act = method.swiglu(x, self.gate_up_proj.local_sizes[0])
            if act is not None:
                return self.down_proj(act)
        gate_up = self.gate_up_proj(x)
        if self.native and gate_up.is_contiguous():
            act = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
            torch.ops.flotilla.silu_and_mul(act, gate_up)
            return self.down_proj(act)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    """Router + experts (+ a sigmoid-gated shared expert for Qwen2-MoE)."""

    def __init__(self, arch: LlamaArch, tp: TPGroup, ep: EPGroup):
        super().__init__()
        self.top_k, self.renormalize = arch.top_k, arch.renormalize
        self.gate = nn.Linear(arch.hidden_size, arch.num_experts, bias=False)
        self.experts = FusedExperts(
            arch.num_experts, arch.hidden_size, arch.moe_intermediate_size, tp, ep
        )
        self.shared_expert = None
        if arch.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(arch, tp, arch.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(arch.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        y = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


class LlamaLayer(nn.Module):
    def __init__(self, arch: LlamaArch, idx: int, tp: TPGroup, ep: EPGroup):
        super().__init__()
        self.self_attn = LlamaAttention(arch, arch.windows[idx], tp)
        self.mlp = SparseMoE(arch, tp, ep) if idx in arch.moe_layers else LlamaMLP(arch, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        """(x, residual) -> (x, residual): the layer's output is x + residual. Carrying them
        apart lets each residual add fuse into the following RMSNorm."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm.add(x, residual)
        return self.mlp(x), residual


_EXPERT = re.compile(
    r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\."
)
_EXPERT_PART = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}

# HF checkpoint name -> (our parameter name, shard id) for fused layers.
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Layers [first_layer, last_layer) of the model; embedding on the first pipeline stage,
    final norm and LM head on the last."""

    def __init__(
        self,
        hf_config,
        tp: TPGroup = SINGLE,
        layer_range: tuple[int, int] | None = None,
        ep: EPGroup = EP_SINGLE,
    ):
        super().__init__()
        arch = self.arch = LlamaArch.from_hf(hf_config)
        self.first_layer, self.last_layer = layer_range or (0, arch.num_layers)
        self.is_first = self.first_layer == 0
        self.is_last = self.last_layer == arch.num_layers
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleDict(
            {
                str(i): LlamaLayer(arch, i, tp, ep)
                for i in range(self.first_layer, self.last_layer)
            }
        )
        if self.is_last:
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
            self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp)
            if arch.tie_word_embeddings and self.is_first:
                self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(hf_config, arch.head_dim, arch.max_position_embeddings)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers on this rank, kv heads per rank, head dim)."""
        attn = next(iter(self.layers.values())).self_attn
        return len(self.layers), attn.num_kv_heads, attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor | None,
        hidden: torch.Tensor | None,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Hidden states after the layers (before the final norm). `num_layers`: only the
        first that many (a self-speculative draft, workers/draft_model.py; with that many
        caches)."""
        x = self.embed_tokens(input_ids) if self.is_first else hidden
        dtype = x.dtype
        layers = list(self.layers.values())
        if num_layers is not None:
            layers = layers[:num_layers]
        if (
            num_layers is None
            and self._dense is not None
            and x.shape[0] <= native_forward.DENSE_MAX_ROWS
            and dtype == self._dense.dtype
            and meta.native
            and kv_caches[0].dtype == dtype  # not the int8 KV cache (workers/kv_int8.py)
        ):
            out = self._dense_layers(x.contiguous(), meta, kv_caches)
            if out is not None:
                return out
        cos = self.cos[meta.positions].to(dtype)[:, None, :]
        sin = self.sin[meta.positions].to(dtype)[:, None, :]
        if self.compiled is not None:
            return self.compiled(self, x, cos, sin, meta, kv_caches)
        residual = None
        for layer, cache in zip(layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, cache, meta)
        return x if residual is None else x + residual

    def use_kernels(self, plan: KernelPlan, prepack: bool = True) -> None:
        """Take the paths `plan` (workers/kernels/dispatch.py) allows: norms, rotary and
        SiLU-and-mul through the C++ CPU ops, each linear's method (workers/linear_methods.py;
        `prepack`: keep packed bf16 weights), and, where every layer can, steps of up to
        DENSE_MAX_ROWS tokens through all layers in one native call (dense_layers)."""
        swiglu = frozenset(
            m.gate_up_proj for m in self.modules() if isinstance(m, LlamaMLP) and m.fused_swiglu
        )
        attach_linear_methods(self, plan, prepack, swiglu)
        for m in self.modules():
            if isinstance(m, (RMSNorm, LlamaAttention, LlamaMLP)):
                m.native = plan.native
        self._dense = native_forward.dense_weights(self) if plan.dense_layers else None

    _dense: native_forward.DenseWeights | None = None
    compiled = None  # workers.models.compiled.CompiledLayers, set by the model runner

    def _dense_layers(
        self, x: torch.Tensor, meta: AttentionMetadata, kv_caches
    ) -> torch.Tensor | None:
        return native_forward.dense_layers(self, x, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))  # model dtype: the sampler widens if it must

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """argmax of compute_logits(hidden) per row, fused into the LM head (no logits
        written), or None where the head cannot."""
        return self.lm_head.greedy(self.norm(hidden))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy this rank's slices in; returns the names of the parameters that were loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name.startswith("layers."):
                idx = int(name.split(".")[1])
                if not self.first_layer <= idx < self.last_layer:
                    continue
            elif name.startswith("embed_tokens") and not self.is_first:
                if self.is_last and self.arch.tie_word_embeddings:
                    name = "lm_head.weight"  # the tied head on a last stage without the embedding
                else:
                    continue
            elif name.startswith(("norm", "lm_head")) and not self.is_last:
                continue
            name = name.replace("block_sparse_moe.", "mlp.")
            shard = None
            m = _EXPERT.match(name)
            if m is not None:
                layer, expert, w = m.groups()
                part = _EXPERT_PART.get(w)
                name = f"layers.{layer}.mlp.experts.{'w2' if part is None else 'w13'}"
                shard = (int(expert), part)
            for hf, (ours, sid) in ({} if m else _FUSED).items():
                if f".{hf}." in name:
                    name, shard = name.replace(hf, ours), sid
                    break
            param = params.get(name)
            if param is None:
                if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                    continue
                raise ValueError(
                    f"checkpoint tensor {name!r} has no parameter in {self.arch.model_type}"
                )
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(tensor)
            else:
                # (an int8 weight's loader quantizes the float tensor itself)
                t = tensor.to(param.dtype) if param.is_floating_point() else tensor
                loader(param, t, shard)
            loaded.add(name)
        return loaded
