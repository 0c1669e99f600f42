"""CPU linear methods (parallel.layers.LinearMethod), attached to a model's linear layers at load
by `attach_linear_methods` as the kernel plan (workers/kernels/dispatch.py) allows:

- AmxLinear: the weight packed once into the AMX B-tile panels of torch.ops.flotilla.amx_linear,
  used up to AMX_MAX_ROWS rows (torch's linear past that); also the LM head's fused greedy
  argmax (amx_argmax).
- AmxSwiGLU: a SwiGLU MLP's gate|up packed so that one amx_swiglu call gives silu(g) * u; the
  MLP asks for that, the layer's own calls take the next method.
- OneDNNLinear: a oneDNN-prepacked bf16 copy, which skips oneDNN's per-call reorder (~1.3-1.8x
  faster per matmul on bf16-capable CPUs without AMX).
- GemvLinear: a few bf16 rows by torch.ops.flotilla.gemv_bf16 (AVX512-BF16), streaming the
  weight at memory bandwidth; more rows by the method it wraps.
- F32Linear: float32 weights (AVX2/AVX-512). Packed at load (model.prepack) into the k-major
  panels of torch.ops.flotilla.linear_f32_packed, an outer-product GEMM that beats torch's
  (MKL on an AVX2 EPYC) at every row count measured, and the plain weight dropped unless a
  tied embedding shares it; unpacked: a few rows by linear_f32, which streams the weight at
  memory bandwidth where MKL reaches a third to half of it, more rows by torch.
- Int8Linear: an int8 weight with per-output-channel or group-wise scales
  (workers/quantization.py): a few rows by torch.ops.flotilla.linear_w8 (AVX2/AVX-512), more
  rows by linear_w8_gemm (float32: the packed GEMM, dequantizing block by block) or torch's
  int8 matmul (bf16, per channel only; group-wise: torch on the dequantized weight).

Every method falls back to torch's linear where its kernel does not apply (dtype, shape, a
kernel that declines), so outputs are those of the path taken, never wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import TORCH_LINEAR, LinearLayer, LinearMethod, VocabParallelEmbedding
from workers.kernels.dispatch import KernelPlan
from workers.quantization import dequantize, is_int8

AMX_MAX_ROWS = 256
"""Up to this many rows a linear runs on our AMX kernel (torch.ops.flotilla.amx_linear); past
it torch's linear (oneDNN's AMX GEMM) is as fast or faster (benchmarks/RESULTS.md)."""


def amx_pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 -> the AMX B-tile panels amx_linear reads: [N/32, K/32, 2, 16, 32], element
    (p, kb, t, r, 2c + l) = w[32p + 16t + c, 32kb + 2r + l], zero-padded to multiples of 32."""
    n, k = w.shape
    np_, kp = -(-n // 32) * 32, -(-k // 32) * 32
    w = F.pad(w, (0, kp - k, 0, np_ - n))
    w = w.view(np_ // 32, 2, 16, kp // 32, 16, 2).permute(0, 3, 1, 4, 2, 5)
    return w.contiguous().view(np_ // 32, kp // 32, 2, 16, 32)


def amx_pack_swiglu(w: torch.Tensor) -> torch.Tensor:
    """gate|up [2I, K] -> panels whose first tile holds 16 gate columns and second tile the same
    16 up columns, for amx_swiglu (I a multiple of 16)."""
    n2, k = w.shape
    i = n2 // 2
    pairs = torch.stack((w[:i].view(i // 16, 16, k), w[i:].view(i // 16, 16, k)), dim=1)
    return amx_pack(pairs.reshape(n2, k))


def _amx_rows(x: torch.Tensor) -> bool:
    return (
        x.dim() == 2
        and x.shape[0] <= AMX_MAX_ROWS
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
    )


class AmxLinear(LinearMethod):
    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None):
        self.packed = packed
        self.bias = bias  # float32: the kernel adds it before its one rounding

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _amx_rows(x):
            out = x.new_empty(x.shape[0], layer.weight.shape[0])
            b = None if bias is None else self.bias
            if torch.ops.flotilla.amx_linear(out, x.contiguous(), self.packed, b):
                return out
        return F.linear(x, layer.weight, bias)

    def argmax(self, layer: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor | None:
        if not _amx_rows(x):
            return None
        out = torch.empty(x.shape[0], dtype=torch.long)
        return out if torch.ops.flotilla.amx_argmax(out, x.contiguous(), self.packed, n) else None


class AmxSwiGLU(LinearMethod):
    def __init__(self, packed: torch.Tensor, then: LinearMethod):
        self.packed = packed
        self.then = then  # the layer's own calls (gate|up written out)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.then.apply(layer, x, bias)

    def swiglu(self, x: torch.Tensor, width: int) -> torch.Tensor | None:
        """bf16(silu(x Wg^T)) * (x Wu^T), [rows, width], bit-identical to the gate|up linear
        then silu_and_mul; None where the kernel does not apply."""
        if not _amx_rows(x):
            return None
        act = x.new_empty(x.shape[0], width)
        return act if torch.ops.flotilla.amx_swiglu(act, x.contiguous(), self.packed) else None


class OneDNNLinear(LinearMethod):
    def __init__(self, packed: torch.Tensor):
        self.packed = packed

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.dim() == 2:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return F.linear(x, layer.weight, bias)


class GemvLinear(LinearMethod):
    def __init__(self, max_rows: int, then: LinearMethod):
        self.max_rows = max_rows
        self.then = then

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = layer.weight
        if (
            x.dim() == 2
            and x.shape[0] <= self.max_rows
            and x.dtype == w.dtype == torch.bfloat16
            and x.device.type == "cpu"
        ):
            out = x.new_empty(x.shape[0], w.shape[0])
            if torch.ops.flotilla.gemv_bf16(out, x.contiguous(), w):
                return out if bias is None else out + bias
        return self.then.apply(layer, x, bias)


class F32Linear(LinearMethod):
    """float32 weights on an AVX2/AVX-512 CPU. With the weight packed at load (`packed`, from
    pack_f32): every float32 step of more than `dot_rows` rows by linear_f32_packed (outer
    products, compute-bound past a few rows: 1.3-2x torch's MKL on an AVX2 EPYC from 16 rows
    up, benchmarks/RESULTS.md); and the plain weight is dropped (meta) unless an embedding
    shares it, so odd calls (bf16 x) rebuild it from the panels. Without: up to `max_rows`
    rows by linear_f32 (dot products, bandwidth-bound), torch's linear past it."""

    def __init__(
        self,
        max_rows: int,
        packed: torch.Tensor | None = None,
        out_features: int = 0,
        dot_rows: int = 0,
    ):
        self.max_rows = max_rows
        self.packed = packed
        self.out_features = out_features
        self.dot_rows = dot_rows  # with packed: linear_f32 up to this many rows (plain kept)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = layer.weight
        if x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu":
            rows = x.shape[0]
            if self.packed is not None and rows > self.dot_rows:
                out = x.new_empty(rows, self.out_features)
                if torch.ops.flotilla.linear_f32_packed(out, x.contiguous(), self.packed, bias):
                    return out
            elif rows <= (self.dot_rows if self.packed is not None else self.max_rows):
                out = x.new_empty(rows, w.shape[0])
                if torch.ops.flotilla.linear_f32(out, x.contiguous(), w, bias):
                    return out
        return F.linear(x, self.plain(layer), bias)

    def plain(self, layer: nn.Module) -> torch.Tensor:
        """The [N, K] weight: the layer's, or rebuilt from the panels where it was dropped."""
        w = layer.weight
        if w.device.type != "meta" or self.packed is None:
            return w
        return self.packed.permute(0, 2, 1).reshape(-1, w.shape[1])[: w.shape[0]]


class Int8Linear(LinearMethod):
    """y = x @ (q * scale)^T (+ bias) for layer.weight int8 [N, K] and layer.weight_scale [N]
    (per output channel) or [N, K / G] (per group of G input columns; the kernels take both).

    Paths, measured on an AVX2 EPYC ([M, 576] x [1536, 576], one thread): up to `max_rows`
    rows the native kernel (M = 1: 50 us against 78 for float32 F.linear); past it, float32
    activations take linear_w8_gemm where the plan has the packed float32 GEMM (`gemm`): that
    GEMM dequantizing each panel block into a thread's buffer as it goes, so a prefill neither
    writes out the whole float32 weight per call nor takes MKL's slower GEMM (else F.linear on
    the weight dequantized per call, ~0.2 ms for 0.9 M weights), and bf16 ones
    torch's _weight_int8pack_mm (85 us at M = 1 against 580 for dequantize + bf16 F.linear
    here; torch's float32 version of it is 10x slower than dequantizing)."""

    def __init__(self, max_rows: int, gemm: bool = False):
        self.max_rows = max_rows  # 0: no native kernel
        self.gemm = gemm  # float32 past max_rows: linear_w8_gemm (else torch on the dequantized)
        self._scales: dict[torch.dtype, torch.Tensor] = {}  # _weight_int8pack_mm's scales

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w, scale = layer.weight, layer.weight_scale
        rows = x.shape[0] if x.dim() == 2 else -1
        if x.device.type == "cpu" and 0 < rows:
            ops = torch.ops.flotilla
            op = ops.linear_w8 if rows <= self.max_rows else None
            if op is None and self.gemm and x.dtype == torch.float32:
                op = ops.linear_w8_gemm
            if op is not None:
                out = x.new_empty(rows, w.shape[0])
                if op(out, x.contiguous(), w, scale, bias):
                    return out
        # _weight_int8pack_mm takes one scale per output channel: group-wise scales take
        # torch's linear on the dequantized weight below
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and scale.dim() == 1:
            s = self._scales.get(x.dtype)
            if s is None:
                s = self._scales[x.dtype] = scale.to(x.dtype)
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w, s)
            y = y.view(*x.shape[:-1], w.shape[0])
            return y if bias is None else y + bias
        return F.linear(x, dequantize(w, scale, x.dtype), bias)


def _packable(w: torch.Tensor) -> bool:
    return (
        w.device.type == "cpu"
        and w.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
    )


def _f32(layer: LinearLayer, plan: KernelPlan, prepack: bool, shared: bool) -> F32Linear:
    w = layer.weight.detach()  # type: ignore[attr-defined]
    packed = torch.ops.flotilla.pack_f32(w) if prepack and plan.f32_packed else None
    if packed is None or packed.numel() == 0:
        return F32Linear(plan.f32_max_rows)
    dot_rows = plan.f32_dot_rows
    if not shared and dot_rows == 0:  # one float32 copy: the panels
        layer.weight = nn.Parameter(torch.empty(w.shape, device="meta"), requires_grad=False)
    return F32Linear(plan.f32_max_rows, packed, w.shape[0], dot_rows)


def choose(
    layer: LinearLayer,
    plan: KernelPlan,
    prepack: bool = True,
    swiglu: bool = False,
    shared: bool = False,
) -> LinearMethod:
    """The method for one loaded layer. `prepack`: keep packed copies of bf16 weights, and pack
    float32 ones in place of the plain weight (model.prepack); `swiglu`: the layer is a SwiGLU
    MLP's gate|up (pack it for amx_swiglu); `shared`: another module reads the weight too (a
    tied embedding), so a packed copy cannot replace it."""
    if is_int8(layer):
        return Int8Linear(plan.w8_max_rows if plan.w8 else 0, gemm=plan.f32_packed)
    w = layer.weight.detach()  # type: ignore[attr-defined]
    if plan.f32 and w.dtype == torch.float32 and w.device.type == "cpu":
        return _f32(layer, plan, prepack, shared)
    packed = prepack and plan.onednn_bf16 and _packable(w)
    small = GemvLinear(plan.gemv_max_rows, TORCH_LINEAR) if plan.gemv_bf16 else TORCH_LINEAR
    if packed and plan.amx:
        if swiglu:
            return AmxSwiGLU(amx_pack_swiglu(w), then=small)
        bias = getattr(layer, "bias", None)
        return AmxLinear(amx_pack(w), None if bias is None else bias.detach().float())
    if not packed:
        return small
    onednn = OneDNNLinear(torch.ops.mkldnn._reorder_linear_weight(w, 64))
    return GemvLinear(plan.gemv_max_rows, onednn) if plan.gemv_bf16 else onednn


def attach_linear_methods(
    model: nn.Module, plan: KernelPlan, prepack: bool = True, swiglu: frozenset = frozenset()
) -> int:
    """Give every linear layer of `model` its method; `swiglu`: the gate|up layers that may
    be packed for amx_swiglu. Returns how many layers got something other than torch's."""
    embedded = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, LinearLayer)
    }
    n = 0
    for m in model.modules():
        if isinstance(m, LinearLayer):
            shared = id(getattr(m, "weight", None)) in embedded
            m.linear_method = choose(m, plan, prepack, m in swiglu, shared)
            n += m.linear_method is not TORCH_LINEAR
    return n
