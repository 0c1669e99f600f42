"""Weight-only int8 (workers/quantization.py, workers/kernels/gemm_w8.cpp, Int8Linear): the
per-channel quantization's round trip, the native kernel and torch's fallbacks against a
float64 reference, and quantization at load across tensor-parallel shards."""

from __future__ import annotations

import pytest
import torch
from int8_support import bound as _bound
from int8_support import int8_layers
from int8_support import reference as _reference

from parallel.layers import (
    ColumnParallelLinear,
    TPGroup,
)
from workers.quantization import QUANT_MAX, dequantize, quantize_rows, use_int8_weights


def test_quantize_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 101, generator=g) * torch.rand(37, 1, generator=g) * 3
    w[5] = 0  # an all-zero row: scale 0, q 0
    w[6, 7] = -w[6].abs().max() * 2  # the negative extreme maps to -127
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (37,)
    assert q.abs().max() <= QUANT_MAX and q[6, 7] == -QUANT_MAX
    assert torch.equal(q.abs().amax(1)[s > 0], torch.full((36,), QUANT_MAX, dtype=torch.int8))
    assert s[5] == 0 and (q[5] == 0).all()
    err = (dequantize(q, s, torch.float32) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-6) + 1e-7).all()
    assert dequantize(q, s, torch.bfloat16).dtype == torch.bfloat16


SHAPES = [(1, 7, 13), (2, 33, 45), (3, 64, 100), (5, 9, 577), (8, 130, 64), (16, 5, 31)]
SHAPES += [(13, 77, 200), (32, 40, 129), (40, 11, 1000)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_w8_matches_float64(M, N, K, dtype, needs):
    """Row tails (M not a multiple of the micro-kernel's rows, N of its 4 weight rows), K not a
    multiple of the vector width, with and without a bias (in the activation dtype)."""
    needs("w8")
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    q, s = quantize_rows(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g).to(dtype)
    for bias in (None, b):
        out = torch.full((M, N), float("nan"), dtype=dtype)
        assert torch.ops.flotilla.linear_w8(out, x, q, s, bias)
        ref = _reference(x, q, s, bias)
        assert ((out.double() - ref).abs() <= _bound(x, q, s, ref, dtype)).all()


def test_linear_w8_declines_and_checks(kernel_plan):
    """float16 activations: declined (False, nothing written) on every build; so is every call
    on a build without the vector path. Bad shapes and dtypes fail everywhere."""
    q, s = quantize_rows(torch.randn(8, 16))
    out = torch.full((2, 8), 7.0, dtype=torch.float16)
    assert not torch.ops.flotilla.linear_w8(out, torch.randn(2, 16).half(), q, s, None)
    assert (out == 7).all()
    out32 = torch.full((2, 8), 7.0)
    assert torch.ops.flotilla.linear_w8(out32, torch.randn(2, 16), q, s, None) == kernel_plan.w8
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        torch.ops.flotilla.linear_w8(torch.empty(2, 9), torch.randn(2, 16), q, s, None)
    with pytest.raises(RuntimeError, match="int8 weights"):
        torch.ops.flotilla.linear_w8(torch.empty(2, 8), torch.randn(2, 16), q.float(), s, None)


@pytest.mark.parametrize("M,N,K", [(7, 40, 64), (13, 100, 1000), (200, 33, 577)])
def test_linear_w8_gemm_is_the_packed_gemm_on_the_dequantized_weight(M, N, K, needs):
    """The prefill GEMM on int8 weights (gemm_f32.cpp: linear_w8_gemm) dequantizes each panel
    block as it goes: the bits of linear_f32_packed on pack_f32(dequantize(q, s)), past a pass
    of rows (200), N tails of a panel, K in blocks or not; bf16 declines, nothing written."""
    needs("f32_packed")
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g)
    q, s = quantize_rows(torch.randn(N, K, generator=g))
    wp = torch.ops.flotilla.pack_f32(dequantize(q, s, torch.float32))
    for bias in (None, torch.randn(N, generator=g)):
        out, ref = torch.full((M, N), float("nan")), torch.empty(M, N)
        assert torch.ops.flotilla.linear_w8_gemm(out, x, q, s, bias)
        assert torch.ops.flotilla.linear_f32_packed(ref, x, wp, bias)
        assert torch.equal(out, ref)
    out = torch.full((M, N), 7.0, dtype=torch.bfloat16)
    assert not torch.ops.flotilla.linear_w8_gemm(out, x.bfloat16(), q, s, None)
    assert (out == 7).all()
    with pytest.raises(RuntimeError, match="int8 weights"):
        torch.ops.flotilla.linear_w8_gemm(out.float(), x, q.float(), s, None)


def _int8_layer(
    n: int, k: int, bias: bool, g: torch.Generator, dtype=torch.float32, group=None
) -> tuple:
    layer = ColumnParallelLinear(k, n, bias)
    use_int8_weights(layer, group)
    w = torch.randn(n, k, generator=g)
    layer.weight.weight_loader(layer.weight, w)
    if bias:
        layer.bias.data = torch.randn(n, generator=g).to(dtype)
    q, s = quantize_rows(w, group)
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, s)
    return layer, q, s


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("rows", [1, 3, 32, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [True, False])
def test_int8_linear_paths_match_float64(rows, dtype, native, group, kernel_plan):
    """Int8Linear through the path the plan gives it: the kernel up to w8_max_rows, then
    linear_w8_gemm (float32) or, bf16, _weight_int8pack_mm (per channel; group-wise scales
    [N, K / 32]: torch on the dequantized weight, the op has one scale per channel);
    native=False: the fallbacks at every row count (a machine without the kernel)."""
    from workers.linear_methods import Int8Linear, attach_linear_methods

    g = torch.Generator().manual_seed(rows)
    k = 200 if group is None else 192
    layer, q, s = _int8_layer(96, k, True, g, dtype, group)
    if native:
        attach_linear_methods(layer, kernel_plan)
    else:
        layer.linear_method = Int8Linear(max_rows=0)
    assert isinstance(layer.linear_method, Int8Linear)
    x = torch.randn(rows, k, generator=g).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 96)
    ref = _reference(x, q, s, layer.bias)
    bound = _bound(x, q, s, ref, dtype)
    if dtype == torch.bfloat16 and group is None:  # bf16 paths round scales and sums to bf16
        bound = bound * 2 + ref.abs() * 2**-7 + 0.05
    elif dtype == torch.bfloat16:  # torch's bf16 path: each weight rounded to bf16 (<= 2^-9)
        w = dequantize(q, s, torch.float32).double()
        bound = bound * 2 + (x.double().abs() @ w.abs().T) * 2**-8
    assert ((got.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize(("k", "group"), [(16, None), (64, 16)])
def test_int8_loads_sharded_like_tp1(k, group):
    """tp=2: every rank's int8 rows and scales are the tp=1 layer's, sliced as the layer shards
    its output channels (column-parallel: rows and scales; QKV with a replicated KV head;
    merged gate|up) or its input dim (row-parallel: int8 columns; per-channel scales whole,
    group-wise [N, K / G] scales sliced with their columns by the weight's own loader: here
    K / tp = 32 = 2 groups of 16)."""
    full = int8_layers(TPGroup(), k, group)
    half = k // 2
    for rank in range(2):
        part = int8_layers(TPGroup(rank, 2), k, group)
        (qc, sc), (qr, sr) = full["col"], full["row"]
        assert torch.equal(part["col"][0], qc[6 * rank : 6 * rank + 6])
        assert torch.equal(part["col"][1], sc[6 * rank : 6 * rank + 6])
        assert torch.equal(part["row"][0], qr[:, half * rank : half * (rank + 1)])
        if group is None:
            assert torch.equal(part["row"][1], sr)
        else:
            g = half // group
            assert sr.shape == (12, k // group)
            assert torch.equal(part["row"][1], sr[:, g * rank : g * (rank + 1)])
        qf, sf = full["qkv"]  # q rows 0-7 (2 heads x 4), k 8-11, v 12-15
        keep = [*range(4 * rank, 4 * rank + 4), *range(8, 16)]
        assert torch.equal(part["qkv"][0], qf[keep]) and torch.equal(part["qkv"][1], sf[keep])
        qm, sm = full["mlp"]
        keep = [*range(3 * rank, 3 * rank + 3), *range(6 + 3 * rank, 9 + 3 * rank)]
        assert torch.equal(part["mlp"][0], qm[keep]) and torch.equal(part["mlp"][1], sm[keep])


def test_tied_lm_head_gets_its_own_int8_copy():
    """quantize_loaded on a head that shares the embedding's weight: the head holds int8 rows
    and scales of the float weight, the embedding keeps its float tensor."""
    from parallel.layers import ParallelLMHead, VocabParallelEmbedding
    from workers.quantization import is_int8, quantize_loaded

    emb, head = VocabParallelEmbedding(10, 16), ParallelLMHead(10, 16)
    head.weight = emb.weight
    w = torch.randn(10, 16)
    emb.weight.weight_loader(emb.weight, w)
    quantize_loaded(head)
    q, s = quantize_rows(w)
    assert is_int8(head) and not is_int8(emb)
    assert torch.equal(emb.weight, w) and emb.weight.dtype == torch.float32
    assert torch.equal(head.weight, q) and torch.equal(head.weight_scale, s)
