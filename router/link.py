"""The router's end of one replica group's multiplexed stream.

One long-lived stream per (router replica, group): by default a TCP connection to the group's
direct data plane (the address and secret its registry entry, cluster.registry.Member, gives),
else the Serve stream ReplicaGroup.subscribe(router_id) on the member's handle (a test seam:
a Serve handle cannot pick one replica of a pool); each message is a batch of (request_id,
delta). GroupLink reads it in a background task and hands each delta to the inbox of the
request it belongs to. Control calls (stats, drain) share the connection: call().

Lifecycle:
    start() -> subscribe; the group's first (empty) batch sets `live`
    open(request_id) -> an Inbox; submit() -> the group starts the request
    ... deltas arrive in the inbox ...
    close(request_id, abort) -> forget the inbox; `abort` tells the group to stop the request
    If the stream breaks (the group died or restarted), every open request gets a "dead" error
    delta, `live` clears, and the link subscribes again with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from cluster import wire
from cluster.registry import Member
from workers.errors import InvalidRequest

log = logging.getLogger(__name__)


def dead(message: str) -> dict[str, Any]:
    return {"error": {"kind": "dead", "field": None, "message": message}}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive token deltas of one request as one."""
    lp = a["lp"] + b["lp"] if a["lp"] is not None and b["lp"] is not None else None
    return b | {"ids": a["ids"] + b["ids"], "text": a["text"] + b["text"], "lp": lp}


class Inbox:
    """Deltas of one request, in order. `next()` returns everything that queued up while the
    reader was busy as ONE delta, so a slow client (or proxy) gets fewer, larger messages
    instead of falling further behind. An error is never merged: it comes out on its own."""

    __slots__ = ("_items", "_ready")

    def __init__(self) -> None:
        self._items: deque[dict[str, Any]] = deque()
        self._ready = asyncio.Event()

    def put(self, delta: dict[str, Any]) -> None:
        self._items.append(delta)
        self._ready.set()

    async def next(self) -> dict[str, Any]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        msg = self._items.popleft()
        while (
            self._items
            and "error" not in msg
            and msg.get("finish") is None
            and "error" not in self._items[0]
        ):
            msg = merge(msg, self._items.popleft())
        return msg


