"""Registers the flotilla.v1 service and the standard grpc.health.v1 one (router.grpc_health)
with Serve's gRPC proxy (the function named in gRPCOptions.grpc_servicer_functions; it runs
inside the proxy process).

Why not the generated `add_FlotillaServicer_to_server` directly: in Ray Serve 2.60 the proxy's
server-streaming handler only cancels the call into the replica when the client's cancel or
deadline interrupts it while it awaits the next result. If the interrupt lands while the
handler is suspended handing a message to grpc (a `yield`), the handler is simply abandoned
and the replica keeps streaming a request nobody reads (with fast token streams we measured
about one cancel in five lost this way). So for server-streaming methods we run Serve's
handler in a task of its own, which is always suspended at an await, and cancel that task
from the call's done-callback: the cancel then always reaches the replica, whose router aborts
the request and frees its KV blocks.

Serve's handler may then still be winding down (setting a status, writing its access log) after
grpc has finished -- and freed -- the call, so it gets a guarded context: live calls go to the
real one; after the call ended, reads come from a snapshot and writes are dropped. (Touching the
freed call crashes the proxy.)

A request whose bytes do not parse as its message (garbage, truncated, another message's
bytes) is answered INVALID_ARGUMENT "request: ..." here in the proxy: grpc's own handling of a
failing deserializer answers UNKNOWN with the parser's exception class, and logs a traceback
per call.

A router replica that dies mid-call (its process killed, its node gone) is answered by Serve
with INTERNAL and "The actor ... died / is unavailable". Nothing failed inside the service and
a retry goes to a live replica, so the call is answered UNAVAILABLE -- the code gRPC clients
and retry policies treat as retryable -- with Serve's message kept (ReplicaLossIsUnavailable).

If Serve's server internals differ from what this expects, the stock registration is used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from router import grpc_health
from router.proto import flotilla_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_END = object()


def _add_all(servicer: Any, server: Any) -> None:
    pb_grpc.add_FlotillaServicer_to_server(servicer, server)
    grpc_health.add_to_server(servicer, server)


def add_servicer(servicer: Any, server: Any) -> None:
    factory = getattr(server, "service_handler_factory", None)
    if not callable(factory):
        _add_all(servicer, server)
        return

    def cancel_safe_factory(*, service_method: str, streaming_type: Any) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if streaming_type == "unary_stream":
            return reject_malformed_stream(cancel_safe_stream(handler))
        if streaming_type == "unary_unary":
            return reject_malformed_unary(replica_loss_is_unavailable(handler))
        return handler

    server.service_handler_factory = cancel_safe_factory
    try:
        _add_all(servicer, _SafeParsing(server))
    finally:
        server.service_handler_factory = factory


class Malformed:
    """What a request's deserializer returns for bytes that are not its message."""

    def __init__(self, message: str, error: Exception):
        self.details = f"request: not a valid {message} ({error})"

    def reject(self, context: Any) -> None:
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(self.details)


def safe_parser(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = message.full_name if message is not None else "message"

    def parse_or_malformed(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # DecodeError, or anything else a parser may raise
            return Malformed(name, e)

    return parse_or_malformed


def _safe_handler(h: Any) -> Any:
    parse = getattr(h, "request_deserializer", None)
    return h._replace(request_deserializer=safe_parser(parse)) if parse else h


class _SafeParsing:
    """The server as the generated add_*_to_server functions see it: every method handler
    they register gets a deserializer that returns Malformed instead of raising."""

    def __init__(self, server: Any):
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for h in handlers:
            methods = getattr(h, "_method_handlers", None)  # what Serve rewrites too
            if isinstance(methods, dict):
                methods.update({k: _safe_handler(v) for k, v in methods.items()})
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, methods: dict[str, Any]) -> None:
        safe = {k: _safe_handler(v) for k, v in methods.items()}
        self._server.add_registered_method_handlers(service, safe)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def replica_lost(details: str | None) -> bool:
    """Serve's message for a call whose replica actor died or became unreachable."""
    d = (details or "").lower()
    return "actor" in d and ("unavailable" in d or "died" in d)


class ReplicaLossIsUnavailable:
    """A ServicerContext whose INTERNAL status becomes UNAVAILABLE when its details say the
    replica actor was lost (Serve sets the code, then the details)."""

    def __init__(self, context: Any):
        self._context = context
        self._code: Any = None

    def set_code(self, code: Any) -> None:
        self._code = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        if self._code == grpc.StatusCode.INTERNAL and replica_lost(details):
            self._code = grpc.StatusCode.UNAVAILABLE
            self._context.set_code(self._code)
        self._context.set_details(details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def replica_loss_is_unavailable(handler: Callable) -> Callable:
    async def unary(request: Any, context: Any) -> Any:
        return await handler(request, ReplicaLossIsUnavailable(context))

    return unary


def reject_malformed_unary(handler: Callable) -> Callable:
    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, Malformed):
            request.reject(context)
            return b""  # what Serve's handler returns with an error status
        return await handler(request, context)

    return unary


def reject_malformed_stream(handler: Callable) -> Callable:
    async def stream(request: Any, context: Any) -> AsyncIterator:
        if isinstance(request, Malformed):
            request.reject(context)
            return
        async for item in handler(request, context):
            yield item

    return stream


class GuardedContext:
    """A grpc ServicerContext that is safe to use after its call ended (see the docstring)."""

    _SNAPSHOT = ("invocation_metadata", "peer", "auth_context", "peer_identities",
                 "peer_identity_key")  # fmt: skip

    def __init__(self, context: Any):
        self._context = context  # (a ReplicaLossIsUnavailable: its set_* are attributes too)
        self._alive = True
        self._snapshot: dict[str, Any] = {}
        for name in self._SNAPSHOT:
            try:
                self._snapshot[name] = getattr(context, name)()
            except Exception:  # not every context implements every getter
                self._snapshot[name] = None

    def end(self) -> None:
        self._alive = False

    def __getattr__(self, name: str) -> Any:
        if self._alive:
            return getattr(self._context, name)
        if name in self._snapshot:
            value = self._snapshot[name]
            return lambda: value
        if name in ("cancelled", "done"):
            return lambda: True
        return lambda *args, **kwargs: None  # code(), details(), set_*(): nothing left to touch


def cancel_safe_stream(handler: Callable[[Any, Any], AsyncIterator]) -> Callable:
    """Wrap a server-streaming handler so that ending the call (client cancel, deadline,
    disconnect) always cancels the handler at an await point."""

    async def stream(request: Any, context: Any) -> AsyncIterator:
        queue: asyncio.Queue = asyncio.Queue()
        guarded = GuardedContext(ReplicaLossIsUnavailable(context))

        def call_ended(_context: Any) -> None:
            guarded.end()  # first: the task below must not touch the call from now on
            task.cancel()

        async def drive() -> None:
            try:
                async for item in handler(request, guarded):
                    queue.put_nowait(item)
                queue.put_nowait(_END)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # surfaced to grpc by the reader below
                queue.put_nowait(e)

        task = asyncio.get_running_loop().create_task(drive())
        context.add_done_callback(call_ended)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()

    return stream
