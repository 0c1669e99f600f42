"""Fuzzing both front ends of a real app (Ray Serve, one replica group of the tiny seeded
Llama, its proxies and router): hypothesis sends HTTP bodies for every endpoint (known fields
with plausible, wrong-typed, huge, NaN and odd-unicode values, unknown fields, random bytes,
odd headers) and flotilla.v1 messages (random field values; random bytes, truncated and other
messages' bytes as the serialized request).

Property: every answer is a 2xx or a 4xx whose error names the field (gRPC: OK or a client
code such as INVALID_ARGUMENT with "field: problem" details), never a 5xx / INTERNAL /
UNKNOWN, and no stream ends in an in-band error; after the campaign no replica has been
replaced, a plain greedy request returns the offline engine's tokens, and the group's block
audit shows no KV block in use or leaked.

Bounded and reproducible: derandomized examples, a fixed count per endpoint, no example
database, a timeout on every call.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import grpc
import pytest
import requests
from app_fixtures import META, grpc_stub, running_app, tiny_app_config
from fuzz_inputs import (
    ABORT_REQUEST,
    CHAT_BODY,
    COMPLETION_BODY,
    DETOKENIZE_BODY,
    GENERATE_REQUEST,
    HEADERS,
    RAW_BODY,
    RAW_PROTO,
    TOKENIZE_BODY,
    encode,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

MODEL = "tiny"
MAX_MODEL_LEN = 96  # short: a valid request generates at most this many tokens
EXAMPLES = 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
# Client errors a bad request may get; anything else (INTERNAL, UNKNOWN, UNAVAILABLE, ...)
# is a server fault.
CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
}
POSTS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
GETS = ["/v1/models", "/health", "/version", "/metrics"]


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> FlotillaConfig:
    return tiny_app_config(
        tiny_model_dir("llama"),
        {
            "engine": {
                "model": {"served_name": MODEL, "max_model_len": MAX_MODEL_LEN},
                "cache": {"num_blocks": 256},
                "scheduler": {"max_waiting": 64},
            },
            "router": {"max_n": 4},
        },
    )


@pytest.fixture(scope="module")
def app(config):
    with running_app(config) as router:
        yield router


@pytest.fixture(scope="module")
def replicas(app) -> set[str]:
    """The app's replica actors as the campaign starts: none may be replaced by its end."""
    return _replicas()


@pytest.fixture(scope="module")
def http(app, config):
    with requests.Session() as s:
        s.base = f"http://127.0.0.1:{config.serve.http_port}"
        yield s


@pytest.fixture(scope="module")
def stub(app, config):
    with grpc_stub(config) as stub:
        yield stub


@pytest.fixture(scope="module")
def channel(app, config):
    ch = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
    yield ch
    ch.close()


def _replicas() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] or "#" in a["name"]
    }


# ---- HTTP -------------------------------------------------------------------------------------
def _check_http(resp: requests.Response, what: str) -> int:
    assert resp.status_code < 500, (what, resp.status_code, resp.text[:500])
    if resp.status_code == 400 and resp.headers.get("content-type") == "application/json":
        # (a request HTTP itself forbids gets the server's plain-text 400 before any app code)
        err = resp.json()["error"]
        assert err["param"] and err["message"].startswith(err["param"]), (what, err)
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        text = resp.text
        assert '"internal_error"' not in text, (what, text[-500:])
        assert text.endswith("data: [DONE]\n\n"), (what, text[-300:])
    return resp.status_code