class GroupLink:
    """`direct=True` (the default data plane): submits, aborts, control calls and deltas travel
    on one TCP connection to the group's own server. `direct=False`: calls on the member's
    Serve handle and a Serve stream."""

    def __init__(self, member: Member, router_id: str, direct: bool = True):
        self.member = member
        self.name = member.name
        self.handle = member.handle
        self.router_id = router_id
        self.direct = direct
        self.live = asyncio.Event()
        self._inboxes: dict[str, Inbox] = {}
        self._to_abort: list[str] = []
        self._abort_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._writer: asyncio.StreamWriter | None = None
        self._acks: dict[str, asyncio.Future] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._next_call = 0

    def start(self) -> None:
        """Call outside any request (e.g. from the router's constructor): the tasks started here
        must not belong to a request, see _abort_forever."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()), loop.create_task(self._abort_forever())]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _deliver(self, batch: list) -> None:
        for request_id, delta in batch:
            inbox = self._inboxes.get(request_id)
            if inbox is not None:  # else: closed already (the client went away)
                inbox.put(delta)

    async def _stream_serve(self) -> None:
        async for batch in self.handle.options(stream=True).subscribe.remote(self.router_id):
            self.live.set()
            self._deliver(batch)

    async def _stream_direct(self) -> None:
        m = self.member
        reader, writer = await wire.connect(m.host, m.port, m.secret)
        self._writer = writer
        try:
            self._send(wire.Hello(self.router_id, wire.PROTOCOL_VERSION))
            while (msg := await wire.read_to_router(reader)) is not None:
                if isinstance(msg, wire.Batch):
                    self.live.set()
                    self._deliver(msg.items)
                elif isinstance(msg, wire.Ack):
                    fut = self._acks.pop(msg.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.err)
                elif isinstance(msg, wire.Reply):
                    call = self._replies.pop(msg.id, None)
                    if call is not None and not call.done():
                        if msg.err is None:
                            call.set_result(msg.value)
                        else:
                            call.set_exception(RuntimeError(msg.err))
                else:  # Refused: a group of another version; retrying will not help soon
                    raise wire.ProtocolError(msg.message)
        finally:
            self._writer = None
            writer.close()
            for fut in [*self._acks.values(), *self._replies.values()]:
                if not fut.done():
                    fut.set_exception(ConnectionError("lost the replica group's connection"))
            self._acks.clear()
            self._replies.clear()

    def _send(self, msg) -> None:
        self._send_frame(wire.frame(msg))

    def _send_frame(self, frame: bytes) -> None:
        if self._writer is None:
            raise ConnectionError("no connection to the replica group")
        self._writer.write(frame)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                await (self._stream_direct() if self.direct else self._stream_serve())
                reason = "the replica group closed its stream"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the group died or is restarting
                reason = f"lost the replica group's stream: {e!r}"
            if self.live.is_set():
                log.warning("group %s: %s", self.name, reason)
                backoff = 0.05
            self.live.clear()
            for inbox in self._inboxes.values():
                inbox.put(dead(reason))
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 2.0)

    async def call(self, method: str, *args: Any) -> Any:
        """A control call (wire.CALLS) on this group; raises if it cannot be reached."""
        if not self.direct:
            return await getattr(self.handle, method).remote(*args)
        fut = asyncio.get_running_loop().create_future()
        self._next_call += 1
        call_id = self._next_call
        self._replies[call_id] = fut
        try:
            self._send(wire.Call(call_id, method, list(args)))
            return await fut
        finally:
            self._replies.pop(call_id, None)

    @property
    def num_open(self) -> int:
        return len(self._inboxes)

    def open(self, request_id: str) -> Inbox:
        inbox = self._inboxes[request_id] = Inbox()
        return inbox

    async def submit(
        self,
        request_id: str,
        token_ids: list[int],
        params: dict[str, Any],
        leg: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """None when the group started the request (deltas follow in the inbox), else an error
        delta. Raises if the group cannot be reached. `leg`: ReplicaGroup.generate_stream's."""
        if not self.direct:
            return await self.handle.submit.remote(
                self.router_id, request_id, token_ids, params, leg
            )
        try:  # before anything is sent: a request that cannot be encoded is not the group's fault
            frame = wire.frame(wire.Submit(request_id, token_ids, params, leg))
        except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
            raise InvalidRequest("request", f"cannot be encoded for a replica group: {e}") from None
        fut = asyncio.get_running_loop().create_future()
        self._acks[request_id] = fut
        try:
            self._send_frame(frame)
            return await fut
        finally:
            self._acks.pop(request_id, None)

    def fail_open(self, reason: str) -> int:
        """End every open request with a "dead" delta (their legs move elsewhere) and tell the
        group to abort them, should it ever read again: the group stopped answering while
        the connection stays up. Returns how many."""
        ids = list(self._inboxes)
        for inbox in self._inboxes.values():
            inbox.put(dead(reason))
        if ids:
            self._to_abort += ids
            self._abort_wake.set()
        return len(ids)

    def close(self, request_id: str, abort: bool) -> None:
        """Forget the request; with `abort`, tell the group to stop it and free its blocks.
        Never blocks: safe while the calling task is being cancelled."""
        self._inboxes.pop(request_id, None)
        if abort:
            self._to_abort.append(request_id)
            self._abort_wake.set()

    async def _abort_forever(self) -> None:
        """Send aborts, batched. This runs in its own long-lived task on purpose: a handle call
        made from inside a request that Serve is cancelling counts as that request's child and
        is cancelled with it -- exactly when an abort matters most."""
        while True:
            await self._abort_wake.wait()
            self._abort_wake.clear()
            batch, self._to_abort = self._to_abort, []
            if not batch:
                continue
            try:
                if self.direct:
                    self._send(wire.Abort(batch))
                else:
                    await self.handle.abort.remote(self.router_id, batch)
            except Exception as e:  # the group is gone: its requests went with it
                log.info("group %s: aborts not delivered: %r", self.name, e)
