"""Async per-request streams over one LLMEngine, for serving.

The engine is single-threaded; this wrapper owns it from one background thread ("engine
thread") that drains a command queue (add / abort), runs `step()` while there is work, and
hands each output to the asyncio loop of the stream that asked for it. Callers on any event
loop only ever touch thread-safe queues.

Lifecycle of a stream:
    generate() validates (read-only, caller's thread) -> "add" command -> accepted or refused
    (EngineOverloaded) -> deltas until finished. If the consumer stops early (client cancel,
    deadline, disconnect: asyncio.CancelledError or generator close), an "abort" command frees
    the request's KV blocks. If a step raises, every in-flight stream fails with EngineDead.

Hangs: a watchdog thread checks the engine thread's StepClock (cluster.watchdog) every
min(1 s, hang_timeout_s / 4). Once a step has run past `scheduler.hang_timeout_s`, or work
has waited that long with no step begun, the engine is `hung` for good: every in-flight stream
fails with EngineDead (so a router resumes it elsewhere) and new requests are refused. The
group reports it and fails its health check; nothing un-hangs it, Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from cluster import faults
from cluster.config import EngineConfig
from cluster.engine import EngineStats, LLMEngine, RequestOutput
from cluster.watchdog import StepClock
from workers.errors import EngineDead
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_DONE = object()


class _Stream:
    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.dead: BaseException | None = None
        self.hung: str | None = None  # why the watchdog gave up on the engine thread
        self.clock = StepClock()
        # KV block accounting as of the engine's last idle moment (exact: taken on its thread)
        self.blocks: dict[str, int] = {}
        self._ids = 0
        # The engine is built on the thread that steps it. torch's OpenMP runtime keeps one
        # worker pool per calling thread: loading on one thread and stepping on another leaves
        # two pools on 2 cores, more threads than CPUs, and libgomp then lets its workers sleep
        # after every parallel region instead of spinning -- ~1,700 context switches and ~1.5x
        # the time for a short prefill here. One thread, one pool.
        self.engine: LLMEngine = engine  # type: ignore[assignment]
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._main, args=(config, ready, failed), name="flotilla-engine", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        self.hang_timeout_s = self.engine.config.scheduler.hang_timeout_s
        self._watchdog = threading.Thread(target=self._watch, name="flotilla-watchdog", daemon=True)
        self._watchdog.start()

    def _main(self, config, ready: threading.Event, failed: list[BaseException]) -> None:
        try:
            if self.engine is None:
                self.engine = LLMEngine(config)
            self._step = faults.wrap_step(self.engine.step)  # engine.step outside tests
            self.blocks = self.engine.block_audit()
        except BaseException as e:  # reported to the constructor's caller
            failed.append(e)
            return
        finally:
            ready.set()
        self._run()

    # ---- caller side ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _send(self, *cmd: Any) -> None:
        self._cmds.put(cmd)
        self.clock.poke()
        self._wake.set()

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        resume_output_ids: Sequence[int] = (),
        handoff: bool = False,
        kv: tuple[Any, ...] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutput deltas for one request; the last one has finished=True.
        `resume_output_ids` / `handoff`: see LLMEngine.add_request. `kv`: exported blocks
        (token ids, data[, sender's KVLayout]) of this prompt to import first, on the engine thread right before
        the request is queued, so no step can evict them in between."""
        if self.dead is not None:
            raise EngineDead(f"engine failed: {self.dead!r}")
        if self.hung is not None:
            raise EngineDead(f"engine hung: {self.hung}")
        params = params or SamplingParams()
        token_ids = self.engine.tokenize(prompt)
        self.engine.validate(token_ids, params)  # InvalidRequest before any state changes
        if request_id is None:
            self._ids += 1
            request_id = f"async-{id(self):x}-{self._ids}"
        stream = _Stream(asyncio.get_running_loop())
        # Arrival is now, not when the engine thread picks the command up: queue time then
        # includes the wait for the step in progress, as a client sees it.
        extra = {
            "resume_output_ids": list(resume_output_ids),
            "handoff": handoff,
            "arrival_time": time.monotonic(),
        }
        self._send("add", request_id, token_ids, params, stream, extra, kv)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._send("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def cached_block_hashes(self) -> list[int]:
        return self.engine.cached_block_hashes()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        # A hung thread never comes back; it is a daemon and ends with the process.
        self._thread.join(timeout=0 if self.hung else 10)
        self._watchdog.join(timeout=2)
        self.engine.shutdown()

    # ---- watchdog thread ----------------------------------------------------------------------
    def _watch(self) -> None:
        period = min(1.0, self.hang_timeout_s / 4)
        while not self._stopped and self.dead is None and self.hung is None:
            time.sleep(period)
            pending = self.engine.has_unfinished() or not self._cmds.empty()
            reason = self.clock.stalled(pending, self.hang_timeout_s)
            if reason is not None and not self._stopped and self.dead is None:
                self._give_up(reason)

    def _give_up(self, reason: str) -> None:
        """The engine thread is stuck: fail every stream now (the routers resume them on other
        groups), refuse new requests, and queue aborts that free the blocks should the thread
        ever come back."""
        self.hung = reason
        log.error("engine hung: %s; failing %d stream(s)", reason, len(self._streams))
        err = EngineDead(f"engine hung: {reason}")
        # Requests still queued end too: the thread that would take them is stuck.
        keep = []
        for cmd in self._take_queued():
            if cmd[0] == "add":
                cmd[4].put(err)
            else:
                keep.append(cmd)
        for cmd in keep:
            self._cmds.put(cmd)
        for req_id, stream in list(self._streams.items()):
            stream.put(err)
            self._send("abort", req_id)

    def _take_queued(self) -> Iterator[tuple[Any, ...]]:
        """The commands queued now, each taken off the queue as it is yielded."""
        while True:
            try:
                yield self._cmds.get_nowait()
            except queue.Empty:
                return

    # ---- engine thread ----------------------------------------------------------------------
    def _drain(self) -> None:
        for cmd in self._take_queued():
            if cmd[0] == "add":
                _, req_id, token_ids, params, stream, extra, kv = cmd
                try:
                    if kv is not None:
                        self._import(kv)
                    self.engine.add_request(token_ids, params, request_id=req_id, **extra)
                    self._streams[req_id] = stream
                except Exception as e:  # refused: overloaded or duplicate id
                    stream.put(e)
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])
                stream = self._streams.pop(cmd[1], None)
                if stream is not None:
                    stream.put(asyncio.CancelledError())

    def _import(self, kv: tuple[Any, ...]) -> None:
        """Imported blocks enter the prefix cache; a failed import only costs a recompute."""
        try:
            self.engine.import_kv(*kv)
        except Exception as e:  # no free blocks, or a layout that does not fit
            log.warning("KV import of %d tokens failed, recomputing: %r", len(kv[0]), e)

    def _run(self) -> None:
        busy = False
        while not self._stopped:
            self.clock.tick()
            self._drain()
            if not self.engine.has_unfinished():
                if busy:  # just went idle: account for every block (between steps: exact)
                    self.blocks = self.engine.block_audit()
                    busy = False
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            busy = True
            try:
                self.clock.start()
                outputs = self._step()
                self.clock.end()
            except BaseException as e:  # a rank died or a kernel failed: fail loudly, never hang
                log.exception("engine step failed")
                self.dead = e
                err = EngineDead(f"engine step failed: {e!r}")
                for req_id, stream in list(self._streams.items()):
                    self.engine.abort(req_id)
                    stream.put(err)
                self._streams.clear()
                return
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                stream.put(out)
                if out.finished:
                    del self._streams[out.request_id]