def _send(http, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
    """The status, or 0 when the client itself cannot put a header value on the wire."""
    headers = {"Content-Type": "application/json"} | headers
    try:
        resp = http.request(method, http.base + path, data=body, headers=headers, timeout=60)
    except (UnicodeEncodeError, ValueError):
        return 0
    return _check_http(resp, f"{method} {path} {(body or b'')[:300]!r} {headers}")


def _campaign(strategies: dict, send, expect: set) -> Counter:
    """Run `send(**example)` over the examples; the outcomes seen, which must include
    `expect` (a campaign that never got a request through, or never got one refused, tested
    less than it claims)."""
    seen: Counter = Counter()

    @FUZZ
    @given(**strategies)
    def run(**example):
        seen[send(**example)] += 1

    run()
    assert expect <= set(seen), seen
    return seen


def test_chat_completions(http):
    send = lambda body, headers: _send(http, "POST", "/v1/chat/completions", encode(body), headers)  # noqa: E731
    _campaign({"body": CHAT_BODY, "headers": HEADERS}, send, {200, 400})


def test_completions(http):
    send = lambda body, headers: _send(http, "POST", "/v1/completions", encode(body), headers)  # noqa: E731
    _campaign({"body": COMPLETION_BODY, "headers": HEADERS}, send, {200, 400})


def test_tokenize_and_detokenize(http):
    calls = st.one_of(
        st.tuples(st.just("/tokenize"), TOKENIZE_BODY),
        st.tuples(st.just("/detokenize"), DETOKENIZE_BODY),
    )
    send = lambda call, headers: _send(http, "POST", call[0], encode(call[1]), headers)  # noqa: E731
    _campaign({"call": calls, "headers": HEADERS}, send, {200, 400})


def test_random_bytes_as_the_body(http):
    send = lambda path, body, headers: _send(http, "POST", path, body, headers)  # noqa: E731
    strategies = {"path": st.sampled_from(POSTS), "body": RAW_BODY, "headers": HEADERS}
    _campaign(strategies, send, {400})


def test_utility_endpoints_any_method(http):
    strategies = {
        "path": st.sampled_from(GETS + POSTS),
        "method": st.sampled_from(["GET", "POST", "PUT"]),
        "headers": HEADERS,
    }
    send = lambda path, method, headers: _send(http, method, path, None, headers)  # noqa: E731
    _campaign(strategies, send, {200, 400, 405})


# ---- gRPC -------------------------------------------------------------------------------------
def _grpc_outcome(call, what) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        code = e.code()
        assert code in CLIENT_CODES, (what, code, e.details())
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert ": " in (e.details() or ""), (what, e.details())  # "field: problem"
        return code
    return grpc.StatusCode.OK


def test_generate_messages(stub):
    def send(req, streaming):
        def call():
            if streaming:
                msgs = list(stub.GenerateStream(req, metadata=META, timeout=60))
                assert msgs and msgs[-1].finish_reason, (req, msgs[-1:])
            else:
                assert stub.Generate(req, metadata=META, timeout=60).finish_reason, req

        return _grpc_outcome(call, repr(req)[:500])

    strategies = {"req": GENERATE_REQUEST, "streaming": st.booleans()}
    _campaign(strategies, send, {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT})


def test_abort_messages(stub):
    send = lambda req: _grpc_outcome(lambda: stub.Abort(req, metadata=META, timeout=30), req)  # noqa: E731
    _campaign({"req": ABORT_REQUEST}, send, {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT})


RPCS = {
    "/flotilla.v1.Flotilla/Generate": False,
    "/flotilla.v1.Flotilla/GenerateStream": True,
    "/flotilla.v1.Flotilla/Abort": False,
    "/flotilla.v1.Flotilla/ListModels": False,
    "/flotilla.v1.Flotilla/Health": False,
    "/grpc.health.v1.Health/Check": False,
}


def test_random_bytes_as_the_serialized_request(channel):
    def send(method, raw):
        streaming = RPCS[method]
        rpc = (channel.unary_stream if streaming else channel.unary_unary)(method)
        call = (
            (lambda: list(rpc(raw, metadata=META, timeout=60)))
            if streaming
            else (lambda: rpc(raw, metadata=META, timeout=60))
        )
        return _grpc_outcome(call, f"{method} {raw!r}")

    strategies = {"method": st.sampled_from(sorted(RPCS)), "raw": RAW_PROTO}
    _campaign(strategies, send, {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT})


# ---- afterwards -------------------------------------------------------------------------------
def test_after_the_campaign_it_serves_correctly_with_no_replica_lost_and_no_block_leaked(
    app, http, stub, replicas, config
):
    from cluster.engine import LLMEngine
    from workers.sampling_params import SamplingParams

    prompt = [100 + 7 * i for i in range(9)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = LLMEngine(config.engine).generate([prompt], params)[0].token_ids
    resp = stub.Generate(
        pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=prompt),
            params=pb.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        ),
        metadata=META,
        timeout=60,
    )
    assert list(resp.token_ids) == expected
    body = {"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    r = http.post(http.base + "/v1/completions", data=json.dumps(body), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
    assert _replicas() == replicas  # no replica crashed and was replaced
    deadline = time.monotonic() + 60
    while True:  # the audit is taken as the engine goes idle, a moment after its last request
        (g,) = app.group_stats.remote().result(timeout_s=30)
        b = g["blocks"]
        if g["num_running"] == g["num_waiting"] == 0 and b["in_use"] == 0:
            break
        assert time.monotonic() < deadline, g
        time.sleep(0.2)
    assert b["leaked"] == 0 and b["free"] + b["cached"] == b["total"], b
    assert g["healthy"] and not g.get("hung"), g
