"""The real Serve app end to end, part 1: gRPC and OpenAI-compatible HTTP requests against
the engine's offline output, bad inputs on both, and replicas that stay healthy.

References nobody here wrote: a stub generated from our .proto by grpcio-tools, the official
`openai` client, and the engine's own offline output for greedy parity. The app and its clients
are the package's fixtures (conftest.py).
"""

from __future__ import annotations

import grpc
import pytest
import requests

from router.proto import flotilla_pb2 as pb

from .serve_support import (
    BASE,
    GRPC_PORT,
    MAX_MODEL_LEN,
    PROMPTS,
    counts,
    greedy,
    group_stats,
    wait_aborted,
)

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]


# ---- gRPC -----------------------------------------------------------------------------------
def test_grpc_unary_and_stream_equal_offline_greedy(stub, offline):
    from workers.sampling_params import SamplingParams

    refs = offline.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
    for prompt, ref in zip(PROMPTS, refs, strict=True):
        resp = stub.Generate(pb.GenerateRequest(prompt=prompt, params=greedy(12)), timeout=60)
        assert list(resp.token_ids) == ref.token_ids
        assert resp.text == ref.text and resp.finish_reason == ref.finish_reason
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert resp.usage.completion_tokens == len(ref.token_ids)

        msgs = list(
            stub.GenerateStream(pb.GenerateRequest(prompt=prompt, params=greedy(12)), timeout=60)
        )
        assert [t for m in msgs for t in m.token_ids] == ref.token_ids
        assert "".join(m.text for m in msgs) == ref.text
        assert msgs[-1].finish_reason == ref.finish_reason and msgs[-1].HasField("usage")
        assert all(not m.finish_reason for m in msgs[:-1])


