"""The direct data plane between a router replica and a replica group: every message type and
its encoding, written and read here only (router/link.py is one end, ReplicaGroup the other).

One TCP connection per (router replica, group), authenticated both ways before any frame is
read: the group makes a random secret when it starts its server and hands it out only through
Ray (the Serve handle call `data_address`, which Ray's own authentication guards). The router's
first bytes are that secret (compared in constant time; anything else is closed unread), and
the group answers HMAC(secret, the router's 16-byte nonce), so the router knows it reached the
group and not whatever else listens on that port.

After that, each frame is a 4-byte big-endian length and
a msgpack body (msgspec: typed, ~10x cheaper than JSON per batch of deltas, and no newline
scanning). The first frame is the router's Hello; a group that speaks another version answers
Refused and closes, so a mixed-version deploy fails loudly instead of misreading frames.

    router -> group   Hello(router, version, subscribe)  first frame: subscribe (a peer
                                                group fetching KV says subscribe=False)
                      Submit(id, ids, params, leg)  start (or resume) a request
                      Abort(ids)                stop requests, free their KV blocks
                      Call(id, method, args)    control: stats / drain / take_kv ... (CALLS)
    group -> router   Batch(items)              [(request_id, delta), ...]; the first is empty
                      Ack(id, err)              a Submit's answer: None or an error delta
                      Reply(id, value, err)     a Call's answer
                      Refused(message)          the Hello was not accepted; the group closes

Control calls travel on the same connection because a pool is one Serve deployment of many
replicas: a Serve handle call reaches *some* replica, the socket reaches *this* group.

Deltas stay plain dicts (the shape cluster.replica_group documents), so the Serve-handle data
plane (`router.data_plane: serve`) carries the very same values. A new optional delta key
(e.g. the last delta's "timing") needs no new PROTOCOL_VERSION: readers ignore keys they do
not know and treat a missing one as absent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from typing import Any

import msgspec

PROTOCOL_VERSION = 3  # 1: newline-delimited JSON; 2: no control calls
# A batch of deltas is KBs; a prompt's KV (take_kv) up to a few hundred MB. Frames are read only
# after the peer proved it holds the group's secret, so the limit guards against bugs, not abuse.
MAX_FRAME = 1 << 30
CALLS = ("stats", "drain", "take_kv", "release_kv", "kv_link")


class Hello(msgspec.Struct, tag=True):
    router: str
    version: int
    subscribe: bool = True  # False: a control-only connection (a peer group taking KV)


class Submit(msgspec.Struct, tag=True):
    id: str
    ids: list[int]
    params: dict[str, Any]
    leg: dict[str, Any] | None = None  # a hand-off or a resume: ReplicaGroup.submit's `leg`


class Abort(msgspec.Struct, tag=True):
    ids: list[str]


class Call(msgspec.Struct, tag=True):
    id: int
    method: str  # one of CALLS
    args: list[Any] = []


class Reply(msgspec.Struct, tag=True):
    id: int
    value: Any = None
    err: str | None = None


class Batch(msgspec.Struct, tag=True):
    items: list[tuple[str, dict[str, Any]]]


class Ack(msgspec.Struct, tag=True):
    id: str
    err: dict[str, Any] | None


class Refused(msgspec.Struct, tag=True):
    message: str


ToGroup = Hello | Submit | Abort | Call
ToRouter = Batch | Ack | Reply | Refused

_encoder = msgspec.msgpack.Encoder()
_to_group = msgspec.msgpack.Decoder(ToGroup)
_to_router = msgspec.msgpack.Decoder(ToRouter)


class ProtocolError(ConnectionError):
    """The peer sent something this version cannot read."""


SECRET_BYTES = 32
NONCE_BYTES = 16


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _proof(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, b"flotilla-group" + nonce, hashlib.sha256).digest()


def client_hello(secret: bytes) -> tuple[bytes, bytes]:
    """(the router's opening bytes, the nonce whose proof it expects back)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return secret + nonce, nonce


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> bool:
    """Group side: read the router's secret and nonce, answer with the proof. False (and
    nothing written) when the secret is wrong or the peer closes early."""
    try:
        opening = await reader.readexactly(SECRET_BYTES + NONCE_BYTES)
    except asyncio.IncompleteReadError:
        return False
    if not hmac.compare_digest(opening[:SECRET_BYTES], secret):
        return False
    writer.write(_proof(secret, opening[SECRET_BYTES:]))
    return True


async def verify(reader: asyncio.StreamReader, secret: bytes, nonce: bytes) -> None:
    """Router side: the group's proof, or ProtocolError."""
    try:
        proof = await reader.readexactly(hashlib.sha256().digest_size)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the replica group closed the connection: wrong secret?") from None
    if not hmac.compare_digest(proof, _proof(secret, nonce)):
        raise ProtocolError("the peer on the data-plane port is not the replica group")


_CHUNK = 1 << 20


async def send_large(writer: asyncio.StreamWriter, msg: msgspec.Struct) -> None:
    """Write a frame that may be large (a prompt's KV) in 1 MiB pieces, draining between them:
    asyncio's transport (3.11) keeps unsent bytes in one bytearray and deletes each sent piece
    from its front, so one 50 MB write costs ~1 s of memmove; pieces keep that buffer small.
    The header goes on its own (frame()'s header + body would copy the body once more)."""
    body = memoryview(_encoder.encode(msg))
    writer.write(len(body).to_bytes(4, "big"))
    for i in range(0, len(body), _CHUNK):
        writer.write(body[i : i + _CHUNK])
        await writer.drain()


def frame(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return len(body).to_bytes(4, "big") + body


async def _read_body(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("connection closed inside a frame header") from None
        return None
    n = int.from_bytes(head, "big")
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return await reader.readexactly(n)


async def _read(reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder, peer: str):
    body = await _read_body(reader)
    try:
        return None if body is None else decoder.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"unreadable frame from the {peer}: {e}") from None


async def read_to_group(reader: asyncio.StreamReader) -> Hello | Submit | Abort | Call | None:
    return await _read(reader, _to_group, "router")


async def read_to_router(reader: asyncio.StreamReader) -> Batch | Ack | Reply | Refused | None:
    return await _read(reader, _to_router, "replica group")


async def connect(host: str, port: int, secret: bytes, limit: int = 1 << 20):
    """Open and authenticate a connection to a group's data plane -> (reader, writer)."""
    reader, writer = await asyncio.open_connection(host, port, limit=limit)
    try:
        opening, nonce = client_hello(secret)
        writer.write(opening)
        await verify(reader, secret, nonce)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def call_once(host: str, port: int, secret: bytes, caller: str, method: str, args: list):
    """One control call on a connection of its own (a decode group taking a prompt's KV from
    a prefill group: rare and large, so no connection is kept)."""
    reader, writer = await connect(host, port, secret, limit=1 << 24)
    try:
        writer.write(frame(Hello(caller, PROTOCOL_VERSION, subscribe=False)))
        writer.write(frame(Call(0, method, args)))
        while (msg := await read_to_router(reader)) is not None:
            if isinstance(msg, Reply):
                if msg.err is not None:
                    raise RuntimeError(f"{method} failed in the group: {msg.err}")
                return msg.value
            if isinstance(msg, Refused):
                raise ProtocolError(msg.message)
        raise ConnectionError("the replica group closed the connection")
    finally:
        writer.close()
