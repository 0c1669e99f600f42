"""Weight-only int8 quantization (`model.quantization: int8`): every linear layer's weight held
as int8 [out, in] with float32 scales, quantized at load from the checkpoint's float weights
(symmetric: scale = max|w| / 127, q = round(w / scale)). The scales are one per output channel
(`weight_scale` [out]), or with `model.quantization_group_size` G one per output channel per G
consecutive input columns (`weight_scale` [out, in / G], w[n, k] ~ q[n, k] * s[n, k // G]): a
row whose few large weights would set one coarse step for all gets a step per group instead.
Embeddings stay in the model dtype; the activations and the arithmetic too
(workers/linear_methods.py: Int8Linear).

Tensor parallelism: the scales are computed on the full checkpoint rows, before the layer's own
loaders shard int8 rows and scales alike. Per channel: a column-parallel layer's scales go with
its rows; a row-parallel layer's (input dim split) are whole on every rank. Group-wise scales
have the weight's 2D layout, so the weight's own loader shards them (rows, or for a row-parallel
layer the groups of its columns: hence in / tp must be a multiple of G). Either way each rank
holds exactly the matching part of the tp=1 int8 weight and scales.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.layers import LinearLayer, ParallelLMHead, RowParallelLinear

QUANT_MAX = 127  # symmetric: -128 unused, so -q is always representable


def quantize_rows(
    w: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 [N, K], float32 scales) with w ~ q * scale: scales [N] (one per
    row), or [N, K // group_size] (one per row and group of columns, K a multiple of it). Each
    element's error is at most its scale / 2. An all-zero row or group gets scale 0 (and q 0)."""
    w = w.float()
    tiny = torch.finfo(torch.float32).tiny
    if group_size is None:
        scale = w.abs().amax(dim=1) / QUANT_MAX
        q = torch.round(w / scale.clamp_min(tiny)[:, None])
        return q.clamp_(-QUANT_MAX, QUANT_MAX).to(torch.int8), scale
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"quantize_rows: K={k} is not a multiple of group_size={group_size}")
    groups = w.reshape(n, k // group_size, group_size)
    scale = groups.abs().amax(dim=2) / QUANT_MAX
    q = torch.round(groups / scale.clamp_min(tiny)[:, :, None]).view(n, k)
    return q.clamp_(-QUANT_MAX, QUANT_MAX).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale (per row [N], or per row and group [N, K / G]) in `dtype`, computed in float32
    (a widening copy, then an in-place scale: ~1.5x faster here than torch.mul's int8 * float32
    promotion in one call)."""
    w = q.float()
    if scale.dim() == 1:
        w.mul_(scale[:, None])
    else:
        w.view(q.shape[0], scale.shape[1], -1).mul_(scale[:, :, None])
    return w if dtype == torch.float32 else w.to(dtype)


def _int8_param(shape: torch.Size, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=torch.int8, device=device), requires_grad=False)


def _check_groups(name: str, layer: nn.Module, k: int, group_size: int) -> None:
    """Refuse a layer whose (per-rank) input dim k is not whole groups: no silent fallback."""
    if k % group_size == 0:
        return
    tp = getattr(getattr(layer, "tp", None), "size", 1)
    what = f"K={k}"
    if isinstance(layer, RowParallelLinear) and tp > 1:
        what = f"K/tp={k * tp}/{tp}={k} (row-parallel: each rank's columns are whole groups)"
    raise ValueError(
        f"model.quantization_group_size={group_size}: layer {name or type(layer).__name__} has "
        f"input dim {what}, not a multiple of the group size"
    )


def use_int8_weights(layer: LinearLayer, group_size: int | None = None, name: str = "") -> None:
    """Before loading: make `layer` hold `weight` as int8 and `weight_scale` float32 ([out], or
    [out, in / group_size]); its weight loader then quantizes each full checkpoint tensor (or
    fused part: q, k, v, gate, up) and shards both with the layer's own loaders. Raises
    ValueError (naming the layer as `name`) where the input dim is not whole groups."""
    old: nn.Parameter = layer.weight  # type: ignore[attr-defined]
    load_rows = old.weight_loader  # type: ignore[attr-defined]
    n, k = old.shape
    if group_size is not None:
        _check_groups(name, layer, k, group_size)  # type: ignore[arg-type]
    shape = (n,) if group_size is None else (n, k // group_size)
    scale = nn.Parameter(
        torch.zeros(shape, dtype=torch.float32, device=old.device), requires_grad=False
    )

    def loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        q, s = quantize_rows(loaded, group_size)
        load_rows(param, q, shard_id)
        if group_size is None:
            layer.out_vector_loader(scale, s, shard_id)
        else:  # the weight's layout: sharded as it is, from the scale's own shape
            load_rows(scale, s, shard_id)

    weight = _int8_param(old.shape, old.device)
    weight.weight_loader = loader  # type: ignore[attr-defined]
    layer.weight = weight  # type: ignore[attr-defined]
    layer.weight_scale = scale  # type: ignore[attr-defined]


def quantize_loaded(layer: LinearLayer, group_size: int | None = None, name: str = "") -> None:
    """After loading: the same for a layer whose float weight is already in (the LM head, whose
    weight may be the embedding's: the embedding keeps the float tensor). Its rows are whole
    on every rank (vocab-parallel), so its scales are those of the full weight."""
    w = layer.weight.detach()  # type: ignore[attr-defined]
    if group_size is not None:
        _check_groups(name, layer, w.shape[1], group_size)  # type: ignore[arg-type]
    q, s = quantize_rows(w, group_size)
    layer.weight = nn.Parameter(q, requires_grad=False)  # type: ignore[attr-defined]
    layer.weight_scale = nn.Parameter(s, requires_grad=False)  # type: ignore[attr-defined]


def is_int8(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return w is not None and w.dtype == torch.int8 and hasattr(layer, "weight_scale")


def prepare_int8(model: nn.Module, group_size: int | None = None) -> int:
    """Before loading: every linear layer but the LM head quantizes at load (per channel, or in
    groups of group_size input columns). Returns how many. Raises ValueError, before any
    weight is read, where a layer's input dim is not whole groups."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearLayer)]
    layers = [(n, m) for n, m in layers if not isinstance(m, ParallelLMHead)]
    for name, m in layers:
        use_int8_weights(m, group_size, name)
    return len(layers)
