"""The float32 linears: the dot-product kernel on the plain weight (workers/kernels/gemm_w8.cpp:
linear_f32) and the outer-product one on the weight packed at load (gemm_f32.cpp: pack_f32,
linear_f32_packed), each against a float64 reference at every tail shape, their declines, and
F32Linear's paths (packed, dot kernel, torch's linear where the plan has no kernel)."""

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


# (M, N, K): rows past one micro-tile and its tails (AVX2 6, AVX-512 12), past one pass of rows
# (32 tiles), N tails of the 16/32-wide panels, K in blocks of ~384 (577 and up) or not, and
# outputs accumulated a group of panels at a time (200 x 400)
PACKED_SHAPES = [(1, 7, 13), (2, 16, 1), (5, 33, 100), (6, 64, 577), (7, 40, 64)]
PACKED_SHAPES += [(13, 100, 1000), (48, 96, 576), (200, 400, 600), (400, 17, 800)]


@pytest.mark.parametrize("M,N,K", PACKED_SHAPES)
def test_linear_f32_packed_matches_float64(M, N, K, needs):
    needs("f32")
    g = torch.Generator().manual_seed(M * N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N)
    wp = torch.ops.flotilla.pack_f32(w)
    nr = wp.shape[2]
    assert wp.shape == (-(-N // nr), K, nr)
    assert torch.equal(wp.permute(0, 2, 1).reshape(-1, K)[:N], w)  # panels of nr channels
    assert not wp.permute(0, 2, 1).reshape(-1, K)[N:].any()  # zero-padded
    for bias in (None, b):
        out = torch.full((M, N), float("nan"))
        assert torch.ops.flotilla.linear_f32_packed(out, x, wp, bias)
        ref = x.double() @ w.double().T
        ref = ref if bias is None else ref + bias.double()
        assert ((out.double() - ref).abs() <= _bound(x, w, ref, torch.float32)).all()
    # a row's outputs do not depend on the batch it is in (one sum chain per output)
    one = torch.empty(1, N)
    assert torch.ops.flotilla.linear_f32_packed(one, x[-1:].clone(), wp, b)
    assert torch.equal(one, out[-1:])


def test_linear_f32_packed_declines_and_checks(kernel_plan):
    """bf16 activations or outputs, and panels of another width (another build's): declined,
    nothing written; a build without the vector path packs nothing (an empty tensor). K = 0
    gives the bias. Bad shapes fail."""
    w = torch.randn(40, 16)
    wp = torch.ops.flotilla.pack_f32(w)
    assert (wp.numel() > 0) == kernel_plan.f32
    out = torch.full((2, 40), 7.0)
    if not kernel_plan.f32:
        panels = torch.zeros(3, 16, 16)
        assert not torch.ops.flotilla.linear_f32_packed(out, torch.randn(2, 16), panels, None)
        assert (out == 7).all()
        return
    assert not torch.ops.flotilla.linear_f32_packed(out, torch.randn(2, 16).bfloat16(), wp, None)
    wide = torch.zeros(wp.shape[0], 16, 2 * wp.shape[2])
    assert not torch.ops.flotilla.linear_f32_packed(out, torch.randn(2, 16), wide, None)
    assert (out == 7).all()
    bias = torch.randn(40)
    assert torch.ops.flotilla.linear_f32_packed(out, torch.empty(2, 0), wp[:, :0], bias)
    assert torch.equal(out, bias.expand(2, 40))
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        torch.ops.flotilla.linear_f32_packed(torch.empty(2, 40), torch.randn(2, 15), wp, None)


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


@pytest.mark.parametrize("native,prepack", [(True, True), (True, False), (False, True)])
def test_f32_linear_paths_match_torch(native, prepack, kernel_plan):
    """The layer's method: with the plan's kernels, packed at load (the plain weight dropped) or
    not (linear_f32 up to f32_max_rows, torch's linear past it); without (a machine or build
    that lacks them), torch's linear at every row count. A 3-D input takes torch's linear on
    the weight rebuilt from the panels."""
    from parallel.layers import TORCH_LINEAR
    from workers.kernels.dispatch import KernelPlan
    from workers.linear_methods import F32Linear, attach_linear_methods

    g = torch.Generator().manual_seed(0)
    layer = ColumnParallelLinear(200, 96, True)
    layer.weight.data = torch.randn(96, 200, generator=g)
    layer.bias.data = torch.randn(96, generator=g)
    w = layer.weight.detach().clone()
    attach_linear_methods(layer, kernel_plan if native else KernelPlan(native=True), prepack)
    if native and kernel_plan.f32:
        method = layer.linear_method
        assert isinstance(method, F32Linear)
        assert (method.packed is not None) == (prepack and kernel_plan.f32_packed)
        dropped = method.packed is not None and kernel_plan.f32_dot_rows == 0
        assert (layer.weight.device.type == "meta") == dropped
    else:
        assert layer.linear_method is TORCH_LINEAR
    for rows in (1, 3, kernel_plan.f32_max_rows, kernel_plan.f32_max_rows + 1, 70):
        x = torch.randn(max(rows, 1), 200, generator=g)
        ref = x.double() @ w.double().T + layer.bias.double()
        for got in (layer(x), layer(x[None])[0]):
            assert got.shape == ref.shape
            assert ((got.double() - ref).abs() <= _bound(x, w, ref, torch.float32)).all()


def test_f32_tied_head_keeps_the_embedding(kernel_plan, needs):
    """An LM head tied to the embedding gets its panels beside the plain weight, which the
    embedding still reads; the embedding is not a linear layer and keeps its weight."""
    needs("f32_packed")
    from parallel.layers import ParallelLMHead, VocabParallelEmbedding
    from workers.linear_methods import attach_linear_methods

    model = torch.nn.Module()
    model.embed, model.head = VocabParallelEmbedding(50, 24), ParallelLMHead(50, 24)
    model.embed.weight.data = torch.randn(50, 24)
    model.head.weight = model.embed.weight
    attach_linear_methods(model, kernel_plan)
    assert model.head.weight is model.embed.weight and model.embed.weight.device.type == "cpu"
    assert model.head.linear_method.packed is not None
    x = torch.randn(3, 24)
    torch.testing.assert_close(model.head(x), x @ model.embed.weight.T)
