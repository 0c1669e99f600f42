"""API keys and request-size limits on both front ends (the router's handlers, fed real Starlette
requests and a gRPC context stand-in; no Ray): a missing or wrong key gets 401 /
UNAUTHENTICATED with the usual error body before anything is parsed; an oversized body, too many
messages and too many or too long stop strings get clear errors naming the field."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import grpc
import pytest
from starlette.requests import Request

from router import grpc_api, openai_api
from router.auth import ApiKeys
from router.config import RouterConfig
from router.errors import Unauthenticated
from router.proto import flotilla_pb2 as pb

KEY = "sk-test-123"


def test_keys_from_the_config_and_the_environment():
    keys = ApiKeys(
        RouterConfig(api_keys=["a"], api_keys_env="FL_KEYS"), environ={"FL_KEYS": " b , c,"}
    )
    for good in ("Bearer a", "bearer b", "Bearer  c "):
        keys.check(good)
    for bad, why in [
        (None, "missing"),
        ("", "missing"),
        ("Basic a", "Bearer"),
        ("Bearer", "Bearer"),
        ("Bearer d", "invalid"),
        ("Bearer ab", "invalid"),
    ]:
        with pytest.raises(Unauthenticated, match=why):
            keys.check(bad)
    open_ = ApiKeys(RouterConfig(api_keys_env="FL_KEYS"), environ={})
    assert not open_.enabled
    open_.check(None)  # no keys configured: no authentication


def _request(body: bytes, headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-type", b"application/json"))
    chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)] or [b""]

    async def receive():
        part = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": part, "more_body": bool(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": raw}
    return Request(scope, receive)


def _keyed(router):
    router.config = router.config.model_copy(update={"api_keys": [KEY], "max_body_bytes": 4096})
    router.keys = ApiKeys(router.config)
    return router


def _call(handler, router, body: dict | bytes, headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = asyncio.run(handler(router, _request(raw, headers)))
    return resp.status_code, json.loads(resp.body)


def test_http_needs_the_key_before_anything_else(offline_router):
    router = _keyed(offline_router)
    for headers in (None, {"Authorization": "Bearer nope"}):
        status, body = _call(openai_api.completions, router, b"not even json", headers)
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
        assert set(body["error"]) == {"message", "type", "param", "code"}  # the usual shape
    status, body = _call(openai_api.chat_completions, router, {"messages": []})
    assert status == 401
    resp = openai_api.models(router, _request(b""))
    assert resp.status_code == 401


def test_http_body_limit(offline_router):
    router = _keyed(offline_router)
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    status, body = _call(openai_api.completions, router, big, auth)
    assert status == 413 and body["error"]["param"] == "body" and "4096" in body["error"]["message"]
    # the same without a Content-Length header: counted while it streams in
    status, _ = _call(openai_api.completions, router, json.dumps(big).encode(), auth)
    assert status == 413


def test_http_message_and_stop_limits(offline_router):
    router = _keyed(offline_router)
    router.config = router.config.model_copy(update={"max_body_bytes": 1 << 20})
    router.limits = dataclasses.replace(router.limits, max_messages=3, max_stop_chars=8)
    auth = {"Authorization": f"Bearer {KEY}"}
    msgs = [{"role": "user", "content": "hi"}] * 4
    status, body = _call(openai_api.chat_completions, router, {"messages": msgs}, auth)
    assert status == 400 and body["error"]["param"] == "messages"
    assert "4 messages; the limit is 3" in body["error"]["message"]
    req = {"prompt": "hello", "max_tokens": 2, "stop": ["ok", "far too long"]}
    status, body = _call(openai_api.completions, router, req, auth)
    assert status == 400 and body["error"]["param"] == "stop"
    assert "12 characters; the limit is 8" in body["error"]["message"]


class _Context:
    def __init__(self, metadata=()):
        self.metadata = tuple(metadata)
        self.code = self.details = None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_grpc_needs_the_key(offline_router):
    router = _keyed(offline_router)
    req = pb.GenerateRequest(prompt="hello", params=pb.SamplingParams(max_tokens=2))
    for meta in ((), (("authorization", "Bearer wrong"),)):
        ctx = _Context(meta)
        asyncio.run(grpc_api.generate(router, req, ctx))
        assert ctx.code == grpc.StatusCode.UNAUTHENTICATED, ctx.details
    ctx = _Context()
    grpc_api.list_models(router, ctx)
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED
    # With the key it gets past authentication (and fails later: no group behind this router).
    ctx = _Context((("authorization", f"Bearer {KEY}"),))
    asyncio.run(grpc_api.generate(router, req, ctx))
    assert ctx.code == grpc.StatusCode.UNAVAILABLE


def test_grpc_message_limit(offline_router):
    router = _keyed(offline_router)
    router.limits = dataclasses.replace(router.limits, max_messages=2)
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * 3)
    req = pb.GenerateRequest(messages=msgs, params=pb.SamplingParams(max_tokens=2))
    ctx = _Context((("authorization", f"Bearer {KEY}"),))
    asyncio.run(grpc_api.generate(router, req, ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "messages" in ctx.details
