"""Token-budget scheduler: running requests first (decodes, or the rest of a chunked prefill),
then waiting requests, FCFS, each taking what is left of the budget (chunked prefill).

When blocks run out for a running request, the most recently admitted running request is
preempted by recompute: its blocks are freed, its computed count reset, and it goes back to the
front of the queue. Its tokens so far are kept, so it resumes exactly where it stopped (and its
prefix may come straight back from the prefix cache).

The scheduler never touches tensors. `schedule()` returns a StepPlan; `update()` takes the
sampled tokens back and returns the requests that produced a token this step.
"""

from __future__ import annotations

from collections import deque

from cluster.block_manager import BlockManager
from cluster.config import SchedulerConfig
from cluster.request import Request, Status
from workers.messages import NewRequest, SeqPlan, StepPlan, StepResult


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_since_last_step: list[str] = []
        self._step_id = 0
        self.num_preemptions = 0

    # ---- queue management ---------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        """Finish (or abort) a request at any point; frees its blocks."""
        if req.finished:
            return
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.bm.free(req.req_id)
        self.requests.pop(req.req_id, None)
        if req.sent_to_workers:
            self._finished_since_last_step.append(req.req_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step -------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.bm.free(req.req_id)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        seqs: list[SeqPlan] = []
        new: list[NewRequest] = []
        scheduled: list[tuple[Request, int]] = []  # (request, tokens granted)
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not chunked and n < req.num_tokens - req.num_computed_tokens:
                break
            while not self.bm.allocate(req.req_id, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                budget -= n
                i += 1

        # Admit waiting requests (not in a step that had to preempt: memory is short).
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            hits = self.bm.find_cached_prefix(req.token_ids)
            computed = len(hits) * self.bm.block_size
            remaining = req.num_tokens - computed
            n = min(remaining, budget)
            if not chunked and n < remaining:
                break
            if not self.bm.allocate(req.req_id, computed + n, hits):
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                self.bm.record_lookup(req.prompt_len, computed)
                req.num_cached_tokens = computed
            req.num_computed_tokens = computed
            req.status = Status.RUNNING
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n
            if not req.sent_to_workers:
                new.append(
                    NewRequest(req.req_id, req.prompt_token_ids, req.params, req.num_output_tokens)
                )
                req.sent_to_workers = True

        for req, n in scheduled:
            if req.status is not Status.RUNNING:
                continue  # granted, then preempted later in the same pass
            start = req.num_computed_tokens
            end = start + n
            seqs.append(
                SeqPlan(
                    req_id=req.req_id,
                    token_ids=req.token_ids[start:end],
                    start_pos=start,
                    block_table=list(self.bm.block_table(req.req_id)),
                    sample=end == req.num_tokens,
                )
            )
        self._step_id += 1
        finished, self._finished_since_last_step = self._finished_since_last_step, []
        return StepPlan(self._step_id, seqs, new, finished)

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Advance computed counts, append sampled tokens; returns requests that got a token."""
        for seq in plan.seqs:
            req = self.requests.get(seq.req_id)
            if req is None or req.status is not Status.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens = seq.start_pos + len(seq.token_ids)
            self.bm.cache_blocks(req.req_id, req.token_ids, req.num_computed_tokens)
        out: list[Request] = []
        lps = result.logprobs or [None] * len(result.req_ids)
        for req_id, tok, lp in zip(result.req_ids, result.token_ids, lps, strict=True):
            req = self.requests.get(req_id)
            if req is None or req.status is not Status.RUNNING:
                continue
            req.token_ids.append(tok)
            if req.params.logprobs is not None:
                req.logprobs.append(lp)
            out.append(req)
        return out
