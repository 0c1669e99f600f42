"""A prefill engine's export of a hand-off's KV: the prompt's full blocks, copied out of the
paged cache into the memory a decode group reads (a slot of the prefill group's arena,
cluster/kv_arena.py, or new memory).

One-shot (no target that lends memory, or `pipelined` off): every block is copied when the
first token comes, on the step's critical path. Pipelined: the slot is reserved when the
request is first scheduled, sized for the prompt's full blocks, and the full blocks each
prefill chunk completes are copied into it as that step returns -- on the copier thread
(`background`) while the engine goes on to its next step, or inline -- so at the first token
only the last chunk's blocks are left to copy.

    begin(req_ids)    a hand-off request scheduled for the first time: reserve its slot, with
                      no hold clock yet (it is being filled)
    before_execute()  a request whose blocks a queued copy reads was preempted: wait for the
                      copier -- the coming step may write into the blocks it freed
    after_step()      queue the copies of the full blocks this step completed
    finish(req)       the first token: wait for the copier, copy the rest, start the slot's
                      hold; (token ids, block data) -- the data's blocks are the valid ones
    drop(req_id)      ended without a hand-off (abort, a stop at the first token, an engine
                      failure): wait for the copier, release the slot -- nothing stays held

Invariants: a copy reads only full, computed blocks of a running request (which nothing
writes while it holds them), and every queued copy has completed before its slot is handed
off or released and before a step could write into a block it reads.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.block_manager import BlockManager
from cluster.kv_transfer import KVLayout
from cluster.request import Request, Status

log = logging.getLogger(__name__)


class ExportTarget(Protocol):
    """Memory a hand-off is exported into (cluster.kv_arena.KVArena is one)."""

    def reserve(self, key: str, shape: tuple, dtype: Any, hold_s: float | None = None) -> Any:
        """A tensor of `shape` to write into, held under `key`, or None (then new memory)."""
        ...

    def hold(self, key: str) -> None:
        """Filled: start the hold clock (a slot reserved with hold_s=inf has none)."""
        ...

    def release(self, key: str) -> bool: ...


@dataclass
class _Export:
    req: Request
    out: Any  # the slot: [layers, 2, blocks, block_size, kv_heads, head_dim]
    blocks: int  # the prompt's full blocks: what the slot holds once filled
    done: int = 0  # blocks copied or queued to the copier
    preempts: int = 0  # the request's preemptions when its last copy was queued
    failed: bool = False  # a copy raised: the export is redone one-shot at the end


class KVExporter:
    def __init__(
        self,
        executor: Any,
        block_manager: BlockManager,
        layout: KVLayout,
        requests: dict[str, Request],
    ):
        self.executor = executor
        self.bm = block_manager
        self.requests = requests  # the scheduler's, by id
        self.layout = layout
        self.target: ExportTarget | None = None  # set by a prefill group with an arena
        self.pipelined = True
        self.background = True
        self._exports: dict[str, _Export] = {}
        self._copier: _Copier | None = None
        # For benchmarks and stats: seconds the last hand-off spent in finish() (on the
        # critical path), and blocks copied early (while prefill ran) / at the first token.
        self.last_finish_s = 0.0
        self.early_blocks = 0
        self.late_blocks = 0

    @property
    def active(self) -> int:
        """Slots reserved and being filled now."""
        return len(self._exports)

    # ---- the engine's step --------------------------------------------------------------
    def begin(self, req_ids: list[str]) -> None:
        """Reserve slots for these hand-off requests (just scheduled) not yet tracked."""
        if self.target is None or not self.pipelined:
            return
        for req_id in req_ids:
            if req_id in self._exports:
                continue
            req = self.requests[req_id]
            # The tokens before the first sample: all of them are computed by then.
            blocks = req.num_tokens // self.bm.block_size
            if blocks == 0:
                continue
            layout = self.layout
            out = self.target.reserve(
                req_id, layout.shape(blocks), layout.torch_dtype, hold_s=math.inf
            )
            if out is not None:  # else the arena is full: one-shot into new memory at the end
                self._exports[req_id] = _Export(req, out, blocks, preempts=req.num_preemptions)

    def before_execute(self) -> None:
        if self._copier is None or not self._copier.pending:
            return
        for e in self._exports.values():
            if e.req.status is not Status.RUNNING or e.req.num_preemptions != e.preempts:
                self._copier.wait()  # its blocks were freed: let the copies read them first
                return

    def after_step(self) -> None:
        for e in self._exports.values():
            if e.req.status is Status.RUNNING:
                self._copy(e, min(e.req.num_computed_tokens // self.bm.block_size, e.blocks))

    def _copy(self, e: _Export, upto: int, inline: bool = False) -> None:
        if upto <= e.done:
            return
        blocks = self.bm.block_table(e.req.req_id)[e.done : upto]
        # A block range of the slot is contiguous per layer and K / V: the copy is a gather
        # of whole blocks into it.
        dst = e.out[:, :, e.done : upto]
        e.done, e.preempts = upto, e.req.num_preemptions
        if inline or not self.background:
            self.executor.export_blocks(blocks, dst)
            return

        def job() -> None:
            try:
                self.executor.export_blocks(blocks, dst)
            except Exception:  # the export is redone one-shot at the first token
                log.exception("a KV export copy of %s failed", e.req.req_id)
                e.failed = True

        if self._copier is None:
            self._copier = _Copier()
        self._copier.submit(job)

    # ---- the end of a hand-off request ------------------------------------------------
    def finish(self, req: Request) -> tuple[list[int], Any]:
        """The prompt's computed full blocks, (their token ids, block data), for the lease."""
        t0 = time.perf_counter()
        bs = self.bm.block_size
        n_full = req.num_computed_tokens // bs
        e = self._exports.pop(req.req_id, None)
        if e is not None:
            if self._copier is not None:
                self._copier.wait()
            if e.failed or n_full != e.blocks:  # a copy failed, or an odd count
                self.target.release(req.req_id)  # type: ignore[union-attr]
                e = None
        if e is None:
            data = self._one_shot(req, n_full)
            self.late_blocks += n_full
        else:
            self.early_blocks += e.done
            self.late_blocks += n_full - e.done
            self._copy(e, n_full, inline=True)
            self.target.hold(req.req_id)  # type: ignore[union-attr]
            data = e.out
        self.last_finish_s = time.perf_counter() - t0
        return req.token_ids[: n_full * bs], data

    def export_now(self, req: Request) -> tuple[list[int], Any]:
        """The computed full blocks of any running request, copied now (LLMEngine.export_kv)."""
        n_full = req.num_computed_tokens // self.bm.block_size
        # new memory for a hand-off being exported: a second slot would replace its slot
        mine = req.req_id not in self._exports
        return req.token_ids[: n_full * self.bm.block_size], self._one_shot(req, n_full, mine)

    def _one_shot(self, req: Request, n_full: int, into_target: bool = True) -> Any:
        blocks = self.bm.block_table(req.req_id)[:n_full]
        out = None
        if self.target is not None and n_full and into_target:
            layout = self.layout
            out = self.target.reserve(req.req_id, layout.shape(n_full), layout.torch_dtype)
        return self.executor.export_blocks(blocks, out)

    def drop(self, req_id: str) -> None:
        """`req_id` ended without a hand-off: its slot goes back (after any copy into it)."""
        e = self._exports.pop(req_id, None)
        if e is None:
            return
        if self._copier is not None:
            self._copier.wait()
        self.target.release(req_id)  # type: ignore[union-attr]

    def close(self) -> None:
        for req_id in list(self._exports):
            self.drop(req_id)
        if self._copier is not None:
            self._copier.close()


class _Copier:
    """One thread that runs copies in order; wait() returns once every queued one ran."""

    def __init__(self) -> None:
        import torch

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self.pending = 0
        threads = torch.get_num_threads()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="flotilla-kv-copier", daemon=True
        )
        self._thread.start()
        started.wait()
        # The copier asked torch for one thread (below), which also set torch's process-wide
        # default that threads starting later inherit: put that back. Each thread's own
        # OpenMP count stays as it is.
        torch.set_num_threads(threads)

    def _run(self, started: threading.Event) -> None:
        import torch

        # One thread, so no OpenMP pool of its own: a second pool on a small machine makes
        # libgomp's workers sleep between parallel regions (cluster/async_engine.py). A
        # copy is memory-bound; it needs no more.
        torch.set_num_threads(1)
        started.set()
        while (job := self._jobs.get()) is not None:
            try:
                job()
            finally:
                with self._cond:
                    self.pending -= 1
                    self._cond.notify_all()

    def submit(self, job: Callable[[], Any]) -> None:
        with self._cond:
            self.pending += 1
        self._jobs.put(job)

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.pending == 0)

    def close(self) -> None:
        self._jobs.put(None)
