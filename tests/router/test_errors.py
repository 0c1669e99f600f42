"""One mapping from errors to gRPC codes and OpenAI error JSON; nothing internal leaks."""

from __future__ import annotations

import grpc
import pytest

from cluster.deltas import encode_error
from router.errors import ModelNotFound, NoHealthyGroup, api_error, error_from_group
from workers.errors import EngineDead, EngineOverloaded, InvalidRequest


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (InvalidRequest("top_p", "must be > 0"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (ModelNotFound("gpt-9", "tiny"), grpc.StatusCode.NOT_FOUND, 404),
        (EngineOverloaded("8 waiting"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (NoHealthyGroup("down"), grpc.StatusCode.UNAVAILABLE, 503),
        (EngineDead("rank 0 died"), grpc.StatusCode.UNAVAILABLE, 503),
        (KeyError("secret internals"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_mapping(exc, code, status):
    err = api_error(exc, "req-1")
    assert err.grpc_code == code and err.http_status == status
    body = err.openai_body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if status == 500:
        assert "secret" not in body["message"] and "req-1" in body["message"]


def test_invalid_names_field_and_limit():
    body = api_error(InvalidRequest("max_tokens", "at most 12")).openai_body()["error"]
    assert body["param"] == "max_tokens" and body["message"] == "max_tokens: at most 12"


@pytest.mark.parametrize(
    "exc", [InvalidRequest("seed", "bad"), EngineOverloaded("full"), EngineDead("gone")]
)
def test_group_errors_round_trip(exc):
    back = error_from_group(encode_error(exc))
    assert type(back) is type(exc)
    if isinstance(exc, InvalidRequest):
        assert back.field == "seed" and back.message == "bad"
