"""The router <-> group frames (cluster/wire.py): round trips, broken peers, and a group that
refuses a router of another protocol version."""

from __future__ import annotations

import asyncio

import pytest

from cluster import wire
from cluster.replica_group import ReplicaGroup


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def test_every_message_round_trips():
    delta = {
        "ids": [5, 6],
        "text": "hi",
        "lp": [[-0.5, [5, 7], [-0.5, -1.0]], None],
        "finish": None,
    }
    to_group = [
        wire.Hello("router-1", wire.PROTOCOL_VERSION),
        wire.Submit("r1", [1, 2, 3], {"max_tokens": 4, "temperature": 0.0}),
        wire.Abort(["r1", "r2"]),
    ]
    to_router = [
        wire.Batch(
            [("r1", delta), ("r2", {"error": {"kind": "dead", "field": None, "message": "x"}})]
        ),
        wire.Batch([]),
        wire.Ack("r1", None),
        wire.Refused("no"),
    ]

    async def run():
        r = _reader(b"".join(map(wire.frame, to_group)))
        got = [await wire.read_to_group(r) for _ in to_group]
        assert await wire.read_to_group(r) is None  # clean end
        r = _reader(b"".join(map(wire.frame, to_router)))
        got2 = [await wire.read_to_router(r) for _ in to_router]
        assert await wire.read_to_router(r) is None
        return got, got2

    got, got2 = asyncio.run(run())
    assert got == to_group
    assert got2[0].items == [tuple(i) for i in to_router[0].items]
    assert got2[1:] == to_router[1:]


@pytest.mark.parametrize(
    "data, why",
    [
        ((wire.MAX_FRAME + 1).to_bytes(4, "big"), "exceeds"),
        (b"\x00\x00", "inside a frame header"),
        (b"\x00\x00\x00\x03abc", "unreadable frame"),
        (
            wire.frame(wire.Ack("x", None)),
            "unreadable frame",
        ),  # a router-bound type sent to a group
    ],
)
def test_broken_frames_raise_protocol_error(data, why):
    async def run():
        return await wire.read_to_group(_reader(data))

    with pytest.raises(wire.ProtocolError, match=why):
        asyncio.run(run())


def test_a_group_refuses_another_protocol_version():
    group = object.__new__(ReplicaGroup)  # the hello is answered before any engine is touched
    group.direct_links = 0

    async def run():
        server = await asyncio.start_server(group._serve_link, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(wire.frame(wire.Hello("router-1", wire.PROTOCOL_VERSION + 1)))
        reply = await asyncio.wait_for(wire.read_to_router(reader), 10)
        end = await asyncio.wait_for(wire.read_to_router(reader), 10)
        writer.close()
        server.close()
        return reply, end

    reply, end = asyncio.run(run())
    assert isinstance(reply, wire.Refused)
    assert f"group {wire.PROTOCOL_VERSION}" in reply.message
    assert end is None  # and it closed the connection
    assert group.direct_links == 0
