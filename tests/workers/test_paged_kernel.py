"""The native CPU decode-attention kernel against a float64 reference and against the SDPA
gather path, on random caches with shuffled block tables, GQA, sliding windows and dtypes."""

from __future__ import annotations

import pytest
import torch
from attention_reference import decode_reference, mixed_batch, prefill_reference, shuffled_tables

from workers.attention import build_metadata, paged_attention
from workers.kernels import build, load_cpu_kernels

BS = 4


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    """Every test here calls the ops directly: load them whatever subset of tests runs."""
    assert load_cpu_kernels()


def test_kernels_build_and_load():
    """g++ is part of the supported set-up (Linux): the native ops must build, not be skipped.
    build() raises with the compiler's output if they don't."""
    assert build().exists()
    assert load_cpu_kernels()
    assert hasattr(torch.ops.flotilla, "paged_decode_attention")


def _setup(lens, H, KVH, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tables, num_blocks = shuffled_tables([-(-n // BS) for n in lens], 5, g)
    cache = torch.randn(2, num_blocks, BS, KVH, D, generator=g).to(dtype)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    return q, cache, tables


def _reference(q, cache, tables, lens, scale, window):
    return decode_reference(q, cache, tables, lens, scale, window)


def _kernel(q, cache, tables, lens, scale, window):
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = torch.empty_like(q)
    torch.ops.flotilla.paged_decode_attention(
        out, q, cache[0], cache[1], bt, torch.tensor(lens, dtype=torch.int32), scale, window
    )
    return out


@pytest.mark.parametrize("D,H,KVH", [(16, 4, 4), (64, 9, 3), (32, 8, 2), (24, 4, 2), (128, 4, 2)])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("lens", [[1, 3, 4, 5, 17, 33, 60], [45]], ids=["batch", "single"])
def test_kernel_matches_float64_reference(D, H, KVH, window, lens):
    """Many sequences: one task per sequence (all heads); one sequence: one task per KV head.
    Float32 takes attend_avx512 where D is a multiple of 16 on AVX-512, attend_avx2 on AVX2
    (D = 24: 3 vectors; 128: four 32-column passes; G = 1..4 query heads a pass), the generic
    loops otherwise (D = 24 on AVX-512; every case in the lower-target run of
    tests/workers/test_kernel_targets.py on an AVX2 machine)."""
    q, cache, tables = _setup(lens, H, KVH, D, torch.float32)
    scale = D**-0.5
    got = _kernel(q, cache, tables, lens, scale, window)
    want = _reference(q, cache, tables, lens, scale, window)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("spike", ["first", "last", "none"])
def test_kernel_online_softmax_rescales(spike):
    """The kernel walks keys 16 at a time keeping a running max: a dominant key in the first
    chunk (later chunks add almost nothing), in the last chunk (everything accumulated so far
    is rescaled by ~e^-40), or none, over sequences of many chunks and a partial last chunk."""
    lens = [150, 203, 97, 64]
    H, KVH, D = 6, 2, 64
    q, cache, tables = _setup(lens, H, KVH, D, torch.float32, seed=4)
    if spike != "none":
        for i, (t, n) in enumerate(zip(tables, lens, strict=True)):
            pos = 1 if spike == "first" else n - 2
            blk, off = t[pos // BS], pos % BS
            for kv in range(KVH):  # key = 6 x the mean query of its group: scores ~ +40
                cache[0, blk, off, kv] = 6 * q[i, kv * (H // KVH) : (kv + 1) * (H // KVH)].mean(0)
    got = _kernel(q, cache, tables, lens, D**-0.5, 0)
    want = _reference(q, cache, tables, lens, D**-0.5, 0)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)


def test_kernel_bf16_rounds_like_torch():
    lens = [2, 9, 40, 128]
    q, cache, tables = _setup(lens, 6, 2, 64, torch.bfloat16, seed=1)
    got = _kernel(q, cache, tables, lens, 0.125, 0)
    want = _reference(q, cache, tables, lens, 0.125, 0)
    assert got.dtype == torch.bfloat16
    # Accumulated in float32 from the same bf16 inputs: only the final rounding differs.
    torch.testing.assert_close(got, want.to(torch.bfloat16), atol=1e-3, rtol=2**-7)


@pytest.mark.parametrize("window", [None, 6])
def test_kernel_path_equals_sdpa_path(window):
    """The whole decode path (metadata + paged_attention) with and without the kernel."""
    lens = [3, 8, 8, 21, 50]  # ascending, as the runner lays decodes out
    H, KVH, D = 6, 2, 16
    q, cache, tables = _setup(lens, H, KVH, D, torch.float32, seed=2)
    k_new = torch.randn(len(lens), KVH, D)
    v_new = torch.randn(len(lens), KVH, D)
    slots = [t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lens, strict=True)]
    outs = []
    for use_kernel in (True, False):
        meta = build_metadata(
            [n - 1 for n in lens],
            slots,
            tables,
            lens,
            [],
            BS,
            torch.device("cpu"),
            native=use_kernel,
        )
        assert (meta.decode_tables is not None) == use_kernel
        c = cache.clone()
        outs.append(paged_attention(q, k_new, v_new, c, meta, D**-0.5, window))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_kernel_rejects_bad_inputs():
    q, cache, tables = _setup([4], 4, 2, 16, torch.float32)
    bt = torch.tensor([tables[0]], dtype=torch.int64)  # must be int32
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.flotilla.paged_decode_attention(
            torch.empty_like(q),
            q,
            cache[0],
            cache[1],
            bt,
            torch.tensor([4], dtype=torch.int32),
            0.25,
            0,
        )
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.flotilla.paged_decode_attention(
            torch.empty_like(q),
            q.bfloat16(),
            cache[0],
            cache[1],
            bt.int(),
            torch.tensor([4], dtype=torch.int32),
            0.25,
            0,
        )


def _prefill_setup(chunks, H, KVH, D, seed, dtype=torch.bfloat16):
    """chunks: (q_len, start_pos) each; returns q [T, H, D], cache, tables, kernel args."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(n + s) // BS) for n, s in chunks]
    tables, num_blocks = shuffled_tables(need, 3, g)
    cache = torch.randn(2, num_blocks, BS, KVH, D, generator=g).to(dtype)
    q = torch.randn(sum(n for n, _ in chunks), H, D, generator=g).to(dtype)
    starts = [sum(n for n, _ in chunks[:j]) for j in range(len(chunks))]
    width = max(need)
    args = (
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor([n for n, _ in chunks], dtype=torch.int32),
        torch.tensor([s for _, s in chunks], dtype=torch.int32),
    )
    return q, cache, tables, starts, args


@pytest.mark.parametrize("D,H,KVH", [(64, 9, 3), (128, 4, 4), (64, 8, 1), (16, 4, 2), (96, 2, 1)])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_prefill_kernel_matches_float64_reference(D, H, KVH, window, dtype, needs):
    """Chunks of every kind in one call: from position 0, continuing after cached context (a
    later chunk of chunked prefill, or a prefix-cache hit), single tokens, and spans longer
    than one task (bf16 128 positions, float32 64) and than one register block (16 / 4 rows)."""
    chunks = [(37, 0), (1, 0), (20, 13), (150, 0), (5, 200), (16, 16)]
    q, cache, tables, starts, args = _prefill_setup(chunks, H, KVH, D, D + H + window, dtype)
    needs("prefill_attention" if dtype == torch.bfloat16 else "prefill_attention_f32")
    out = torch.zeros_like(q)
    assert torch.ops.flotilla.paged_prefill_attention(
        out, q, cache[0], cache[1], *args, D**-0.5, window
    )
    # bf16 inputs, float32 accumulation, probabilities rounded to bf16 (as torch's CPU flash
    # kernel does): within a few bf16 ulps of the exact result; float32 throughout: within
    # float32 summation error
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    for (n, sp), t, q0 in zip(chunks, tables, starts, strict=True):
        want = prefill_reference(q[q0 : q0 + n], cache, t, sp, D**-0.5, window)
        torch.testing.assert_close(out[q0 : q0 + n].double(), want, atol=tol, rtol=tol)


def test_prefill_kernel_declines_without_its_path(kernel_plan):
    """Where the plan has no prefill kernel (no AVX512-BF16), bf16 is declined too and nothing
    written: SDPA runs (test_prefill_kernel_path_equals_sdpa_path)."""
    if kernel_plan.prefill_attention:
        pytest.skip("this machine takes the prefill kernel (tested above)")
    q, cache, tables, starts, args = _prefill_setup([(8, 0)], 4, 2, 64, seed=0)
    out = torch.zeros_like(q)
    assert not torch.ops.flotilla.paged_prefill_attention(
        out, q, cache[0], cache[1], *args, 0.125, 0
    )
    assert not out.any()


def test_prefill_kernel_float32_declines_without_its_path(kernel_plan):
    """float32 runs where the plan says (AVX2 / AVX-512), and elsewhere declines, writing
    nothing (a portable build: tests/workers/test_kernel_targets.py runs this file there)."""
    q, cache, tables, starts, args = _prefill_setup([(8, 0)], 4, 2, 64, 0, torch.float32)
    out = torch.zeros(q.shape)
    ok = torch.ops.flotilla.paged_prefill_attention(out, q, cache[0], cache[1], *args, 0.125, 0)
    assert ok == kernel_plan.prefill_attention_f32
    assert out.any() == ok  # declined: nothing written


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_prefill_kernel_path_equals_sdpa_path(window, dtype):
    """The whole mixed-batch path (metadata + paged_attention) with and without native
    kernels: decodes and prefill chunks (fresh and continuing) in one batch."""
    H, KVH, D = 6, 2, 64
    g = torch.Generator().manual_seed(3)
    batch = mixed_batch([5, 9], [(12, 0), (7, 10)], BS, g)  # decodes (ascending), chunks
    cache = torch.randn(2, batch.num_blocks, BS, KVH, D, generator=g).to(dtype)
    T = batch.num_tokens
    q = torch.randn(T, H, D, generator=g).to(dtype)
    k_new = torch.randn(T, KVH, D, generator=g).to(dtype)
    v_new = torch.randn(T, KVH, D, generator=g).to(dtype)
    outs = []
    for native in (True, False):
        meta = batch.metadata(native)
        assert (meta.prefill_kernel is not None) == native
        outs.append(paged_attention(q, k_new, v_new, cache.clone(), meta, D**-0.5, window))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("K,N", [(576, 960), (100, 7)])  # 100: a K tail that is not 32-aligned
def test_gemv_bf16_matches_float_matmul(M, K, N, kernel_plan):
    """Where the plan has the GEMV (AVX512-BF16): against float64. Elsewhere the op must
    decline (the linear methods then use torch's linear: test_planned_linear_method_*)."""
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    out = torch.empty(M, N, dtype=torch.bfloat16)
    ok = torch.ops.flotilla.gemv_bf16(out, x, w)
    assert ok == kernel_plan.gemv_bf16
    if not ok:
        return
    want = (x.double() @ w.double().T).bfloat16()
    # bf16 products are exact in float32; only float32 summation order and the final rounding
    # differ from the float64 reference.
    torch.testing.assert_close(out, want, atol=1e-2, rtol=2**-7)
    assert not torch.ops.flotilla.gemv_bf16(
        torch.empty(9, N, dtype=torch.bfloat16), torch.randn(9, K).bfloat16(), w
    )  # more rows than the kernel handles: declined, not wrong
