"""The real Serve app end to end, issue 22's request fields: logit_bias, min_tokens and
chat_template_kwargs through the official `openai` client; min_tokens, logit_bias and the
finish-reason enum through the generated gRPC stub. The app and its clients are the package's
fixtures (conftest.py)."""

from __future__ import annotations

import openai
import pytest

from router.proto import flotilla_pb2 as pb
from workers.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

PROMPT = "The capital of France is"


def test_openai_logit_bias_and_min_tokens(client, offline, config):
    model = config.engine.model.name
    forced = offline.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(forced): 100}
    )
    ref = offline.generate(
        [PROMPT], SamplingParams(max_tokens=4, temperature=0, logit_bias={forced: 100})
    )[0]
    assert ref.token_ids == [forced] * 4 and r.choices[0].text == ref.text
    # EOS made every step's argmax: it ends the output at once, unless min_tokens holds it back.
    eos = {str(min(offline.eos_token_ids)): 100}
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logit_bias": eos}
    r = client.completions.create(**kw)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(**kw, extra_body={"min_tokens": 4})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=model, prompt=PROMPT, logit_bias={"0": 101})


def test_openai_chat_template_kwargs(client, config):
    model = config.engine.model.name
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(
        model=model,
        messages=msgs,
        max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs.tokenize"):
        client.chat.completions.create(
            model=model, messages=msgs, extra_body={"chat_template_kwargs": {"tokenize": True}}
        )


def test_grpc_min_tokens_logit_bias_and_finish_code(stub, offline):
    eos = min(offline.eos_token_ids)
    params = pb.SamplingParams(max_tokens=10, temperature=0, min_tokens=3, logit_bias={eos: 100})
    resp = stub.Generate(pb.GenerateRequest(prompt=PROMPT, params=params), timeout=60)
    assert len(resp.token_ids) == 4 and resp.token_ids[-1] == eos
    assert resp.finish_reason == "stop" and resp.finish_reason_code == pb.FINISH_REASON_STOP_TOKEN
    params = pb.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    msgs = list(stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, params=params), timeout=60))
    assert msgs[-1].finish_reason_code == pb.FINISH_REASON_LENGTH
    assert all(m.finish_reason_code == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])


def test_openai_batched_prompts_with_echo(client, offline, config):
    prompts = [PROMPT, "Hello"]
    r = client.completions.create(
        model=config.engine.model.name, prompt=prompts, n=2, max_tokens=3, temperature=0, echo=True
    )
    refs = offline.generate(prompts, SamplingParams(max_tokens=3, temperature=0))
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [
        p + ref.text for p, ref in zip(prompts, refs, strict=True) for _ in range(2)
    ]
    assert r.usage.prompt_tokens == sum(len(ref.prompt_token_ids) for ref in refs)
    assert r.usage.completion_tokens == sum(len(ref.token_ids) for ref in refs) * 2


def test_grpc_n_matches_the_http_choices(stub, client, config):
    """The same seeded choices (seed + i for choice i) on both APIs."""
    params = pb.SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=2, ignore_eos=True)
    resp = stub.Generate(pb.GenerateRequest(prompt=PROMPT, params=params), timeout=60)
    r = client.completions.create(
        model=config.engine.model.name,
        prompt=PROMPT,
        max_tokens=6,
        temperature=1.0,
        seed=5,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in resp.choices] == [c.text for c in r.choices]
    assert resp.choices[0].text != resp.choices[1].text  # distinct seeds
    assert resp.usage.completion_tokens == 12
    stream = list(stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, params=params), timeout=60))
    for i in (0, 1):
        assert "".join(m.text for m in stream if m.index == i) == resp.choices[i].text


def test_grpc_server_reflection_lists_and_describes_the_services(app):
    """What grpcurl does: list the services, then fetch flotilla.v1's file descriptor."""
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    from .serve_support import GRPC_PORT

    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"flotilla.v1.Flotilla", "grpc.health.v1.Health"} <= services, services
        desc = db.FindFileContainingSymbol("flotilla.v1.Flotilla")
        assert desc.package == "flotilla.v1"
        assert {m.name for m in desc.message_type} >= {"SamplingParams", "Choice"}
