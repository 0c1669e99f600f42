"""Run the real `flotilla` command in a subprocess and find every process it left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

MARK_ENV = "FLOTILLA_TEST_PROCESS_MARK"


def marked_env(**extra: str) -> tuple[dict[str, str], str]:
    """The test's environment plus a unique marker that every process the command starts
    (Ray's GCS, raylet, workers, Serve's actors) inherits."""
    mark = uuid.uuid4().hex
    return os.environ | {MARK_ENV: mark, "PYTHONUNBUFFERED": "1"} | extra, mark


def processes_with(mark: str) -> list[int]:
    """Live processes whose environment carries `mark`."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = next(
                (ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")),
                "",
            )
        except OSError:
            continue
        if needle in env.split(b"\0") and "zombie" not in state:
            found.append(int(d.name))
    return found


def wait_gone(mark: str, timeout_s: float = 30.0) -> list[int]:
    """Bounded wait until nothing marked is alive; returns what is still alive then."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_with(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_marked(mark: str) -> None:
    for pid in processes_with(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def flotilla(
    *args: str, env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )
