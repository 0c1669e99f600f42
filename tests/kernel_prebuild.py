"""The native libraries a test session loads, built ahead in a background process at the lowest
CPU priority (tests/conftest.py starts it): on a fresh machine their compiles then use the core
that collection and single-threaded tests leave idle, instead of holding up the first test that
loads them. It shares the tests' cache, key and lock (parallel/native_build.py): a test that
needs a library still being built waits on the lock, and a build that failed here fails again,
with its message, in the test that loads it.

    python tests/kernel_prebuild.py [--lower]    this CPU's libraries; --lower: also the CPU
                                                 kernels one target below (lower_target)
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lower_target(cpu: frozenset[str]) -> str:
    """The build target one step below this CPU's best kernel path: its ops then take the
    branch that the next class of CI machine takes (AMX -> AVX512-BF16 -> AVX-512 -> AVX2 ->
    portable scalar)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "portable"
    if "amx-bf16" in cpu:
        return "cooperlake"
    if "avx512bf16" in cpu:
        return "skylake-avx512"
    if "avx512f" in cpu:
        return "x86-64-v3"
    return "portable"


def start(lower: bool) -> subprocess.Popen | None:
    """The background build, or None: where the tests build nothing (no g++, kernels off), and
    in a session on a chosen target (such as the lower-target test's own op tests), which
    builds what it loads when it loads it."""
    if os.environ.get("FLOTILLA_DISABLE_KERNELS") == "1" or shutil.which("g++") is None:
        return None
    if os.environ.get("FLOTILLA_KERNEL_TARGET"):
        return None
    argv = [sys.executable, __file__, *(["--lower"] if lower else [])]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.nice(19),
        start_new_session=True,
    )


def main(argv: list[str]) -> int:
    # Stopped with the session: exit through the build's cleanup (its temporary folder in the
    # cache); the compilers, in this process group, get the signal too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.path.insert(0, str(ROOT))
    from parallel.shm_comm import load_comm_kernels
    from workers.kernels import build, load_cpu_kernels

    # The libraries this CPU loads first: once they are in the cache, a test's load takes no
    # lock, so the lower target's build below holds up nobody but the test that wants it.
    if not load_cpu_kernels():
        return 1
    load_comm_kernels()
    if "--lower" in argv:
        from workers.kernels.dispatch import BuildInfo

        os.environ["FLOTILLA_KERNEL_TARGET"] = lower_target(BuildInfo.query().cpu)
        build()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
