"""The native elementwise and sampling CPU ops against the eager torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.kernels import load_cpu_kernels
from workers.sampler import SamplingState, sample
from workers.sampling_params import SamplingParams


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert load_cpu_kernels()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("V", [5, 16, 49152, 49157])  # below, at and past the vector width
def test_argmax_rows_matches_torch(dtype, V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(7, V, generator=g).to(dtype)
    x[1, :] = 3.0  # all tied: the first index
    x[2, V // 2] = x[2, V - 1] = 99.0  # tie far apart: the first of them
    x[3, 2] = float("nan")  # NaN never wins (torch.argmax would pick it; logits have none)
    out = torch.empty(7, dtype=torch.long)
    torch.ops.flotilla.argmax_rows(out, x)
    want = x.float().nan_to_num(nan=float("-inf")).argmax(dim=-1)
    assert out.tolist() == want.tolist()
    assert out[1] == 0 and out[2] == V // 2


def test_greedy_sampling_reads_bf16_logits_natively():
    """The native greedy path on bf16 logits picks what torch's argmax of the float32 copy
    picks, and mixed batches (greedy + seeded + logprobs) still work on float32."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1000, generator=g) * 3).bfloat16()
    greedy = [SamplingState.create(SamplingParams(temperature=0.0), 4) for _ in range(6)]
    toks, _ = sample(logits, greedy, torch.Generator(), native=True)
    assert toks == logits.float().argmax(dim=-1).tolist()
    mixed = greedy[:3] + [
        SamplingState.create(SamplingParams(temperature=0.8, seed=1), 4),
        SamplingState.create(SamplingParams(temperature=0.0, logprobs=2), 4),
        SamplingState.create(SamplingParams(temperature=1.0, top_k=1), 4),
    ]
    toks, lps = sample(logits, mixed, torch.Generator(), native=True)
    want = logits.float().argmax(dim=-1).tolist()
    assert toks[:3] == want[:3] and toks[4] == want[4] and toks[5] == want[5]
    assert lps is not None and lps[4] is not None and len(lps[4].top_ids) == 2


@pytest.mark.parametrize("rows,n", [(1, 1536), (5, 23), (64, 1536)])  # 23: a vector tail
def test_silu_and_mul_matches_eager(rows, n):
    g = torch.Generator().manual_seed(rows * n)
    x = (torch.randn(rows, 2 * n, generator=g) * 4).bfloat16()
    x[0, :4] = torch.tensor([-95.0, 95.0, 0.0, -3.0e-38])  # exp's clamps, zero, a denormal output
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    torch.ops.flotilla.silu_and_mul(out, x)
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up  # eager bf16: silu rounded to bf16, then the product rounded
    # Our exp differs from torch's in the last float32 bits, which survive the bf16 rounding
    # in at most a few elements, by one bf16 step.
    close = torch.isclose(out.float(), want.float(), rtol=2**-7, atol=1e-30)
    assert close.all()
    assert (out != want).float().mean() < 0.01


@pytest.mark.parametrize("rows,n", [(1, 1536), (5, 23), (64, 1536)])  # 23: a vector tail
def test_silu_and_mul_float32_matches_eager(rows, n):
    """float32 (the AVX2 path's 8 lanes where built, the scalar loop for the tail): within
    float32 rounding of torch's, clamps included."""
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, 2 * n, generator=g) * 4
    x[0, :4] = torch.tensor([-95.0, 95.0, 0.0, -3.0e-38])
    x[0, n - 2 : n] = torch.tensor([-95.0, 95.0])  # the clamps in the last (tail) lanes too
    out = torch.empty(rows, n)
    torch.ops.flotilla.silu_and_mul(out, x)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=4e-6, atol=1e-30)


