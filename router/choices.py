"""One request's output gathered into one Chunk (`complete`), and n choices run side by side
and interleaved as they arrive (`stream_n`): both on top of Router.stream, mixed into Router
(router/core.py), so the front ends call them on the router."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from router.core import Chunk


def choice_id(request_id: str, index: int, n: int) -> str:
    """The id choice `index` of `n` runs under: the request's own when n == 1."""
    return request_id if n == 1 else f"{request_id}-{index}"


class Choices:
    """Mixed into Router, which provides stream()."""

    stream: Callable[..., AsyncIterator[Chunk]]

    async def complete(
        self,
        token_ids: list[int],
        params: SamplingParams,
        session_id: str | None = None,
        request_id: str | None = None,
        index: int = 0,
        key: str | None = None,
    ) -> Chunk:
        """The whole output of one request as one Chunk."""
        ids: list[int] = []
        text: list[str] = []
        lps: list[Any] | None = [] if params.logprobs is not None else None
        last = None
        async for c in self.stream(token_ids, params, session_id, request_id, index, key):
            ids += c.ids
            text.append(c.text)
            if lps is not None and c.logprobs:
                lps += c.logprobs
            last = c
        assert last is not None  # stream() raises rather than end without a finished chunk
        return replace(last, ids=ids, text="".join(text), logprobs=lps, index=index)

    async def stream_n(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        session_id: str | None,
        request_id: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """Choices (a prompt's token ids each), interleaved as they arrive (Chunk.index).
        Choice i of n > 1 runs as `{request_id}-{i}` (the group link needs distinct ids);
        `abort(request_id)` stops them all."""
        if len(params) == 1:
            async for c in self.stream(prompts[0], params[0], session_id, request_id):
                yield c
            return
        base = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, sp: SamplingParams) -> None:
            try:
                ids = choice_id(base, i, len(params))
                async for c in self.stream(prompts[i], sp, session_id, ids, i, base):
                    await queue.put(c)
            except Exception as e:
                await queue.put(e)
            finally:
                await queue.put(done)

        tasks = [asyncio.ensure_future(pump(i, sp)) for i, sp in enumerate(params)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
