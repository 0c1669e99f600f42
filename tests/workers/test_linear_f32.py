"""The float32 small-batch linear (workers/kernels/gemm_w8.cpp: linear_f32, F32Linear): the
kernel against a float64 reference at every tail shape, its declines, and the method's paths
(kernel up to f32_max_rows, torch's linear past it or where the plan has no kernel)."""

from __future__ import annotations

import pytest
import torch

from parallel.layers import ColumnParallelLinear

SHAPES = [(1, 7, 13), (2, 33, 45), (3, 64, 100), (5, 9, 577), (8, 130, 64), (16, 5, 31)]
SHAPES += [(13, 77, 200), (32, 40, 129)]


def _bound(x, w, ref, dtype):
    """float32 summation error, plus one rounding of the output to bf16."""
    err = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6
    return err + (ref.abs() * 2**-8 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_f32_matches_float64(M, N, K, dtype, needs):
    """Row tails (M not a multiple of the micro-kernel's rows, N of its 4 weight rows), K not a
    multiple of the vector width, with and without a bias; bf16 activations and outputs."""
    needs("f32")
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g).to(dtype)
    for bias in (None, b):
        out = torch.full((M, N), float("nan"), dtype=dtype)
        assert torch.ops.flotilla.linear_f32(out, x, w, bias)
        ref = x.double() @ w.double().T
        ref = ref if bias is None else ref + bias.double()
        assert ((out.double() - ref).abs() <= _bound(x, w, ref, dtype)).all()


def test_linear_f32_declines_and_checks(kernel_plan):
    """bf16 or float16 weights and float16 activations: declined (False, nothing written) on
    every build; so is every call on a build without the vector path. Bad shapes fail."""
    w = torch.randn(8, 16)
    out = torch.full((2, 8), 7.0)
    assert not torch.ops.flotilla.linear_f32(out, torch.randn(2, 16), w.bfloat16(), None)
    assert not torch.ops.flotilla.linear_f32(out, torch.randn(2, 16).half(), w, None)
    assert (out == 7).all()
    assert torch.ops.flotilla.linear_f32(out, torch.randn(2, 16), w, None) == kernel_plan.f32
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        torch.ops.flotilla.linear_f32(torch.empty(2, 9), torch.randn(2, 16), w, None)


@pytest.mark.parametrize("native", [True, False])
def test_f32_linear_paths_match_torch(native, kernel_plan):
    """The layer's method: with the plan's kernel, rows up to f32_max_rows and past it; without
    (a machine or build that lacks it), torch's linear at every row count."""
    from parallel.layers import TORCH_LINEAR
    from workers.kernels.dispatch import KernelPlan
    from workers.linear_methods import F32Linear, attach_linear_methods

    g = torch.Generator().manual_seed(0)
    layer = ColumnParallelLinear(200, 96, True)
    layer.weight.data = torch.randn(96, 200, generator=g)
    layer.bias.data = torch.randn(96, generator=g)
    attach_linear_methods(layer, kernel_plan if native else KernelPlan(native=True))
    if native and kernel_plan.f32:
        assert isinstance(layer.linear_method, F32Linear)
    else:
        assert layer.linear_method is TORCH_LINEAR
    for rows in (1, 3, kernel_plan.f32_max_rows, kernel_plan.f32_max_rows + 1, 70):
        x = torch.randn(max(rows, 1), 200, generator=g)
        ref = x.double() @ layer.weight.double().T + layer.bias.double()
        got = layer(x)
        assert got.shape == ref.shape
        assert ((got.double() - ref).abs() <= _bound(x, layer.weight, ref, torch.float32)).all()
