"""A 400, not a bare 500, for request headers Serve's HTTP proxy cannot decode.

Ray Serve 2.60's HTTP proxy decodes the values of `x-request-id`, its session header
(`x-session-id`) and `serve_multiplexed_model_id` as UTF-8 before any of our code sees the
request (ray/serve/_private/proxy.py, setup_request_context_and_handle). HTTP allows other
bytes there (latin-1 `é` is one byte, 0xE9); the decode then raises and the client gets
"Internal Server Error" as plain text. `patch` wraps the proxy's ASGI entry so such a request
is answered 400 in the API's error shape, naming the header, and never reaches Serve.

Installed in the proxy processes by deploy.proxy_bind.install (the job's setup hook), when
Ray imports the proxy module; if Serve's internals differ, nothing is patched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

TARGET = "ray.serve._private.proxy"
_DECODED = {"x_request_id", "serve_multiplexed_model_id"}


def bad_header(headers: Iterable[tuple[bytes, bytes]], is_session: Any = None) -> str | None:
    """The first header the proxy would decode whose value is not UTF-8, by name."""
    for key, value in headers:
        name = key.decode("latin-1").lower()
        decoded = name.replace("-", "_") in _DECODED or (is_session and is_session(name))
        if decoded:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return name
    return None


async def _reject(send: Any, header: str) -> None:
    from router.errors import invalid

    body = json.dumps(invalid(header, "not valid UTF-8").openai_body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def patch(module: Any) -> None:
    proxy_cls = getattr(module, "HTTPProxy", None)
    original = vars(proxy_cls).get("__call__") if proxy_cls is not None else None
    if original is None or getattr(original, "flotilla_guard", False):
        return
    is_session = getattr(module, "_matches_session_id_header", None)

    async def __call__(self, scope, receive, send):  # noqa: N807 (the ASGI entry point)
        if scope.get("type") == "http":
            header = bad_header(scope.get("headers") or (), is_session)
            if header is not None:
                await _reject(send, header)
                return
        await original(self, scope, receive, send)

    __call__.flotilla_guard = True  # type: ignore[attr-defined]
    proxy_cls.__call__ = __call__
