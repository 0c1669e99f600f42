"""The proxy-side registration: ending a streaming call always cancels Serve's handler at an
await (router/grpc_server.py explains the Serve 2.60 gap this closes)."""

from __future__ import annotations

import asyncio

from router.grpc_server import add_servicer, cancel_safe_stream


class FakeContext:
    def __init__(self):
        self.callbacks = []

    def add_done_callback(self, cb):
        self.callbacks.append(cb)

    def finish(self):
        for cb in self.callbacks:
            cb(self)


def test_abandoned_stream_still_cancels_the_handler():
    events = []

    async def handler(request, context):
        try:
            for i in range(1000):
                await asyncio.sleep(0.001)  # like awaiting the replica's next result
                yield i
        except asyncio.CancelledError:
            events.append("cancelled at an await")
            raise

    async def main():
        ctx = FakeContext()
        stream = cancel_safe_stream(handler)("req", ctx)
        assert [await stream.__anext__() for _ in range(3)] == [0, 1, 2]
        # grpc drops the call while our generator sits at a yield: nobody closes it, but the
        # call's done-callbacks run.
        ctx.finish()
        await asyncio.sleep(0.05)
        assert events == ["cancelled at an await"]
        await stream.aclose()

    asyncio.run(main())


def test_complete_stream_and_errors_pass_through():
    async def ok(request, context):
        for i in range(3):
            yield i

    async def bad(request, context):
        yield 1
        raise ValueError("boom")

    async def main():
        assert [x async for x in cancel_safe_stream(ok)("r", FakeContext())] == [0, 1, 2]
        got = []
        try:
            async for x in cancel_safe_stream(bad)("r", FakeContext()):
                got.append(x)
        except ValueError as e:
            got.append(str(e))
        assert got == [1, "boom"]

    asyncio.run(main())


def test_add_servicer_wraps_only_server_streaming_methods():
    made = []

    class FakeServer:
        def __init__(self):
            self.service_handler_factory = self.factory
            self.handlers = {}

        def factory(self, *, service_method, streaming_type):
            def h(request, context):
                return None

            made.append((service_method, streaming_type))
            return h

        def add_generic_rpc_handlers(self, handlers):
            for name, mh in handlers[0]._method_handlers.items():
                kind = "unary_stream" if mh.response_streaming else "unary_unary"
                self.handlers[name] = self.service_handler_factory(
                    service_method=name, streaming_type=kind
                )

        def add_registered_method_handlers(self, service, handlers):
            pass

    server = FakeServer()
    original = server.service_handler_factory
    from unittest.mock import Mock

    add_servicer(Mock(), server)  # Serve passes a mock servicer too
    assert server.service_handler_factory == original  # restored
    stream = server.handlers["/flotilla.v1.Flotilla/GenerateStream"]
    unary = server.handlers["/flotilla.v1.Flotilla/Generate"]
    # Unary methods get only the malformed-request guard ("unary"), not the cancel-safe task.
    assert stream.__name__ == "stream" and unary.__name__ == "unary"
    # The standard health service rides along, routed the same way.
    assert server.handlers["/grpc.health.v1.Health/Check"].__name__ == "unary"
    assert server.handlers["/grpc.health.v1.Health/Watch"].__name__ == "stream"
    assert server.handlers["/flotilla.v1.Flotilla/Abort"].__name__ == "unary"


def test_guarded_context_never_touches_an_ended_call():
    from router.grpc_server import GuardedContext

    class Call:
        def __init__(self):
            self.alive, self.codes = True, []

        def _check(self):
            assert self.alive, "touched a freed call"

        def peer(self):
            self._check()
            return "ipv4:127.0.0.1:5555"

        def invocation_metadata(self):
            self._check()
            return [("application", "flotilla")]

        def set_code(self, code):
            self._check()
            self.codes.append(code)

        def code(self):
            self._check()
            return self.codes[-1] if self.codes else None

    call = Call()
    ctx = GuardedContext(call)
    ctx.set_code("OK")
    assert ctx.code() == "OK" and ctx.peer() == "ipv4:127.0.0.1:5555"
    ctx.end()
    call.alive = False
    ctx.set_code("CANCELLED")  # dropped
    assert ctx.peer() == "ipv4:127.0.0.1:5555"  # from the snapshot
    assert ctx.invocation_metadata() == [("application", "flotilla")]
    assert ctx.code() is None and ctx.cancelled() is True


def test_a_lost_replica_is_unavailable_other_errors_stay_internal():
    """Serve's INTERNAL + "The actor ... died / is unavailable" (a router replica lost under
    the call) reaches the client as UNAVAILABLE, on unary and streaming calls; any other
    INTERNAL, and every other code, passes unchanged."""
    import grpc

    from router.grpc_server import replica_loss_is_unavailable

    class Ctx(FakeContext):
        def __init__(self):
            super().__init__()
            self.code, self.details = None, None

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    def serve_like(code, details):  # what Serve's proxy does when the call failed
        async def unary(request, context):
            context.set_code(code)
            context.set_details(details)
            return b""

        async def stream(request, context):
            yield 1
            context.set_code(code)
            context.set_details(details)

        return unary, stream

    died = "The actor 7f3a is unavailable: The actor is temporarily unavailable: IOError"
    cases = [
        (grpc.StatusCode.INTERNAL, died, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.INTERNAL, "The actor died unexpectedly", grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.INTERNAL, "ValueError: boom", grpc.StatusCode.INTERNAL),
        (grpc.StatusCode.INVALID_ARGUMENT, "actor: unavailable", grpc.StatusCode.INVALID_ARGUMENT),
    ]

    async def main():
        for code, details, want in cases:
            unary, stream = serve_like(code, details)
            ctx = Ctx()
            await replica_loss_is_unavailable(unary)("r", ctx)
            assert (ctx.code, ctx.details) == (want, details)
            ctx = Ctx()
            assert [x async for x in cancel_safe_stream(stream)("r", ctx)] == [1]
            assert (ctx.code, ctx.details) == (want, details)

    asyncio.run(main())
