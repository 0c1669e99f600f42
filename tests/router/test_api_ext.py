"""What users of vLLM's OpenAI server expect, on the router's handlers (real Starlette requests,
a gRPC context stand-in, fake replica groups from fake_groups; no Ray): unknown fields ignored
and reported, typos still refused; client request ids honoured, echoed and abortable (the
group is told to abort, as on a disconnect); /tokenize, /detokenize, /version, /metrics;
grpc.health.v1."""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import metadata

import grpc
import pytest
from fake_groups import run
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from test_auth_limits import KEY, _keyed

from router import grpc_api, grpc_health, openai_api, utility_api
from router.grpc_api import GrpcAbort
from router.proto import flotilla_pb2 as pb

IGNORED = "x-flotilla-ignored-fields"
HI = [{"role": "user", "content": "hi"}]


class _Context:
    """A grpc ServicerContext stand-in: metadata, code and details as the real one has them."""

    def __init__(self, metadata=()):
        self.metadata, self.code, self._details = tuple(metadata), None, ""

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self._details = details

    def details(self):
        return self._details


def _request(body: bytes | dict = b"", headers=None, method="POST") -> Request:
    raw_body = body if isinstance(body, bytes) else json.dumps(body).encode()
    raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    raw.append((b"content-type", b"application/json"))
    sent = []

    async def receive():
        if sent:  # the body once, then the client "waits" (a disconnect check never fires)
            await asyncio.sleep(3600)
        sent.append(1)
        return {"type": "http.request", "body": raw_body, "more_body": False}

    return Request({"type": "http", "method": method, "path": "/", "headers": raw}, receive)


async def _json(resp) -> tuple[int, dict, dict]:
    if hasattr(resp, "body_iterator"):  # SSE: the events' payloads
        events = [part async for part in resp.body_iterator]
        return resp.status_code, {"events": events}, dict(resp.headers)
    return resp.status_code, json.loads(resp.body), dict(resp.headers)


# ---- unknown fields ----------------------------------------------------------------------------
def test_unknown_openai_fields_are_served_logged_and_reported(tokenizer_files, caplog):
    async def body(r, groups):
        caplog.set_level(logging.WARNING, logger="router.openai_api")
        req = {
            "prompt": "hello",
            "max_tokens": 2,
            "user": "u1",  # known, unused
            "metadata": {"k": "v"},
            "service_tier": "auto",
            "store": False,
        }
        status, out, headers = await _json(await openai_api.completions(r, _request(req)))
        assert status == 200, out
        assert out["choices"][0]["text"] == "aa"
        assert headers[IGNORED] == "metadata,service_tier,store"
        chat = {
            "messages": [{"role": "user", "content": "hi", "name": "ann"}],  # name: template's
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "tool_choice": "none",
            "parallel_tool_calls": False,
        }
        status, out, headers = await _json(await openai_api.chat_completions(r, _request(chat)))
        assert status == 200 and out["events"][-1] == "data: [DONE]\n\n"
        assert headers[IGNORED] == "parallel_tool_calls,stream_options.continuous_usage_stats"
        lines = [m for m in caplog.messages if "ignored unknown fields" in m]
        assert len(lines) == 2  # one line per request
        assert "parallel_tool_calls, stream_options.continuous_usage_stats" in lines[1]
        # Nothing unknown: no header.
        _, _, headers = await _json(
            await openai_api.completions(r, _request({"prompt": "x", "max_tokens": 1}))
        )
        assert IGNORED not in headers

    run(tokenizer_files, ["ok"], body)


