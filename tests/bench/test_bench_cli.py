"""Bad `flotilla bench` flags and unreachable endpoints: a clear message on stderr, exit 2.
Each case is a real subprocess of the installed command's module; none needs a server."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

ENDPOINT = ["--endpoint", "grpc://127.0.0.1:9"]


def _flotilla(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "bench", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*ENDPOINT, "--rate", "-1"], "--rate must be > 0"),
        ([*ENDPOINT, "--rates", "1,0,4"], "--rates entry must be > 0"),
        ([*ENDPOINT, "--num-requests", "0"], "--num-requests: the value must be > 0"),
        ([*ENDPOINT, "--concurrency", "two"], "must be a number"),
        (["--endpoint", "ftp://127.0.0.1:21"], "unknown scheme 'ftp'"),
        (["--endpoint", "127.0.0.1:9000"], "unknown scheme"),
        (["--endpoint", "grpc://127.0.0.1"], "grpc://HOST:PORT"),
        ([*ENDPOINT, "--input-len", "uniform:9,4"], "length spec 'uniform:9,4'"),
        ([*ENDPOINT, "--output-len", "zipf:2"], "length spec"),
        ([*ENDPOINT, "--long-fraction", "1.5"], "--long-fraction must be in [0, 1]"),
        ([*ENDPOINT, "--rate", "2", "--concurrency", "4"], "not allowed with argument"),
        ([*ENDPOINT, "--concurrency", "2", "--max-concurrency", "4"], "--max-concurrency"),
        ([*ENDPOINT, "--api", "chat"], "--prompt-format text"),
        ([], "--endpoint"),
    ],
)
def test_bad_flags_exit_2(argv, message):
    p = _flotilla(*argv)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_unreachable_endpoint_exit_2(scheme, tmp_path):
    p = _flotilla(
        "--endpoint",
        f"{scheme}://127.0.0.1:{_closed_port()}",
        "--probe-timeout-s",
        "1",
        "--out",
        str(tmp_path),
    )
    assert p.returncode == 2, p.stderr
    assert "unreachable" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "results.json").exists()
