"""What the int8 tests share: the float64 reference of an int8 linear and its error bound (per
channel or group-wise scales), and the four kinds of linear layer (column-, row-parallel, QKV
with one KV head, merged gate|up), quantized at load and loaded from the same float weights,
at a given tensor-parallel rank -- to compare each rank's shards with the tp=1 layer's."""

from __future__ import annotations

import torch

from parallel.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TPGroup,
)
from workers.quantization import dequantize, use_int8_weights


def reference(x, q, s, bias):
    """x @ (q * s)^T (+ bias) in float64, for [N] or [N, K / G] scales."""
    w = dequantize(q, s, torch.float32).double()
    ref = x.double() @ w.T
    return ref if bias is None else ref + bias.double()


def bound(x, q, s, ref, dtype):
    """float32 summation error, plus one rounding of the output to bf16."""
    w = dequantize(q, s, torch.float32).double()
    err = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    return err + (ref.abs() * 2**-8 if dtype == torch.bfloat16 else 0)


def float_weights(k: int) -> tuple[torch.Tensor, ...]:
    """(w [12, k], q [8, k], k [4, k], v [4, k], gate [6, k], up [6, k]), seeded."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, k, generator=g)
    wq, wk, wv = (torch.randn(n, k, generator=g) for n in (8, 4, 4))
    gate, up = torch.randn(6, k, generator=g), torch.randn(6, k, generator=g)
    return w, wq, wk, wv, gate, up


def int8_layers(tp: TPGroup, k: int, group_size: int | None = None) -> dict:
    """name -> (int8 weight, scales) of each kind of layer at `tp`, loaded from float_weights(k)."""
    w, wq, wk, wv, gate, up = float_weights(k)
    col, row = ColumnParallelLinear(k, 12, False, tp), RowParallelLinear(k, 12, False, tp)
    qkv = QKVParallelLinear(k, 4, 2, 1, False, tp)  # 1 KV head: replicated at tp=2
    mlp = MergedColumnParallelLinear(k, [6, 6], False, tp)
    for m in (col, row, qkv, mlp):
        use_int8_weights(m, group_size)
    col.weight.weight_loader(col.weight, w)
    row.weight.weight_loader(row.weight, w)
    for sid, t in (("q", wq), ("k", wk), ("v", wv)):
        qkv.weight.weight_loader(qkv.weight, t, sid)
    mlp.weight.weight_loader(mlp.weight, gate, 0)
    mlp.weight.weight_loader(mlp.weight, up, 1)
    return {
        n: (m.weight.data, m.weight_scale.data)
        for n, m in dict(col=col, row=row, qkv=qkv, mlp=mlp).items()
    }
