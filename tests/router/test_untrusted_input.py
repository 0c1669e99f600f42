"""The guards the request fuzzers (tests/deploy/test_fuzz.py) led to, without Ray: lone
surrogates in a JSON body, unknown field names in a response header, gRPC bytes that are not
the request message, header bytes Serve's HTTP proxy cannot decode, a request that cannot be
encoded for a group."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from cluster import wire
from deploy import proxy_headers
from router import unknown_fields
from router.grpc_server import (
    Malformed,
    reject_malformed_stream,
    reject_malformed_unary,
    safe_parser,
)
from router.link import GroupLink
from router.proto import flotilla_pb2 as pb
from router.validation import CompletionRequest, parse_body
from workers.errors import InvalidRequest


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "a\ud800"}, "prompt"),
        ({"prompt": "a", "stop": ["x", "\udfff"]}, "stop.1"),
        ({"prompt": "a", "x": {"y": ["\ud800"]}}, "x.y.0"),
        ({"prompt": "a", "\ud800": 1}, "\\ud800"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_where_it_sits(body, field):
    raw = json.dumps(body).encode()  # JSON escapes it: "\ud800"
    with pytest.raises(InvalidRequest) as e:
        parse_body(raw, CompletionRequest)
    assert e.value.field == field
    assert parse_body(json.dumps({"prompt": "é 中 😀"}).encode(), CompletionRequest).prompt


def test_ignored_field_names_are_escaped_for_the_header():
    value = unknown_fields.header_value(["meta", "\u0100", "a\nb", "\x00", "é"])
    assert value == "meta,\\u0100,a\\nb,\\x00,\\xe9"
    value.encode("ascii")  # a header can carry it


class _Context:
    def __init__(self):
        self.code = self.details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_bytes_that_are_not_the_message_get_invalid_argument():
    parse = safe_parser(pb.GenerateRequest.FromString)
    good = pb.GenerateRequest(prompt="hi")
    assert parse(good.SerializeToString()) == good
    bad = parse(b"\x00")
    assert isinstance(bad, Malformed) and "flotilla.v1.GenerateRequest" in bad.details

    async def never(request, context):
        raise AssertionError("a malformed request must not reach Serve")
        yield  # noqa: B901 (makes this a generator, like the handler it stands for)

    ctx = _Context()
    assert asyncio.run(reject_malformed_unary(never)(bad, ctx)) == b""
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details.startswith("request: ")

    async def drain():
        return [m async for m in reject_malformed_stream(never)(bad, ctx2)]

    ctx2 = _Context()
    assert asyncio.run(drain()) == [] and ctx2.code == grpc.StatusCode.INVALID_ARGUMENT


def test_header_values_serve_would_fail_to_decode_are_named():
    session = lambda name: name == "x-session-id"  # noqa: E731
    ok = [(b"x-request-id", b"abc"), (b"x-session-id", "é".encode()), (b"other", b"\xe9")]
    assert proxy_headers.bad_header(ok, session) is None
    assert proxy_headers.bad_header([(b"X-Request-Id", b"\xe9")], session) == "x-request-id"
    assert proxy_headers.bad_header([(b"x-session-id", b"\x80")], session) == "x-session-id"

    sent = []

    async def send(msg):
        sent.append(msg)

    asyncio.run(proxy_headers._reject(send, "x-session-id"))
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["param"] == "x-session-id"


def test_a_request_that_cannot_be_encoded_is_invalid_not_a_dead_group():
    link = GroupLink.__new__(GroupLink)  # only submit's encoding step runs
    link.direct = True
    with pytest.raises(InvalidRequest, match="cannot be encoded"):
        asyncio.run(link.submit("r1", [1, 2], {"stop": ["\ud800"]}))
    wire.frame(wire.Submit("r1", [1, 2], {"stop": ["é"]}, None))  # valid text encodes