def test_grpc_token_ids_chat_and_logprobs(stub, offline):
    from workers.sampling_params import SamplingParams

    ids = offline.tokenize("Once upon a time")
    ref = offline.generate([ids], SamplingParams(max_tokens=6, temperature=0.0))[0]
    resp = stub.Generate(
        pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), params=greedy(6, logprobs=3)),
        timeout=60,
    )
    assert list(resp.token_ids) == ref.token_ids
    assert len(resp.logprobs) == 6
    for lp, tok in zip(resp.logprobs, ref.token_ids, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0].token_id == tok  # greedy: the sampled token is the most likely one
    chat = [pb.ChatMessage(role="user", content="Hi!")]
    resp = stub.Generate(
        pb.GenerateRequest(messages=pb.ChatMessages(messages=chat), params=greedy(5)), timeout=60
    )
    templated = offline.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=False
    )
    chat_ids = offline.tokenizer.encode(templated, add_special_tokens=False)
    ref = offline.generate([chat_ids], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert resp.text == ref.text and resp.usage.prompt_tokens == len(chat_ids)


def test_grpc_health_and_models(stub):
    health = stub.Health(pb.HealthRequest(), timeout=30)
    assert health.status == "SERVING"
    # Two replicas of the `groups` pool, each named after its Serve replica.
    names = [g.name for g in health.groups]
    assert len(set(names)) == 2 and all(n.startswith("group-") for n in names)
    assert all(g.healthy for g in health.groups)
    models = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert len(models.models) == 1 and models.models[0].max_model_len == MAX_MODEL_LEN


@pytest.mark.parametrize(
    ("request_kw", "code", "detail"),
    [
        ({"prompt": "x", "params": greedy(0)}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            {"prompt": "x", "params": greedy(MAX_MODEL_LEN)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most",
        ),
        (
            {"prompt": "x", "params": pb.SamplingParams(temperature=-1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            {"prompt": "x", "params": pb.SamplingParams(top_p=2)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        (
            {"prompt": "x", "params": pb.SamplingParams(logprobs=99)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "logprobs",
        ),
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "hi " * 1100}, grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
        (
            {"prompt_token_ids": pb.TokenIds(ids=[1, 10**7])},
            grpc.StatusCode.INVALID_ARGUMENT,
            "vocabulary",
        ),
        ({"model": "gpt-9", "prompt": "x"}, grpc.StatusCode.NOT_FOUND, "gpt-9"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "input"),
    ],
)
def test_grpc_bad_inputs(stub, request_kw, code, detail):
    req = pb.GenerateRequest(**request_kw)
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
        assert e.value.code() == code
        assert detail in e.value.details() and "Traceback" not in e.value.details()


# ---- OpenAI HTTP ------------------------------------------------------------------------------
def test_openai_client_completions_chat_and_streaming(client, offline, config):
    from workers.sampling_params import SamplingParams

    model = config.model_name
    assert [m.id for m in client.models.list().data] == [model]
    ref = offline.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0.0))[0]

    c = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert c.choices[0].text == ref.text and c.choices[0].finish_reason == ref.finish_reason
    assert c.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert c.usage.completion_tokens == len(ref.token_ids)

    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPTS[1],
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and not chunks[-1].choices

    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    templated = offline.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    chat_ids = offline.tokenizer.encode(templated, add_special_tokens=False)
    ref = offline.generate([chat_ids], SamplingParams(max_tokens=8, temperature=0.0))[0]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(chat_ids)

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    deltas = [ch.choices[0].delta for ch in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == ref.text


def test_openai_n_and_logprobs(client, config):
    c = client.completions.create(
        model=config.model_name, prompt="Hello", max_tokens=4, temperature=0, n=2, logprobs=2
    )
    assert sorted(ch.index for ch in c.choices) == [0, 1]
    assert c.choices[0].text == c.choices[1].text  # greedy choices agree
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    r = client.chat.completions.create(
        model=config.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "top_k": -5}, 400, "top_k"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "n": 99}, 400, "n"),
        ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
        ({"prompt": "x", "stop": [""]}, 400, "stop"),
        ({"prompt": "x", "seed": -3}, 400, "seed"),
        ({"prompt": "x", "presence_penalty": 9}, 400, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": "lots"}, 400, "frequency_penalty"),
        ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"prompt": "x", "min_p": 3}, 400, "min_p"),
        ({"prompt": "x", "max_token": 1}, 400, "max_token"),  # a typo: not ignored
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "word " * 1100}, 400, "prompt"),
        ({"prompt": [5, 10**8]}, 400, "prompt"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ],
)
def test_http_bad_inputs(app, body, status, param):
    r = requests.post(f"{BASE}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and "Traceback" not in err["message"]


def test_http_malformed_json_and_bad_chat(app):
    r = requests.post(
        f"{BASE}/v1/completions",
        data=b"{not json",
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = requests.post(
        f"{BASE}/v1/chat/completions",
        json={"messages": [{"role": "robot", "content": "x"}]},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = requests.post(f"{BASE}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_replicas_stay_healthy_after_bad_inputs(app, stub):
    r = requests.get(f"{BASE}/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert all(s["healthy"] for s in group_stats(app))
    # The router reaches every group over the direct data plane (one TCP link per router).
    assert all(s["direct_links"] == 1 for s in group_stats(app))
    resp = stub.Generate(pb.GenerateRequest(prompt="still fine", params=greedy(3)), timeout=60)
    assert resp.usage.completion_tokens == 3


# ---- what vLLM's users expect ------------------------------------------------------------------
def test_openai_client_extra_fields_request_id_and_tokenize(client, offline, config):
    r = client.chat.completions.with_raw_response.create(
        model=config.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        metadata={"team": "a"},  # an OpenAI field we do not use
        extra_body={"parallel_tool_calls": False, "service_tier": "auto"},
        extra_headers={"X-Request-Id": "serve-api-1"},
    )
    assert r.headers["x-request-id"] == "serve-api-1"  # once: Serve's proxy echoes it
    assert r.headers["x-flotilla-ignored-fields"] == "metadata,parallel_tool_calls,service_tier"
    c = r.parse()
    assert c.id == "chatcmpl-serve-api-1" and c.usage.completion_tokens == 3

    got = requests.post(f"{BASE}/tokenize", json={"prompt": PROMPTS[1]}, timeout=30).json()
    assert got["tokens"] == offline.tokenize(PROMPTS[1]) and got["max_model_len"] == MAX_MODEL_LEN
    back = requests.post(f"{BASE}/detokenize", json={"tokens": got["tokens"]}, timeout=30)
    assert back.json()["prompt"].endswith(PROMPTS[1])  # the tokenizer may add a BOS token
    assert requests.get(f"{BASE}/version", timeout=30).json()["version"]
    metrics = requests.get(f"{BASE}/metrics", timeout=30).text  # this router's own series
    assert "\nray_flotilla_requests_total{" in metrics and 'group="group-' in metrics


def test_grpc_abort_frees_the_streams_blocks(app, stub):
    before = counts(app)
    call = stub.GenerateStream(
        pb.GenerateRequest(
            prompt="Abort this story", request_id="abort-me", params=greedy(1000, ignore_eos=True)
        ),
        timeout=60,
    )
    first = next(call)
    assert first.request_id == "abort-me"
    assert stub.Abort(pb.AbortRequest(request_id="abort-me"), timeout=30).aborted == 1
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    wait_aborted(app, before, "Abort")
    assert stub.Abort(pb.AbortRequest(request_id="abort-me"), timeout=30).aborted == 0


def test_standard_grpc_health_service(app):
    from router.grpc_health import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        got = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert got.status == health_pb2.HealthCheckResponse.SERVING
