"""The native kernel sources build for every CPU the project runs on, not only this one.

`-march=native` builds only the paths of the CPU at hand; CI machines differ (AVX2 only,
AVX-512 without BF16, AVX512-BF16 without AMX, AMX) and so may the next one. Here the sources
of both native libraries (workers/kernels, parallel/kernels) are compiled for each target with
the real build's flags (parallel.native_build.compile_flags) and -Werror, as objects at -O0:
fast, and GCC still reports an intrinsic inlined into a function of the wrong target (an
always_inline mismatch) at -O0. The portable target (-DFLOTILLA_PORTABLE) compiles what a
machine without x86 intrinsics compiles. A target that fails fails the test.

To parse torch's headers once per target, each target compiles one unit that #includes every
.cpp (the files must therefore also build as one unit: file-local names stay distinct).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kernel_prebuild import lower_target

from parallel import native_build
from parallel.shm_comm import COMM_KERNELS
from workers.kernels import CPU_KERNELS

# target -> the kernel paths (parallel/kernels/isa.h) it must compile in
X86_TARGETS = {
    "x86-64": [],  # baseline (SSE2): the generic loops
    "x86-64-v3": ["FLOTILLA_AVX2"],  # AVX2 + FMA: this CI class has no AVX-512
    "skylake-avx512": ["FLOTILLA_AVX2", "FLOTILLA_AVX512"],
    "cooperlake": ["FLOTILLA_AVX2", "FLOTILLA_AVX512", "FLOTILLA_AVX512_BF16"],
    "sapphirerapids": ["FLOTILLA_AVX2", "FLOTILLA_AVX512", "FLOTILLA_AVX512_BF16", "FLOTILLA_AMX"],
}
ALL_PATHS = [
    "FLOTILLA_X86",
    "FLOTILLA_AVX2",
    "FLOTILLA_AVX512",
    "FLOTILLA_AVX512_BF16",
    "FLOTILLA_AMX",
]


def _unit(tmp: Path, name: str, want_on: list[str], want_off: list[str]) -> Path:
    """One unit: every source, then compile-time checks that the target's paths are in."""
    lines = [f'#include "{src}"' for src in (*CPU_KERNELS.sources, *COMM_KERNELS.sources)]
    for macro in want_on:
        lines.append(f'static_assert({macro}, "{name}: {macro} should be compiled in");')
    for macro in want_off:
        lines.append(f'static_assert(!{macro}, "{name}: {macro} should be off");')
    path = tmp / f"unit_{name}.cpp"
    path.write_text("\n".join(lines) + "\n")
    return path


def _compile(cxx: str, tmp: Path, name: str, flags: list[str], unit: Path):
    lib = native_build.NativeLib("flotilla_check", (), include_dirs=CPU_KERNELS.include_dirs)
    cmd = [cxx, "-O0", "-c", "-Werror", *native_build.compile_flags(lib, name), *flags]
    cmd += [str(unit), "-o", str(tmp / f"{name}.o")]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return name, res.returncode, res.stderr[-3000:], time.monotonic() - t0


def test_sources_build_for_every_target(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ (the native kernels are optional without one)")
    jobs = {"portable": _unit(tmp_path, "portable", [], ALL_PATHS)}
    if platform.machine() in ("x86_64", "AMD64"):
        for name, paths in X86_TARGETS.items():
            on = ["FLOTILLA_X86", *paths]
            jobs[name] = _unit(tmp_path, name, on, [p for p in ALL_PATHS if p not in on])
    with ThreadPoolExecutor(max_workers=2) as pool:  # CI boxes have 2 cores
        done = list(pool.map(lambda kv: _compile(cxx, tmp_path, kv[0], [], kv[1]), jobs.items()))
    failed = {name: err for name, rc, err, _ in done if rc != 0}
    assert not failed, "\n\n".join(f"--- {n}:\n{e}" for n, e in failed.items())


def test_sources_parse_for_aarch64(tmp_path):
    """Where a cross compiler is installed (apt: g++-aarch64-linux-gnu): the natural non-x86
    path, syntax only (this machine's torch headers stand in for an aarch64 install's)."""
    cxx = shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        pytest.skip("no aarch64-linux-gnu-g++ (apt: g++-aarch64-linux-gnu)")
    unit = _unit(tmp_path, "aarch64", [], ALL_PATHS)
    lib = native_build.NativeLib("flotilla_check", (), include_dirs=CPU_KERNELS.include_dirs)
    flags = native_build.compile_flags(lib, "armv8.2-a")
    res = subprocess.run(
        [cxx, "-fsyntax-only", "-Werror", *flags, str(unit)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]


OP_TESTS = [
    "tests/workers/test_cpu_ops.py",
    "tests/workers/test_paged_kernel.py",
    "tests/workers/test_int8.py",
    "tests/workers/test_kv_int8.py",
    "tests/workers/test_kv_int8_prefill.py",
    "tests/workers/test_linear_f32.py",
]


def test_op_tests_pass_on_a_lower_target(kernel_plan):
    """Builds the library one step below this CPU (FLOTILLA_KERNEL_TARGET) and runs the op
    tests against it in a fresh process: the branch below the one -march=native takes is
    checked against torch on this machine too (on an AVX2 machine: the portable paths). In a
    session that selects this test the build starts ahead, in the background
    (tests/kernel_prebuild.py); the op tests' process waits for it on the cache's lock."""
    if os.environ.get("FLOTILLA_KERNEL_TARGET"):
        pytest.skip("this run is already on a chosen target")
    from workers.kernels.dispatch import BuildInfo

    target = lower_target(BuildInfo.query().cpu)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, FLOTILLA_KERNEL_TARGET=target)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OP_TESTS],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, f"target {target}:\n{res.stdout[-6000:]}{res.stderr[-2000:]}"
