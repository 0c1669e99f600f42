"""Grammar-constrained generation in the engine (tiny random Qwen3, float32, the native kernels
as configured by default): outputs match their schema / regex in batches mixed with free
requests, EOS only where the grammar accepts, "length" mid-grammar, resume replay."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.errors import InvalidRequest
from workers.sampling_params import SamplingParams
from workers.structured_output import StructuredOutput, json_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = LLMEngine(
        EngineConfig(
            model=ModelConfig(model=tiny_model_dir("qwen3"), dtype="float32", max_model_len=256),
            cache=CacheConfig(block_size=8, num_blocks=128),
            scheduler=SchedulerConfig(max_num_batched_tokens=64),
        )
    )
    yield eng
    eng.shutdown()


def prompt(seed: int, n: int = 12) -> list[int]:
    return [(seed * 7919 + i * 104729) % 48000 + 100 for i in range(n)]


def constrained(spec: StructuredOutput, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    kw.setdefault("temperature", 0.0)
    return SamplingParams(structured=spec, **kw)


def test_mixed_batch_outputs_match_and_free_rows_unchanged(engine):
    schema = json_schema(SCHEMA)
    regex = StructuredOutput(kind="regex", spec=REGEX)
    free = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = engine.generate([prompt(1), prompt(2)], free)
    params = [
        constrained(schema),
        free,
        constrained(schema, temperature=1.0, seed=3),
        constrained(regex, temperature=0.8, seed=5),
        free,
        constrained(StructuredOutput(kind="json_object"), temperature=0.0),
    ]
    prompts = [prompt(10), prompt(1), prompt(11), prompt(12), prompt(2), prompt(13)]
    outs = engine.generate(prompts, params)
    for i in (0, 2):
        assert outs[i].finish_reason == "stop", outs[i].text
        jsonschema.validate(json.loads(outs[i].text), SCHEMA)
        assert outs[i].token_ids[-1] in engine.eos_token_ids  # ended by EOS, once accepted
    assert outs[3].finish_reason == "stop"
    assert re.fullmatch(REGEX, outs[3].text), outs[3].text
    # free rows in a constrained batch: the very tokens they get alone
    assert outs[1].token_ids == alone[0].token_ids
    assert outs[4].token_ids == alone[1].token_ids
    # free JSON may not close within max_tokens on random weights; what came out is JSON-ish
    assert outs[5].text.startswith("{")
    if outs[5].finish_reason == "stop":
        assert isinstance(json.loads(outs[5].text), dict)
    assert len(engine.grammars) == 0  # every matcher dropped when its request finished


def test_unconstrained_output_differs_so_the_mask_matters(engine):
    """The random model left alone does not write this JSON (else the test above proves nothing)."""
    out = engine.generate([prompt(10)], SamplingParams(max_tokens=30, temperature=0.0))[0]
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_length_mid_grammar_is_length(engine):
    out = engine.generate([prompt(10)], constrained(json_schema(SCHEMA), max_tokens=4))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 4
    full = engine.generate([prompt(10)], constrained(json_schema(SCHEMA)))[0]
    assert full.token_ids[:4] == out.token_ids  # the incomplete prefix of the same output


def test_resume_replays_the_grammar(engine):
    """A request resumed after k tokens made elsewhere (failover / hand-off) continues the
    grammar from there: the same output as uninterrupted."""
    params = constrained(json_schema(SCHEMA))
    full = engine.generate([prompt(20)], params)[0]
    k = 5
    rid = engine.add_request(prompt(20), params, resume_output_ids=full.token_ids[:k])
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                final = out
    assert final is not None and final.token_ids == full.token_ids
    jsonschema.validate(json.loads(final.text), SCHEMA)


def test_resume_with_tokens_outside_the_grammar_is_refused(engine):
    bad = engine.tokenize("hello")
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(prompt(21), constrained(json_schema(SCHEMA)), resume_output_ids=bad)
    assert e.value.field == "resume_output_ids"
    assert not engine.has_unfinished() and len(engine.grammars) == 0


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutput(kind="regex", spec="(ab"),
        StructuredOutput(kind="json_schema", spec='{"type": "nope"}'),
        StructuredOutput(kind="grammar", spec="start: missing_rule"),
    ],
)
def test_bad_spec_is_invalid_request(engine, spec):
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(prompt(22), constrained(spec))
    assert e.value.field == "structured"
    assert not engine.has_unfinished()


def test_abort_drops_the_matcher(engine):
    rid = engine.add_request(prompt(23), constrained(json_schema(SCHEMA)))
    engine.step()
    assert rid in engine.grammars
    engine.abort(rid)
    assert rid not in engine.grammars
    while engine.has_unfinished():
        engine.step()


def test_preempted_requests_keep_their_grammar(engine, tiny_model_dir):
    """Preemption recomputes KV but keeps the tokens, so each matcher stays where it was: the
    outputs of a starved engine are those of a roomy one, and still match."""
    small = LLMEngine(
        EngineConfig(
            model=ModelConfig(model=tiny_model_dir("qwen3"), dtype="float32", max_model_len=256),
            cache=CacheConfig(block_size=4, num_blocks=24),
            scheduler=SchedulerConfig(max_num_batched_tokens=64),
        )
    )
    try:
        params = [constrained(json_schema(SCHEMA), max_tokens=80, temperature=0.0)] * 4
        prompts = [prompt(30 + i) for i in range(4)]
        starved = small.generate(prompts, params)
        assert small.stats().num_preemptions > 0
    finally:
        small.shutdown()
    roomy = engine.generate(prompts, params)
    assert [o.token_ids for o in starved] == [o.token_ids for o in roomy]
    for o in starved:
        if o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), SCHEMA)
    assert any(o.finish_reason == "stop" for o in starved)


def test_exit_waits_for_the_grammar_tokenizer_build(engine, monkeypatch):
    """The engine builds llguidance's tokenizer on a thread. A daemon thread still inside
    llguidance's native code when the interpreter finalizes crashed the process (SIGSEGV in
    ~1 of 15 processes that exited right after building an engine): the thread must not be a
    daemon, so that exit waits for it."""
    import threading

    from cluster import grammar

    started: list[threading.Thread] = []

    class Recorded(threading.Thread):
        def start(self):
            started.append(self)
            super().start()

    monkeypatch.setattr(grammar.threading, "Thread", Recorded)
    built = grammar.Grammars(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)
    assert [(t.name, t.daemon) for t in started] == [("grammar-tok", False)]
    assert built._tokenizer() is not None
