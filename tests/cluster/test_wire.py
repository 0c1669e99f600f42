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


def _group_server():
    """A ReplicaGroup's data-plane server without an engine: the handshake and the hello are
    answered before any engine state is touched."""
    group = object.__new__(ReplicaGroup)
    group.direct_links = group.rejected_links = 0
    group._secret = wire.new_secret()
    return group


async def _connect(group, opening: bytes):
    server = await asyncio.start_server(group._serve_link, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(opening)
    return server, reader, writer


def test_a_group_refuses_another_protocol_version():
    group = _group_server()

    async def run():
        opening, nonce = wire.client_hello(group._secret)
        server, reader, writer = await _connect(group, opening)
        await wire.verify(reader, group._secret, nonce)  # the group proved itself
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


@pytest.mark.parametrize("opening", ["wrong-secret", "hello-frame-first", "short"])
def test_a_connection_without_the_secret_is_closed_unread(opening):
    group = _group_server()
    data = {
        "wrong-secret": wire.client_hello(wire.new_secret())[0],
        "hello-frame-first": wire.frame(wire.Hello("r", wire.PROTOCOL_VERSION)) + b"\0" * 64,
        "short": group._secret[:10],
    }[opening]

    async def run():
        server, reader, writer = await _connect(group, data)
        if opening == "short":
            writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 10)  # nothing, then the close
        writer.close()
        server.close()
        return got

    assert asyncio.run(run()) == b""
    assert group.rejected_links == 1 and group.direct_links == 0


def test_the_router_rejects_a_peer_that_does_not_know_the_secret():
    secret = wire.new_secret()

    async def impostor(reader, writer):
        await reader.readexactly(wire.SECRET_BYTES + wire.NONCE_BYTES)
        writer.write(b"x" * 32)  # a proof it cannot make
        await writer.drain()

    async def run():
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opening, nonce = wire.client_hello(secret)
        writer.write(opening)
        try:
            await wire.verify(reader, secret, nonce)
        finally:
            writer.close()
            server.close()

    with pytest.raises(wire.ProtocolError, match="not the replica group"):
        asyncio.run(run())
