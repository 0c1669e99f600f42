"""benchmarks/gpu_smoke.py on a machine without a GPU: it says so plainly and exits 0; its dry
run on the CPU (`--device cpu`) passes, so the script itself is known to work before anyone
spends GPU time on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"


def _run(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_0():
    out = _run(timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no CUDA device: nothing run"


@pytest.mark.slow
def test_dry_run_on_the_cpu_passes():
    """One model, one rank in both dtypes, then tp=2 and pp=2 as Ray actors over gloo."""
    out = _run("--device", "cpu", "--archs", "llama", timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(lines) == 4 and all(ln.startswith("ok") for ln in lines), out.stdout
    assert "4 of 4 checks passed" in out.stdout