def _differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fraction of elements that differ (NaN against NaN counts as equal)."""
    return ((a != b) & ~(a.isnan() & b.isnan())).float().mean()


def _eager_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: float32 statistics, rounded to the dtype, times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("H", [576, 64, 40])  # 40: not a multiple of the vector width
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_bf16_rms_norms_match_eager(H, rows):
    """rms_norm and fused_add_rms_norm in bf16 against the eager code, with a denormal and a
    NaN among the inputs (the vector path's hardware rounding would flush / requiet those, so
    it must hand such vectors to the exact rounding): the residual sum bit for bit, the norm
    within two bf16 steps where float32 summation order moves a rounding (rarely: < 1%)."""
    g = torch.Generator().manual_seed(rows * H)
    x = (torch.randn(rows, H, generator=g) * 3).bfloat16()
    res = (torch.randn(rows, H, generator=g) * 3).bfloat16()
    w = torch.randn(H, generator=g).bfloat16()
    x[0, :3] = torch.tensor([1.0e-39, 0.0, -0.0])
    res[0, :3] = torch.tensor([0.0, 0.0, -0.0])  # sums: a denormal, +0, -0
    if rows > 1:
        x[1, 5] = float("nan")
    eps = 1e-6
    out = torch.empty_like(x)
    torch.ops.flotilla.rms_norm(out, x, w, eps)
    want = _eager_rms_norm(x, w, eps)
    # x * inv can land within a float32 ulp of a bf16 tie, so the summation order (or 1/sqrt
    # against torch's rsqrt) moves its rounding by one step, and the product with the weight
    # rounds again: up to two bf16 steps (seen on AVX2 at H=576, rows=64: 3 of 36,864)
    rtol = 2**-6
    close = torch.isclose(out.float(), want.float(), rtol=rtol, atol=1e-30, equal_nan=True)
    assert close.all() and _differ(out, want) < 0.01
    x2, res2 = x.clone(), res.clone()
    torch.ops.flotilla.fused_add_rms_norm(x2, res2, w, eps)
    want_res = res + x
    nan = want_res.isnan()  # (NaN payloads aside: ours is the canonical quiet NaN)
    assert torch.equal(res2.isnan(), nan)
    assert torch.equal(res2.view(torch.int16)[~nan], want_res.view(torch.int16)[~nan])
    assert res2[0, 0] != 0 and res2[0, 2].view(torch.int16) == -32768  # denormal kept, -0 kept
    want = _eager_rms_norm(want_res, w, eps)
    close = torch.isclose(x2.float(), want.float(), rtol=rtol, atol=1e-30, equal_nan=True)
    assert close.all() and _differ(x2, want) < 0.01
    if rows > 1:
        assert x2[1].isnan().all() and not x2[2:].isnan().any()


def test_bf16_rotary_matches_eager_rotate_half():
    """rotary_embedding in bf16 against the eager rotate-half code (each product rounded to
    bf16, then the sum), bit for bit: signed zeros, and products that round to bf16 denormals
    (which the vector path's hardware conversion would flush)."""
    g = torch.Generator().manual_seed(5)
    T, H, D = 37, 9, 64
    x = (torch.randn(T, H, D, generator=g) * 3).bfloat16()
    cos, sin = torch.randn(T, D, generator=g).bfloat16(), torch.randn(T, D, generator=g).bfloat16()
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    x[1, 2, :3] = 1.0e-20
    x[1, 2, D // 2 : D // 2 + 3] = 0.0  # their partners: nothing added to the denormals
    cos[1, :3] = 1.0e-19  # x * cos ~ 1e-39: a bf16 denormal
    half = D // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    want = x * cos[:, None, :] + rot * sin[:, None, :]
    got = x.clone()
    torch.ops.flotilla.rotary_embedding(got, cos, sin)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert (got[1, 2, :3] != 0).all()  # the denormals are there


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_cache_matches_index_copy(dtype):
    """k and v as the attention layer passes them: strided views into the fused QKV output."""
    g = torch.Generator().manual_seed(1)
    T, KVH, D, blocks, bs = 11, 3, 64, 6, 4
    qkv = torch.randn(T, (9 + 2 * KVH) * D, generator=g).to(dtype)
    _, k, v = qkv.split([9 * D, KVH * D, KVH * D], dim=-1)
    k, v = k.view(T, KVH, D), v.view(T, KVH, D)
    slots = torch.randperm(blocks * bs, generator=g)[:T]
    cache = torch.randn(2, blocks, bs, KVH, D, generator=g).to(dtype)
    want = cache.clone()
    want[0].view(-1, KVH, D).index_copy_(0, slots, k)
    want[1].view(-1, KVH, D).index_copy_(0, slots, v)
    torch.ops.flotilla.write_kv_cache(cache[0], cache[1], k, v, slots)
    assert torch.equal(cache, want)
    bad = slots.clone()
    bad[-1] = blocks * bs  # one past the last slot: refused before anything is written
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.flotilla.write_kv_cache(cache[0], cache[1], k * 0, v * 0, bad)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_qkv_cache_matches_its_three_ops(dtype):
    """rope_qkv_cache (the dense forward's step between QKV and attention) gives exactly what
    rotary_embedding on q and k, write_kv_cache and q.contiguous() give, and refuses a bad slot
    before writing anything."""
    g = torch.Generator().manual_seed(2)
    T, H, KVH, D, blocks, bs = 13, 9, 3, 64, 6, 4
    qkv = (torch.randn(T, (H + 2 * KVH) * D, generator=g) * 3).to(dtype)
    cos, sin = torch.randn(T, D, generator=g).to(dtype), torch.randn(T, D, generator=g).to(dtype)
    slots = torch.randperm(blocks * bs, generator=g)[:T]
    cache = torch.randn(2, blocks, bs, KVH, D, generator=g).to(dtype)
    ref_qkv, ref_cache = qkv.clone(), cache.clone()
    q, k, v = ref_qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    q, k, v = q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D)
    torch.ops.flotilla.rotary_embedding(q, cos, sin)
    torch.ops.flotilla.rotary_embedding(k, cos, sin)
    torch.ops.flotilla.write_kv_cache(ref_cache[0], ref_cache[1], k, v, slots)
    q_out = torch.empty(T, H, D, dtype=dtype)
    torch.ops.flotilla.rope_qkv_cache(q_out, cache[0], cache[1], qkv, cos, sin, slots)
    assert torch.equal(q_out, q.contiguous()) and torch.equal(cache, ref_cache)
    assert not torch.equal(q_out.view(T, -1), qkv[:, : H * D])  # it did rotate
    bad = slots.clone()
    bad[0] = -1
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.flotilla.rope_qkv_cache(q_out, cache[0], cache[1], qkv * 0, cos, sin, bad)
    assert torch.equal(cache, ref_cache)


@pytest.mark.parametrize(
    "M,N,K",
    [(1, 64, 64), (5, 100, 70), (33, 96, 576), (64, 576, 1536), (50, 49, 33), (300, 3072, 576)],
)
def test_amx_linear_matches_float64(M, N, K, needs):
    """Row tails (< 16, < 32), K and N tails (zero padding) and row chunking, with a bias: each
    output is the float64 sum rounded once to bf16, up to float32 summation error."""
    from workers.linear_methods import amx_pack

    needs("amx")
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    assert torch.ops.flotilla.amx_linear(out, x, amx_pack(w), b)
    ref = x.double() @ w.double().T
    sum_err = 1e-5 * (x.double().abs() @ w.double().abs().T)
    for bias in (b, None):
        want = ref if bias is None else ref + bias.double()
        assert torch.ops.flotilla.amx_linear(out, x, amx_pack(w), bias)
        assert ((out.double() - want).abs() <= want.abs() * 2**-8 + sum_err).all()


@pytest.mark.parametrize("M,n,K", [(1, 16, 64), (17, 48, 70), (64, 1536, 576), (300, 64, 96)])
def test_amx_swiglu_is_linear_then_silu_and_mul(M, n, K, needs):
    """The fused gate|up linear + SiLU-and-mul gives exactly the bits of the two ops."""
    from workers.linear_methods import amx_pack, amx_pack_swiglu

    needs("amx")
    g = torch.Generator().manual_seed(M + n + K)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(2 * n, K, generator=g) * 0.5).bfloat16()
    gate_up = torch.empty(M, 2 * n, dtype=torch.bfloat16)
    assert torch.ops.flotilla.amx_linear(gate_up, x, amx_pack(w), None)
    want = torch.empty(M, n, dtype=torch.bfloat16)
    torch.ops.flotilla.silu_and_mul(want, gate_up)
    got = torch.full((M, n), float("nan"), dtype=torch.bfloat16)
    assert torch.ops.flotilla.amx_swiglu(got, x, amx_pack_swiglu(w))
    assert torch.equal(got, want)


def test_amx_linear_checks_shapes():
    """Checked on every build, AMX or not: a bad call fails everywhere."""
    from workers.linear_methods import amx_pack

    x = torch.randn(4, 64).bfloat16()
    w = amx_pack(torch.randn(64, 64).bfloat16())
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.flotilla.amx_linear(torch.empty(4, 96, dtype=torch.bfloat16), x, w, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.flotilla.amx_linear(torch.empty(4, 64, dtype=torch.bfloat16), x, w, torch.ones(3))


def test_amx_ops_decline_without_the_amx_path(kernel_plan):
    """Where the plan has no AMX (CPU, permission or build), every AMX op returns False and
    writes nothing, so a caller that tries anyway still takes torch's path."""
    from workers.linear_methods import amx_pack, amx_pack_swiglu

    if kernel_plan.amx:
        pytest.skip("this machine takes the AMX path (tested by the tests above)")
    x = torch.randn(4, 64).bfloat16()
    w = torch.randn(64, 64).bfloat16()
    out = torch.full((4, 64), 7.0, dtype=torch.bfloat16)
    assert not torch.ops.flotilla.amx_linear(out, x, amx_pack(w), None)
    act = torch.full((4, 32), 7.0, dtype=torch.bfloat16)
    assert not torch.ops.flotilla.amx_swiglu(act, x, amx_pack_swiglu(w))
    idx = torch.full((4,), 7, dtype=torch.long)
    assert not torch.ops.flotilla.amx_argmax(idx, x, amx_pack(w), 64)
    assert (out == 7).all() and (act == 7).all() and (idx == 7).all()


@pytest.mark.parametrize("rows", [1, 3, 17, 64, 300])  # 300: past AMX_MAX_ROWS, torch's linear
@pytest.mark.parametrize("prepack", [True, False])
def test_planned_linear_method_matches_unpacked(rows, prepack, kernel_plan):
    """A bf16 linear layer with the method this machine's plan attaches (AMX, GEMV,
    oneDNN-prepacked or torch's) gives torch's linear within bf16 rounding, on both sides of
    AMX_MAX_ROWS and of the GEMV's row limit, exactly where the method is torch's; the weight
    it was loaded with stays in place."""
    from parallel.layers import TORCH_LINEAR, ColumnParallelLinear
    from workers.linear_methods import attach_linear_methods

    torch.manual_seed(rows)
    layer = ColumnParallelLinear(576, 960, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(rows, 576).bfloat16()
    want = F.linear(x, layer.weight, layer.bias)
    w0 = layer.weight.clone()
    attach_linear_methods(layer, kernel_plan, prepack)
    got = layer(x)
    ref = x.double() @ layer.weight.double().T + layer.bias.double()
    bound = ref.abs() * 2**-7 + 1e-4 * (x.double().abs() @ layer.weight.double().abs().T)
    assert ((got.double() - ref).abs() <= bound).all()
    assert torch.equal(layer.weight, w0)
    if layer.linear_method is TORCH_LINEAR:
        assert torch.equal(got, want)


@pytest.mark.parametrize("M,N", [(1, 49152), (64, 49157), (5, 77), (40, 1000)])
def test_amx_argmax_is_linear_then_argmax_rows(M, N, needs):
    """The fused greedy LM head picks what argmax_rows picks from amx_linear's bf16 logits:
    ties (duplicate weight rows) go to the first column, also across the two threads' column
    ranges; NaN never wins; a row of NaNs gives 0; N not a multiple of the 32-column panel."""
    from workers.linear_methods import amx_pack

    needs("amx")
    g = torch.Generator().manual_seed(M * N)
    K = 96
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(N, K, generator=g) * 0.1).bfloat16()
    hot = N - 3  # the same best row three times: near the start, middle and end
    w[hot] = w[N // 2] = w[7] = x[0].float().sign().bfloat16() * 0.5
    if M > 1:
        x[1] = float("nan")  # every logit NaN: index 0
    wp = amx_pack(w)
    logits = torch.empty(M, N, dtype=torch.bfloat16)
    assert torch.ops.flotilla.amx_linear(logits, x, wp, None)
    want = torch.empty(M, dtype=torch.long)
    torch.ops.flotilla.argmax_rows(want, logits)
    got = torch.full((M,), -1, dtype=torch.long)
    assert torch.ops.flotilla.amx_argmax(got, x, wp, N)
    assert got.tolist() == want.tolist()
    assert got[0] == 7
    if M > 1:
        assert got[1] == 0
