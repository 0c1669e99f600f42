"""Token-budget scheduler with chunked prefill. One step, in order:

1. Decodes: every running request whose prompt is computed gets its next token first.
2. Prefill chunks: running requests still catching up (chunked prompts, recompute after
   preemption), then waiting requests in the admission policy's order, each taking what is left
   of `max_num_batched_tokens` -- and, while step 1 scheduled any decode, of the prefill cap, so a
   new prompt cannot stall every running stream for a whole-budget step (stall-free batching).
   Steps without decodes give prefill the whole budget (time to first token).
3. Draft tokens (speculative decoding, cluster/spec_decode.py): decodes that have a proposal
   grow by it, from what steps 1-2 left of the budget and the free blocks -- drafts never
   preempt or delay anyone's real tokens.

Admission policies (fcfs, sjf_aging) and prefill caps (none, fixed, auto from the step-time
model) are small objects in cluster/policies.py. `policy=fcfs` with
`max_prefill_tokens_when_decoding=null` is the plain FCFS token-budget scheduler.

When blocks run out for a running request, the most recently admitted running request is
preempted by recompute: its blocks are freed, its computed count reset, and it goes back to the
front of the queue, ahead of every policy's order. Its tokens so far are kept, so it resumes
exactly where it stopped (and its prefix may come straight back from the prefix cache).

The scheduler never touches tensors. `schedule()` returns a StepPlan; `update()` takes the
sampled tokens back and returns the requests that produced a token this step; the engine reports
each step's wall time to `observe_step()`, which feeds the step-time model.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from itertools import chain, islice

from cluster.block_manager import BlockManager
from cluster.config import SchedulerConfig, SpeculativeConfig
from cluster.policies import AutoCap, Pending, make_admission, make_prefill_cap
from cluster.request import Request, Status
from cluster.spec_decode import Proposer
from cluster.step_model import StepTimeModel
from workers.messages import NewRequest, SeqPlan, StepPlan, StepResult


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        clock: Callable[[], float] = time.monotonic,
        speculative: SpeculativeConfig | None = None,
    ):
        self.config = config
        self.bm = block_manager
        self.clock = clock  # the clock of Request.arrival_time
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step_model = StepTimeModel()
        self.admission = make_admission(config)
        self.prefill_cap = make_prefill_cap(config, self.step_model)
        self._finished_since_last_step: list[str] = []
        self._step_id = 0
        self.num_preemptions = 0
        self.proposer = Proposer(speculative) if speculative is not None else None

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

    def _allocate_running(self, req: Request, n: int) -> bool:
        """Blocks for `n` more tokens of a running request, preempting from the tail of
        `running` until they fit; False when `req` itself had to go."""
        while not self.bm.allocate(req.req_id, req.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _prefill_budget(
        self, num_decodes: int, budget: int, chunks: list[Request], order: list[Request]
    ) -> int:
        if num_decodes == 0:
            return budget
        # Prompts still owed a first token, in the order they will be served (a preempted
        # request's recompute owes none: it already streamed).
        pending = [
            Pending(r.num_tokens - r.num_computed_tokens, r.arrival_time)
            for r in islice(chain(chunks, order), AutoCap.HORIZON)
            if r.first_token_time is None and r.status is not Status.FINISHED
        ]
        cap = self.prefill_cap.limit(num_decodes, pending, self.clock())
        return budget if cap is None else min(cap, budget)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        seqs: list[SeqPlan] = []
        new: list[NewRequest] = []
        scheduled: list[tuple[Request, int]] = []  # (request, tokens granted)
        preempts_before = self.num_preemptions

        def behind(r: Request) -> int:
            return r.num_tokens - r.num_computed_tokens

        # 1. Decodes (running order: a preemption takes the most recently admitted).
        decodes = [r for r in self.running if behind(r) == 1]
        chunks = [r for r in self.running if behind(r) > 1]
        for req in decodes:
            if budget <= 0:
                break
            if req.status is Status.RUNNING and self._allocate_running(req, 1):
                scheduled.append((req, 1))
                budget -= 1
        num_decodes = len(scheduled)
        order = self.admission.order(self.waiting, self.clock()) if self.waiting else []
        prefill = self._prefill_budget(num_decodes, budget, chunks, order)

        # 2a. The rest of running requests' prompts (or of their recompute).
        for req in chunks:
            if min(budget, prefill) <= 0:
                break
            if req.status is not Status.RUNNING:
                continue  # preempted above
            n = min(behind(req), budget, prefill)
            if not chunked and n < behind(req):
                break
            if self._allocate_running(req, n):
                scheduled.append((req, n))
                budget -= n
                prefill -= n

        # 2b. Admit waiting requests (not in a step that had to preempt: memory is short).
        if self.waiting and min(budget, prefill) > 0 and self.num_preemptions == preempts_before:
            for req in order:
                if min(budget, prefill) <= 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                hits = self.bm.find_cached_prefix(req.token_ids)
                computed = len(hits) * self.bm.block_size
                remaining = req.num_tokens - computed
                n = min(remaining, budget, prefill)
                if not chunked and n < remaining:
                    break
                if not self.bm.allocate(req.req_id, computed + n, hits):
                    break
                self.waiting.remove(req)
                if req.num_preemptions == 0:
                    self.bm.record_lookup(req.prompt_len, computed)
                    req.num_cached_tokens = computed
                    req.scheduled_time = self.clock()
                req.num_computed_tokens = computed
                req.status = Status.RUNNING
                self.running.append(req)
                scheduled.append((req, n))
                budget -= n
                prefill -= n
                if not req.sent_to_workers:
                    new.append(
                        NewRequest(
                            req.req_id, req.prompt_token_ids, req.params, req.num_output_tokens
                        )
                    )
                    req.sent_to_workers = True

        drafts = {}
        if self.proposer is not None:
            drafts = self._draft([r for r, _ in scheduled[:num_decodes]], budget)
        for req, n in scheduled:
            if req.status is not Status.RUNNING:
                continue  # granted, then preempted later in the same pass
            start = req.num_computed_tokens
            end = start + n
            draft = drafts.get(req.req_id, [])
            seqs.append(
                SeqPlan(
                    req_id=req.req_id,
                    token_ids=req.token_ids[start:end] + draft,
                    start_pos=start,
                    block_table=list(self.bm.block_table(req.req_id)),
                    sample=end == req.num_tokens,
                    num_draft=len(draft),
                )
            )
        self._step_id += 1
        finished, self._finished_since_last_step = self._finished_since_last_step, []
        return StepPlan(self._step_id, seqs, new, finished)

    def _draft(self, decodes: list[Request], budget: int) -> dict[str, list[int]]:
        """Draft tokens for this step's decodes, within `budget` and the free blocks."""
        assert self.proposer is not None
        out: dict[str, list[int]] = {}
        limit = self.proposer.config.disable_by_batch_size
        if limit is not None and len(decodes) > limit:
            return out
        for req in decodes:
            if budget <= 0:
                break
            if req.status is not Status.RUNNING:
                continue  # preempted later in this pass
            max_new = req.params.max_tokens - req.num_output_tokens - 1
            draft = self.proposer.propose(req, max_new)[:budget]
            # allocate() changes nothing when the blocks are not free: then no drafts.
            if draft and self.bm.allocate(req.req_id, req.num_tokens + len(draft)):
                out[req.req_id] = draft
                budget -= len(draft)
        return out

    def observe_step(self, plan: StepPlan, seconds: float) -> None:
        """The wall time of a step the engine ran from `plan` (feeds the auto prefill cap)."""
        decodes = sum(1 for q in plan.seqs if q.is_decode)
        tokens = sum(len(q.token_ids) for q in plan.seqs)
        self.step_model.observe(decodes, tokens - decodes, seconds)

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Advance computed counts, append sampled tokens (several when drafts were accepted);
        returns requests that got a token, in plan order."""
        lps = result.logprobs or [None] * len(result.req_ids)
        got = {r: (result.new_tokens(i), lps[i]) for i, r in enumerate(result.req_ids)}
        out: list[Request] = []
        for seq in plan.seqs:
            req = self.requests.get(seq.req_id)
            if req is None or req.status is not Status.RUNNING:
                continue  # aborted while the step ran
            computed = seq.start_pos + len(seq.token_ids) - seq.num_draft
            if seq.req_id in got:
                tokens, lp = got[seq.req_id]
                if seq.num_draft:
                    # The accepted drafts' KV is the right KV: they are the tokens now.
                    accepted = len(tokens) - 1
                    assert 0 <= accepted <= seq.num_draft, (accepted, seq.num_draft)
                    assert self.proposer is not None
                    self.proposer.record(req, seq.num_draft, accepted)
                    computed += accepted
                req.token_ids.extend(tokens)
                if req.params.logprobs is not None:
                    req.logprobs.append(lp)
                out.append(req)
            req.num_computed_tokens = computed
            self.bm.cache_blocks(req.req_id, req.token_ids, computed)
            if seq.num_draft:
                self.bm.trim(req.req_id, req.num_tokens)  # the rejected drafts' blocks
        return out
