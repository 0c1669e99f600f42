"""`flotilla generate --http` and `flotilla bench` without --tokenizer, as real subprocesses of
the command against a stub OpenAI server (tests/deploy/openai_stub.py; no model, no Ray).
The same `generate --http` against the real app: tests/deploy/serve_app/test_serve_cli_http.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from app_fixtures import free_port
from openai_stub import openai_stub

from workers.config import DEFAULT_MODEL


def _flotilla(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def stub():
    with openai_stub(DEFAULT_MODEL) as s:
        yield s


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_generate_http_prints_text_and_usage(stub, chat, stream):
    stub.bodies.clear()
    argv = ["generate", "Say hi", "--http", stub.url, "--max-tokens", "2"]
    p = _flotilla(*argv, *(["--chat"] if chat else []), *(["--stream"] if stream else []))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Hi!\n"
    assert p.stderr.strip() == "[length; 3 prompt + 2 completion tokens]"
    (body,) = stub.bodies
    assert body["model"] == DEFAULT_MODEL and body["max_tokens"] == 2  # the listed model
    if chat:
        assert body["messages"] == [{"role": "user", "content": "Say hi"}]
    else:
        assert body["prompt"] == "Say hi"
    assert bool(body.get("stream")) == stream


def test_generate_http_errors_exit_1_in_one_line(stub):
    p = _flotilla("generate", "x", "--http", f"http://127.0.0.1:{free_port()}", "--timeout", "5")
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    p = _flotilla("generate", "x", "--http", stub.url + "/nowhere")  # 404 from the stub
    assert p.returncode == 1 and "HTTP 404" in p.stderr and "Traceback" not in p.stderr


def test_bench_finds_the_default_model_s_tokenizer(stub, tmp_path):
    """No --tokenizer: the served name is the default model's, so bench reads the GGUF's own
    tokenizer; every prompt is a list of ordinary (non-special) ids of that vocabulary."""
    from workers.loader import load_tokenizer

    stub.bodies.clear()
    p = _flotilla(
        "bench", "--endpoint", stub.url, "--num-requests", "3", "--input-len", "16",
        "--output-len", "2", "--no-plots", "--no-progress", "--out", str(tmp_path),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["model"] == DEFAULT_MODEL
    tok = load_tokenizer(DEFAULT_MODEL)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    prompts = [b["prompt"] for b in stub.bodies]
    assert len(prompts) == 3 and all(len(ids) == 16 for ids in prompts)
    assert all(0 <= i < len(tok) and i not in special for ids in prompts for i in ids)


def test_bench_without_a_tokenizer_for_the_served_model_exits_2(tmp_path):
    with openai_stub("someone-elses-model") as other:
        p = _flotilla("bench", "--endpoint", other.url, "--out", str(tmp_path))
    assert p.returncode == 2, p.stderr
    assert "someone-elses-model" in p.stderr and "--tokenizer" in p.stderr
    assert "Traceback" not in p.stderr and not other.bodies  # nothing was sent
