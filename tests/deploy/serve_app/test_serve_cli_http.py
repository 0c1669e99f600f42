"""The real Serve app, `flotilla generate --http`: the command's output (a real subprocess)
against the official `openai` client's answer to the same greedy request."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .serve_support import BASE

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

PROMPT = "The capital of France is"


def _generate(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "generate", PROMPT, "--http", BASE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_http_equals_the_openai_client(client):
    model = client.models.list().data[0].id
    want = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    p = _generate("--max-tokens", "8")
    assert p.returncode == 0, p.stderr
    assert p.stdout == want.choices[0].text + "\n"
    u = want.usage
    reason = want.choices[0].finish_reason
    assert p.stderr.strip() == (
        f"[{reason}; {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]"
    )

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=8,
        temperature=0,
    )
    p = _generate("--max-tokens", "8", "--chat", "--stream")
    assert p.returncode == 0, p.stderr
    assert p.stdout == chat.choices[0].message.content + "\n"
    assert f"{chat.usage.completion_tokens} completion tokens]" in p.stderr
