"""Workload generators are seeded and reproducible; length specs parse strictly."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from deploy.bench.workloads import (
    LengthDist,
    Vocab,
    WorkloadConfig,
    build,
    poisson_arrivals,
)

VOCAB = Vocab(range(100, 1100), lambda ids: " ".join(f"w{i}" for i in ids))


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("128", LengthDist("fixed", 128)),
        ("fixed:7", LengthDist("fixed", 7)),
        ("uniform:4,9", LengthDist("uniform", 4, 9)),
        ("normal:100,12.5", LengthDist("normal", 100, 12.5)),
    ],
)
def test_length_spec_parse(spec, want):
    assert LengthDist.parse(spec) == want
    assert LengthDist.parse(str(want)) == want


@pytest.mark.parametrize(
    "spec", ["0", "-3", "1.5", "uniform:9,4", "uniform:0,4", "normal:0,1", "zipf:3", "x", ""]
)
def test_length_spec_rejects(spec):
    with pytest.raises(ValueError, match="length spec"):
        LengthDist.parse(spec)


def test_length_samples_stay_in_range():
    rng = random.Random(0)
    assert {LengthDist("fixed", 5).sample(rng) for _ in range(20)} == {5}
    uni = [LengthDist("uniform", 3, 6).sample(rng) for _ in range(400)]
    assert set(uni) == {3, 4, 5, 6}
    normal = [LengthDist("normal", 3, 10).sample(rng) for _ in range(400)]
    assert min(normal) == 1  # clipped at one token


@pytest.mark.parametrize("kind", ["random", "long-mix", "chat"])
@pytest.mark.parametrize("fmt", ["ids", "text"])
def test_same_seed_same_requests(kind, fmt):
    cfg = WorkloadConfig(
        kind=kind,
        num_requests=13,
        input_len=LengthDist("uniform", 5, 20),
        output_len=LengthDist("normal", 8, 3),
        prompt_format=fmt,
        long_input_len=LengthDist("fixed", 64),
        prefix_len=16,
        turns=3,
        seed=7,
    )
    a, b = build(cfg, VOCAB), build(cfg, VOCAB)
    assert a == b and len(a) == 13
    assert [s.index for s in a] == list(range(13))
    assert build(replace(cfg, seed=8), VOCAB) != a
    for s in a:
        assert s.max_tokens >= 1 and s.input_len >= 1
        if kind == "chat":
            assert s.messages is not None and s.prompt_ids is None
        elif fmt == "ids":
            assert s.prompt_ids is not None and len(s.prompt_ids) == s.input_len
            assert all(100 <= t < 1100 for t in s.prompt_ids)
        else:
            assert s.prompt_text is not None and len(s.prompt_text.split()) == s.input_len


def test_random_lengths_follow_the_spec():
    cfg = WorkloadConfig(num_requests=50, input_len=LengthDist("uniform", 10, 12), seed=1)
    specs = build(cfg, VOCAB)
    assert {s.input_len for s in specs} == {10, 11, 12}
    assert {s.max_tokens for s in specs} == {64}


def test_long_mix_fraction():
    cfg = WorkloadConfig(
        kind="long-mix",
        num_requests=400,
        input_len=LengthDist("fixed", 8),
        long_input_len=LengthDist("fixed", 300),
        long_fraction=0.25,
    )
    lens = [s.input_len for s in build(cfg, VOCAB)]
    assert set(lens) == {8, 300}
    assert 70 <= lens.count(300) <= 130  # seeded: the same count every run
    assert {s.input_len for s in build(replace(cfg, long_fraction=0.0), VOCAB)} == {8}


def test_chat_shares_prefixes_turn_by_turn():
    cfg = WorkloadConfig(
        kind="chat",
        num_requests=7,
        input_len=LengthDist("fixed", 4),
        output_len=LengthDist("fixed", 3),
        prefix_len=10,
        turns=3,
    )
    specs = build(cfg, VOCAB)
    # 3 conversations, turn-major: turn 1 of each, then turn 2 of each, then one turn-3 request.
    sessions = [s.session_id for s in specs]
    assert sessions[:3] == sessions[3:6] and len(set(sessions[:3])) == 3
    assert sessions[6] == sessions[0]
    system = specs[0].messages[0]
    assert all(s.messages[0] == system and system[0] == "system" for s in specs)
    assert len({s.messages[1] for s in specs[:3]}) == 3  # distinct first user turns
    for first, later in ((specs[0], specs[3]), (specs[3], specs[6])):
        # The next turn re-sends this turn's messages, then an assistant reply and a new user turn.
        assert later.messages[: len(first.messages)] == first.messages
        assert [r for r, _ in later.messages[len(first.messages) :]] == ["assistant", "user"]
    assert [s.input_len for s in specs[:4]] == [14, 14, 14, 21]  # 10 + 4, then + 3 + 4


def test_text_prompts_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        build(WorkloadConfig(prompt_format="text", num_requests=1), Vocab(range(10)))
    with pytest.raises(ValueError, match="unknown workload"):
        build(WorkloadConfig(kind="sharegpt"), VOCAB)


def test_poisson_arrivals_seeded():
    a = poisson_arrivals(2000, rate=4.0, seed=3)
    assert a == poisson_arrivals(2000, rate=4.0, seed=3) != poisson_arrivals(2000, 4.0, 4)
    assert all(x < y for x, y in zip(a, a[1:], strict=False))
    assert 0.9 * 500 <= a[-1] <= 1.1 * 500  # mean gap 1 / rate
    assert poisson_arrivals(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0.0, 0)


def test_vocab_from_a_real_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "b": 2, "c": 3}, unk_token="<s>"))
    tok.add_special_tokens(["<s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        vocab = Vocab.from_tokenizer(str(path))
        assert vocab.pool == [1, 2, 3]  # special tokens are never sampled
        assert vocab.decode([1, 3]).split() == ["a", "c"]
    with pytest.raises(FileNotFoundError):
        Vocab.from_tokenizer(str(tmp_path / "missing"))
