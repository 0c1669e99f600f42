"""One mapping from Flotilla's errors to gRPC status codes and OpenAI-style HTTP errors.

Every handler funnels exceptions through `api_error()`; anything unexpected becomes a generic
INTERNAL / 500 naming the request id (the traceback goes to the replica log, never to a
client).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc

from workers.errors import EngineDead, EngineDraining, EngineOverloaded, InvalidRequest

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    def __init__(self, model: str, served: str):
        super().__init__(f"model {model!r} does not exist; this server serves {served!r}")
        self.model = model


class NoHealthyGroup(RuntimeError):
    """No replica group answered (all dead, restarting or not started yet)."""


@dataclass(frozen=True)
class ApiError:
    grpc_code: grpc.StatusCode
    http_status: int
    type: str  # OpenAI error "type"
    code: str
    message: str
    param: str | None = None

    @property
    def grpc_details(self) -> str:
        return self.message

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(field: str, message: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        400,
        "invalid_request_error",
        "invalid_parameter",
        f"{field}: {message}",
        field,
    )


class RequestAborted(Exception):
    """Stopped by an Abort call (router.running); like a client cancel, but seen by the client."""


class BodyTooLarge(ValueError):
    """An HTTP body past router.max_body_bytes."""


class Unauthenticated(PermissionError):
    """No API key, or one this server does not accept (router.auth)."""


def api_error(exc: BaseException, request_id: str = "") -> ApiError:
    """Map an exception to the status clients see."""
    if isinstance(exc, InvalidRequest):
        return invalid(exc.field, exc.message)
    if isinstance(exc, Unauthenticated):
        return ApiError(
            grpc.StatusCode.UNAUTHENTICATED,
            401,
            "invalid_request_error",
            "invalid_api_key",
            str(exc),
        )
    if isinstance(exc, RequestAborted):
        # 499: nginx's "client closed request" -- the closest HTTP has to a cancel.
        return ApiError(
            grpc.StatusCode.CANCELLED, 499, "request_aborted", "request_aborted", str(exc)
        )
    if isinstance(exc, BodyTooLarge):
        return ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            413,
            "invalid_request_error",
            "request_too_large",
            f"body: {exc}",
            "body",
        )
    if isinstance(exc, ModelNotFound):
        return ApiError(
            grpc.StatusCode.NOT_FOUND,
            404,
            "invalid_request_error",
            "model_not_found",
            str(exc),
            "model",
        )
    if isinstance(exc, EngineOverloaded):
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            429,
            "rate_limit_error",
            "overloaded",
            f"the server is overloaded, retry later ({exc})",
        )
    if isinstance(exc, EngineDraining):
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            503,
            "service_unavailable",
            "shutting_down",
            f"the server is shutting down and accepts no new requests ({exc})",
        )
    if isinstance(exc, (NoHealthyGroup, EngineDead)):
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            503,
            "service_unavailable",
            "unavailable",
            f"no healthy replica group: {exc}",
        )
    log.error("request %s failed", request_id, exc_info=exc)
    return ApiError(
        grpc.StatusCode.INTERNAL,
        500,
        "internal_error",
        "internal_error",
        f"internal error (request {request_id}); see the server log",
    )


def error_from_group(err: dict[str, Any]) -> Exception:
    """Rebuild the exception a replica group reported (cluster.deltas.encode_error)."""
    kind = err.get("kind")
    if kind == "invalid":
        return InvalidRequest(err.get("field") or "request", err.get("message", ""))
    if kind == "overloaded":
        return EngineOverloaded(err.get("message", ""))
    if kind == "draining":
        return EngineDraining(err.get("message", ""))
    return EngineDead(err.get("message", "replica group failed"))
