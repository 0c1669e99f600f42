"""`flotilla serve` as a user runs it: start-up progress and a ready line, gRPC and HTTP bound
to serve.host only, and Ctrl-C (SIGINT to the whole process group, as a terminal sends it)
drains: the stream in flight finishes, a new request is refused with UNAVAILABLE, the command
exits 0 without a traceback and leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest
from cli_support import kill_marked, marked_env, wait_gone

from router.proto import flotilla_pb2 as pb
from router.proto import flotilla_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

MAX_TOKENS = 900  # long enough (seconds) that the drain is still waiting for it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Output:
    """The command's merged stdout/stderr, read by a thread, waitable by content."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not any(needle in ln for ln in self.lines):
                left = deadline - time.monotonic()
                assert left > 0, (
                    f"no {needle!r} within {timeout_s}s:\n{''.join(self.lines)[-4000:]}"
                )
                self.cond.wait(left)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    http, grpc_port, metrics = _free_port(), _free_port(), _free_port()
    cfg = tmp_path_factory.mktemp("serve_cli") / "cfg.yaml"
    cfg.write_text(
        f"""
engine:
  model: {{model: {tiny_model_dir("llama")}, dtype: float32, num_threads: 1}}
  cache: {{block_size: 8, num_blocks: 256}}
serve:
  host: 127.0.0.1
  http_port: {http}
  grpc_port: {grpc_port}
  metrics_export_port: {metrics}
  group_num_cpus: 0.5
  drain_timeout_s: 60
"""
    )
    env, mark = marked_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "serve", "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, like a shell job
    )
    out = Output(proc)
    try:
        out.wait_for("ready in", timeout_s=300)
        yield proc, out, mark, grpc_port, http
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_marked(mark)


def test_listens_on_the_configured_host_only(served):
    proc, out, mark, grpc_port, http = served
    listening = {
        # grpc binds a dual-stack socket: 127.0.0.1 shows as ::ffff:127.0.0.1 (still loopback)
        (c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in (grpc_port, http)
    }
    assert listening == {("127.0.0.1", grpc_port), ("127.0.0.1", http)}, out.text()[-3000:]


def test_startup_reports_progress(served):
    text = served[1].text()
    assert "starting 1 replica group(s)" in text
    # the group's own lines, forwarded by Ray from the replica's process
    assert "flotilla: kernels: " in text
    assert "flotilla: weights loaded: " in text
    assert "flotilla: KV cache: 256 blocks x 8 tokens = 2048 tokens" in text
    assert "ready in" in text
    assert "Traceback" not in text


def test_ctrl_c_drains_then_exits_cleanly(served):
    proc, out, mark, grpc_port, _ = served
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.FlotillaStub(channel)
    meta = (("application", "flotilla"),)
    req = pb.GenerateRequest(
        prompt="Once upon a time",
        params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
    )
    stream = stub.GenerateStream(req, metadata=meta, timeout=240)
    got: list[int] = []
    first = next(stream)  # the request is running in the group
    got += first.token_ids
    finish: list[str] = []

    def read_rest() -> None:
        for msg in stream:
            got.extend(msg.token_ids)
            if msg.finish_reason:
                finish.append(msg.finish_reason)

    reader = threading.Thread(target=read_rest, daemon=True)
    reader.start()

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    out.wait_for("stopping: new requests are refused", timeout_s=30)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req, metadata=meta, timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in e.value.details()

    reader.join(timeout=240)
    assert not reader.is_alive()
    assert finish == ["length"] and len(got) == MAX_TOKENS  # the stream in flight finished
    channel.close()

    assert proc.wait(timeout=120) == 0
    text = out.text()
    assert "stopped" in text
    assert "Traceback" not in text, text[-4000:]
    assert wait_gone(mark, timeout_s=60) == []
