"""The kernel plan of this machine (workers/kernels/dispatch.py), for tests whose expectations
depend on which path an op takes here. Built lazily: only tests that ask load the kernels."""

from __future__ import annotations

import pytest
import torch

# What each plan flag needs; a test that can only run on such hardware skips saying so.
_HARDWARE = {
    "amx": "an AMX-BF16 CPU (the AMX tile kernels have no other path; their decline is "
    "tested everywhere)",
    "gemv_bf16": "an AVX512-BF16 CPU (the bf16 GEMV has no other path; its decline is tested "
    "everywhere)",
    "w8": "an AVX2+FMA or AVX-512 CPU (the int8 linear kernel has no other path; its decline "
    "and torch's fallback are tested everywhere)",
    "f32": "an AVX2+FMA or AVX-512 CPU (the float32 small-batch linear kernel has no other "
    "path; its decline and torch's fallback are tested everywhere)",
    "f32_packed": "an AVX2+FMA or AVX-512 CPU (the packed float32 GEMM has no other path; its "
    "decline and torch's fallback are tested everywhere)",
    "prefill_attention": "an AVX512-BF16 CPU (the prefill kernel has no other path; SDPA is "
    "tested everywhere)",
    "prefill_attention_f32": "an AVX2+FMA or AVX-512 CPU (the float32 prefill kernel has no "
    "other path; SDPA is tested everywhere)",
}


@pytest.fixture(scope="session")
def kernel_plan():
    from workers.kernels import load_cpu_kernels
    from workers.kernels.dispatch import decide

    assert load_cpu_kernels()
    return decide("native", torch.device("cpu"))


@pytest.fixture
def needs(kernel_plan):
    """needs("amx"): skip, naming the hardware, unless this machine's plan takes that path."""

    def check(path: str) -> None:
        if not getattr(kernel_plan, path):
            pytest.skip(f"needs {_HARDWARE[path]}")

    return check
