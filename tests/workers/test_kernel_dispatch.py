"""workers/kernels/dispatch.py: the plan for each class of CI machine (from synthetic build
reports, so every class is checked on any machine) and the real library's report here."""

from __future__ import annotations

import os

import pytest
import torch

from workers.kernels.dispatch import (
    F32_DOT_ROWS,
    F32_MAX_ROWS,
    W8_MAX_ROWS,
    BuildInfo,
    KernelPlan,
    decide,
)

AVX2 = {"sse2", "avx", "avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
BF16 = AVX512 | {"avx512bf16"}
AMX = BF16 | {"amx-tile", "amx-bf16"}
PATHS = {  # what parallel/kernels/isa.h compiles in for a -march=native build on such a CPU
    "portable": set(),
    "avx2": {"x86", "avx2"},
    "avx512": {"x86", "avx2", "avx512"},
    "bf16": {"x86", "avx2", "avx512", "avx512_bf16"},
    "amx": {"x86", "avx2", "avx512", "avx512_bf16", "amx"},
}
W8 = dict(w8=True, w8_max_rows=W8_MAX_ROWS, f32=True, f32_max_rows=F32_MAX_ROWS)
W8.update(f32_packed=True, f32_dot_rows=F32_DOT_ROWS, prefill_attention_f32=True)


def _info(features: set[str], paths: str, cpu: set[str] | None = None, permitted=True):
    return BuildInfo(
        frozenset(features), frozenset(PATHS[paths]), frozenset(cpu or features), permitted
    )


@pytest.mark.parametrize(
    "info,want",
    [
        (_info(AVX2, "avx2"), KernelPlan(native=True, **W8)),
        (_info(AVX512, "avx512"), KernelPlan(native=True, **W8)),
        (
            _info(BF16, "bf16"),
            KernelPlan(native=True, prefill_attention=True, gemv_bf16=True, gemv_max_rows=4, **W8),
        ),
        (
            _info(AMX, "amx"),
            KernelPlan(
                native=True,
                prefill_attention=True,
                amx=True,
                gemv_bf16=True,
                gemv_max_rows=1,
                **W8,
            ),
        ),
        # Linux refused the tile data: no AMX kernels; oneDNN still has AMX, so 1 GEMV row
        (
            _info(AMX, "amx", permitted=False),
            KernelPlan(native=True, prefill_attention=True, gemv_bf16=True, gemv_max_rows=1, **W8),
        ),
        # a lower build on an AMX CPU (FLOTILLA_KERNEL_TARGET=cooperlake): the BF16 paths
        (
            _info(BF16, "bf16", cpu=AMX),
            KernelPlan(native=True, prefill_attention=True, gemv_bf16=True, gemv_max_rows=1, **W8),
        ),
        # built for a CPU this one is not: nothing native at all
        (_info(AMX, "amx", cpu=AVX2), KernelPlan()),
        # a portable build (FLOTILLA_KERNEL_TARGET=portable): native ops, no int8 kernel
        (_info(set(), "portable", cpu=AVX2), KernelPlan(native=True)),
    ],
    ids=[
        "avx2",
        "avx512",
        "avx512-bf16",
        "amx",
        "amx-not-permitted",
        "lower-build",
        "foreign",
        "portable",
    ],
)
def test_plan_per_machine_class(info, want):
    assert KernelPlan.from_info(info, onednn_bf16=False) == want
    assert want.greedy_head == want.amx
    assert want.dense_layers == (want.amx or want.f32_packed or want.w8)


def test_model_kernels_choice():
    cpu = torch.device("cpu")
    assert not decide("torch", cpu).native
    with pytest.raises(ValueError, match="needs device 'cpu'"):
        decide("native", torch.device("cuda"))
    assert decide("auto", torch.device("cuda")) == KernelPlan()


def test_build_info_reports_the_build_and_this_cpu(kernel_plan):
    """The library's own report: a native build compiles what the CPU has (so its paths are
    taken); a portable one compiles no ISA path; the report parses and runs here either way."""
    info = BuildInfo.query()
    assert info.runs_here and kernel_plan.native
    target = os.environ.get("FLOTILLA_KERNEL_TARGET") or "native"
    if target == "portable":
        assert info.paths == frozenset()
    if target == "native" and "avx2" in info.cpu:
        assert "avx2" in info.compiled and "x86" in info.paths
    assert ("avx512" in info.paths) == ("avx512f" in info.compiled)
    assert ("avx2" in info.paths) == ({"avx2", "fma"} <= info.compiled)
    assert kernel_plan.w8 == bool({"avx2", "avx512"} & info.paths)
    assert kernel_plan.amx <= ("amx" in info.paths and info.amx_permitted)
