"""Client-chosen request ids: HTTP `X-Request-Id`, gRPC GenerateRequest.request_id.

Used as the id the request runs under (group logs, `Abort`) and echoed back, so a client can
follow and stop its own requests. They travel in logs and on the wire to the groups, hence
the limits: printable ASCII, at most 128 characters.
"""

from __future__ import annotations

import uuid

from workers.errors import InvalidRequest

HEADER = "x-request-id"
MAX_LEN = 128


def check(value: str, field: str) -> str:
    if not value or len(value) > MAX_LEN:
        raise InvalidRequest(field, f"{len(value)} characters; expected 1 to {MAX_LEN}")
    if not (value.isascii() and value.isprintable()):
        raise InvalidRequest(field, "only printable ASCII characters are allowed")
    return value


def new() -> str:
    return uuid.uuid4().hex


def as_field(exc: Exception, field: str) -> Exception:
    """The router names a clashing id `request_id`; a front end names it as its client sent it."""
    if isinstance(exc, InvalidRequest) and exc.field == "request_id" and field != "request_id":
        return InvalidRequest(field, exc.message)
    return exc