@pytest.mark.parametrize(
    ("handler", "req", "param", "words"),
    [
        ("completions", {"prompt": "x", "max_token": 3}, "max_token", "'max_tokens'"),
        ("completions", {"prompt": "x", "temprature": 0}, "temprature", "'temperature'"),
        (
            "completions",
            {"prompt": "x", "stream": True, "stream_options": {"include_usag": True}},
            "stream_options.include_usag",
            "'stream_options.include_usage'",
        ),
        ("chat_completions", {"messages": HI, "top_logprob": 2}, "top_logprob", "top_logprobs"),
        ("chat_completions", {"messages": HI, "tool_choice": "required"}, "tool_choice", "tools"),
        (
            "chat_completions",
            {"messages": HI, "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "needs tools",
        ),
        (
            "chat_completions",
            {"messages": HI, "functions": [{"name": "f"}]},
            "functions",
            "chat template does not support tools",
        ),
    ],
)
def test_typos_and_fields_needing_tools_are_still_refused(
    offline_router, handler, req, param, words
):
    status, out, headers = asyncio.run(
        _json(asyncio.run(getattr(openai_api, handler)(offline_router, _request(req))))
    )
    assert status == 400 and out["error"]["param"] == param
    assert words in out["error"]["message"]


def test_reject_mode_refuses_any_unknown_field(offline_router):
    r = offline_router
    r.config = r.config.model_copy(update={"unknown_fields": "reject"})
    resp = asyncio.run(openai_api.completions(r, _request({"prompt": "x", "metadata": {}})))
    err = json.loads(resp.body)["error"]
    assert resp.status_code == 400 and err["param"] == "metadata"


# ---- request ids ------------------------------------------------------------------------------
def test_x_request_id_is_used_echoed_and_split_per_choice(tokenizer_files):
    async def body(r, groups):
        g = groups["g0"]
        resp = await openai_api.completions(
            r, _request({"prompt": "hi", "max_tokens": 2}, {"X-Request-Id": "abc-1"})
        )
        status, out, headers = await _json(resp)
        # Echoed by Serve's proxy (test_serve_api checks); one more copy from us would make it
        # a list.
        assert status == 200 and "x-request-id" not in headers
        assert out["id"] == "cmpl-abc-1" and list(g.running) == ["abc-1"]
        g.running.clear()
        req = {"prompt": "hi", "max_tokens": 2, "n": 2, "stream": True}
        resp = await openai_api.completions(r, _request(req, {"X-Request-Id": "abc-2"}))
        status, out, headers = await _json(resp)
        assert status == 200
        assert sorted(g.running) == ["abc-2-0", "abc-2-1"]  # the link needs distinct ids
        assert '"id":"cmpl-abc-2"' in out["events"][0]
        # Without one (outside Serve only): a generated id, in the body and the header alike.
        status, out, headers = await _json(
            await openai_api.chat_completions(
                r, _request({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
            )
        )
        assert out["id"].startswith("chatcmpl-") and headers["x-request-id"] == out["id"]
        assert not r.running._by_id  # every request unregistered

    run(tokenizer_files, ["ok"], body)


@pytest.mark.parametrize("bad", ["x" * 129, "caf\u00e9", "a\tb"])
def test_bad_x_request_id_is_refused_naming_the_header(offline_router, bad):
    resp = asyncio.run(
        openai_api.completions(offline_router, _request({"prompt": "x"}, {"X-Request-Id": bad}))
    )
    err = json.loads(resp.body)["error"]
    assert resp.status_code == 400 and err["param"] == "x-request-id"
    assert "x-request-id" not in resp.headers


def test_a_running_id_cannot_be_reused(tokenizer_files):
    async def body(r, groups):
        req = {"prompt": "hi", "max_tokens": 120, "stream": True}
        first = await openai_api.completions(r, _request(req, {"X-Request-Id": "dup"}))
        assert first.status_code == 200
        again = await openai_api.completions(r, _request(req, {"X-Request-Id": "dup"}))
        err = json.loads(again.body)["error"]
        assert again.status_code == 400 and err["param"] == "x-request-id"
        assert "running" in err["message"]
        await first.body_iterator.aclose()

    run(tokenizer_files, ["ok"], body)


def test_grpc_request_id_and_abort_free_the_request_like_a_disconnect(tokenizer_files):
    async def body(r, groups):
        g = groups["g0"]
        req = pb.GenerateRequest(
            prompt="hi", request_id="job-7", params=pb.SamplingParams(max_tokens=120)
        )
        ctx = _Context()
        stream = grpc_api.generate_stream(r, req, ctx)
        first = await stream.__anext__()
        assert first.request_id == "job-7" and list(g.running) == ["job-7"]
        assert grpc_api.abort(r, pb.AbortRequest(request_id="job-7"), _Context()).aborted == 1
        with pytest.raises(GrpcAbort):
            async for _ in stream:
                pass
        assert ctx.code == grpc.StatusCode.CANCELLED and "job-7" in ctx.details()
        for _ in range(100):
            if g.aborted:
                break
            await asyncio.sleep(0.01)
        assert g.aborted == ["job-7"]  # the group was told: it frees the KV blocks
        assert r.groups["g0"].inflight == 0 and r.groups["g0"].link.num_open == 0
        assert not r.running._by_id
        # Gone already / never there: nothing to abort. A bad id: INVALID_ARGUMENT.
        assert grpc_api.abort(r, pb.AbortRequest(request_id="job-7"), _Context()).aborted == 0
        bad = _Context()
        grpc_api.abort(r, pb.AbortRequest(request_id=""), bad)
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in bad.details()
        # Unary with an id: echoed.
        resp = await grpc_api.generate(
            r,
            pb.GenerateRequest(
                prompt="hi", request_id="u-1", params=pb.SamplingParams(max_tokens=2)
            ),
            _Context(),
        )
        assert resp.request_id == "u-1"

    run(tokenizer_files, ["ok"], body)


def test_abort_reaches_every_choice_of_an_http_request(tokenizer_files):
    async def body(r, groups):
        req = {"prompt": "hi", "max_tokens": 120, "n": 2, "stream": True}
        resp = await openai_api.completions(r, _request(req, {"X-Request-Id": "multi"}))
        assert resp.status_code == 200
        events = resp.body_iterator
        await events.__anext__()
        assert r.abort("multi") == 2
        rest = [e async for e in events]
        assert '"code":"request_aborted"' in rest[-2] and rest[-1] == "data: [DONE]\n\n"
        for _ in range(100):
            if len(groups["g0"].aborted) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(groups["g0"].aborted) == ["multi-0", "multi-1"]

    run(tokenizer_files, ["ok"], body)


def test_abort_needs_the_key(offline_router):
    router = _keyed(offline_router)
    ctx = _Context()
    grpc_api.abort(router, pb.AbortRequest(request_id="x"), ctx)
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED


# ---- /tokenize, /detokenize, /version, /metrics ------------------------------------------------
def test_tokenize_and_detokenize_round_trip(offline_router):
    r, tok = offline_router, offline_router.tokenizer

    def call(handler, req, headers=None):
        return asyncio.run(_json(asyncio.run(handler(r, _request(req, headers)))))

    status, out, _ = call(utility_api.tokenize, {"prompt": "Hello world"})
    assert status == 200 and out["tokens"] == tok.encode("Hello world")
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 64
    msgs = [{"role": "user", "content": "Hi!"}]
    status, out, _ = call(utility_api.tokenize, {"messages": msgs, "model": "tiny"})
    assert status == 200 and out["tokens"] == tok.apply_chat_template(msgs)
    status, back, _ = call(utility_api.detokenize, {"tokens": tok.encode("Hello world")})
    assert status == 200 and back["prompt"] == "Hello world"
    # Bad inputs name their field; unknown fields are ignored here too.
    for handler, req, param in [
        (utility_api.detokenize, {"tokens": [1, 10**6]}, "tokens"),
        (utility_api.detokenize, {"tokens": [-1]}, "tokens"),
        (utility_api.tokenize, {"prompt": "a", "messages": msgs}, "prompt"),
        (utility_api.tokenize, {}, "prompt"),
        (utility_api.tokenize, {"prompt": "a", "model": "gpt-9"}, "model"),
        (utility_api.tokenize, {"prompt": "a" * 1001}, "prompt"),
    ]:
        status, out, _ = call(handler, req)
        assert status in (400, 404) and out["error"]["param"] == param, (req, out)
    status, out, headers = call(utility_api.tokenize, {"prompt": "a", "add_bos": 1})
    assert status == 200 and headers[IGNORED] == "add_bos"


def test_version_and_metrics(tokenizer_files):
    async def body(r, groups):
        resp = utility_api.version(r, _request(method="GET"))
        assert json.loads(resp.body) == {"version": metadata.version("flotilla")}
        await openai_api.completions(r, _request({"prompt": "hi", "max_tokens": 3}))
        resp = utility_api.metrics(r, _request(method="GET"))
        assert resp.media_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(resp.body.decode())}
        # Ray's names (the counter's family is named without its `_total` by the parser).
        requests = families["ray_flotilla_requests"]
        assert requests.type == "counter"
        [finished] = [s for s in requests.samples if s.name == "ray_flotilla_requests_total"]
        assert finished.labels == {"model": "m", "group": "g0", "outcome": "finished"}
        assert finished.value == 1.0
        tokens = families["ray_flotilla_generation_tokens"].samples[0]
        assert tokens.name == "ray_flotilla_generation_tokens_total" and tokens.value == 3.0
        e2e = families["ray_flotilla_e2e_request_latency_seconds"]
        assert e2e.type == "histogram"
        assert [s.value for s in e2e.samples if s.name.endswith("_count")] == [1.0]
        assert "ray_flotilla_requests_running" in families  # gauges from the group's stats

    run(tokenizer_files, ["ok"], body, stats_interval_s=0.05)


def test_new_endpoints_need_the_key(offline_router):
    router = _keyed(offline_router)
    for handler in (utility_api.tokenize, utility_api.detokenize):
        resp = asyncio.run(handler(router, _request({"prompt": "x"})))
        assert resp.status_code == 401
    for handler in (utility_api.version, utility_api.metrics):
        assert handler(router, _request(method="GET")).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert handler(router, _request(headers=auth, method="GET")).status_code == 200


# ---- grpc.health.v1 --------------------------------------------------------------------------
def test_standard_health_check_and_watch(tokenizer_files, offline_router):
    hc = grpc_health.health_pb2
    status = hc.HealthCheckResponse
    # No group behind the router: not serving.
    assert grpc_health.check(offline_router, hc.HealthCheckRequest()).status == status.NOT_SERVING

    async def body(r, groups):
        for service in ("", "flotilla.v1.Flotilla"):
            req = hc.HealthCheckRequest(service=service)
            assert grpc_health.check(r, req, _Context()).status == status.SERVING
        ctx = _Context()
        grpc_health.check(r, hc.HealthCheckRequest(service="other"), ctx)
        assert ctx.code == grpc.StatusCode.NOT_FOUND
        watch = grpc_health.watch(r, hc.HealthCheckRequest())
        assert (await watch.__anext__()).status == status.SERVING
        await watch.aclose()
        watch = grpc_health.watch(r, hc.HealthCheckRequest(service="other"))
        assert (await watch.__anext__()).status == status.SERVICE_UNKNOWN
        await watch.aclose()

    run(tokenizer_files, ["ok"], body)
