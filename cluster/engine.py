"""The engine of one model replica: validation, scheduler + block manager, executor, output
processing (incremental detokenization, stop conditions).

    add_request ──▶ waiting ──schedule()──▶ StepPlan ──executor──▶ StepResult
        ──update()──▶ new tokens ──▶ stop checks / detokenize ──▶ RequestOutput deltas

`generate()` is the offline API; `cluster.async_engine.AsyncEngine` wraps the same object with
per-request async streams for serving. Everything is single-threaded here by design: the async
wrapper funnels every call through its one engine thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.block_manager import BlockManager
from cluster.config import EngineConfig
from cluster.detokenizer import IncrementalDetokenizer
from cluster.executor import Executor, make_executor
from cluster.grammar import Grammars
from cluster.kv_export import KVExporter
from cluster.kv_transfer import KVLayout
from cluster.request import Request
from cluster.scheduler import Scheduler
from workers import progress
from workers.errors import EngineOverloaded, InvalidRequest
from workers.loader import load_tokenizer, resolve_model_path
from workers.messages import TokenLogprobs
from workers.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    new_token_ids: list[int]  # this delta
    text: str  # every output character emitted so far
    delta_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # every token so far
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    # Per-request timings (time.monotonic) and preemptions, for the router's histograms.
    scheduled_time: float | None = None  # first admitted: arrival -> here is queue time
    finished_time: float | None = None  # set on the last output only
    num_preemptions: int = 0
    # finish_reason "handoff": the prompt's full KV blocks, (their token ids, block data),
    # copied out as the request finished, for a decode group to import
    kv: tuple[list[int], Any] | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_hit_rate: float
    num_preemptions: int
    # Speculative decoding totals: draft tokens verified, and how many were accepted.
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


class _Track:
    """Output-side state of one request."""

    __slots__ = ("detok", "text", "sent_tokens")

    def __init__(self, detok: IncrementalDetokenizer):
        self.detok = detok
        self.text = ""
        self.sent_tokens = 0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, executor: Executor | None = None):
        self.config = config = config or EngineConfig()
        path = resolve_model_path(config.model.model)
        t0 = time.monotonic()
        self.tokenizer = load_tokenizer(path)
        progress.phase("tokenizer", time.monotonic() - t0)
        self.executor = executor or make_executor(config)
        hf = self.executor.hf_config
        self.vocab_size = hf.vocab_size
        self.max_model_len = min(
            config.model.max_model_len or hf.max_position_embeddings, hf.max_position_embeddings
        )
        eos = hf.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.block_manager = BlockManager(
            self.executor.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler, self.block_manager, speculative=config.speculative
        )
        bs = config.cache.block_size
        # What this engine's exported KV is, and what KV it imports (cluster.kv_transfer).
        self.kv_layout = KVLayout(config.model.name, *self.executor.kv_layout(), block_size=bs)
        # A hand-off's blocks leave through this (cluster/kv_export.py); a prefill group with
        # an arena sets kv_export.target, and they are copied into a slot chunk by chunk.
        self.kv_export = KVExporter(
            self.executor, self.block_manager, self.kv_layout, self.scheduler.requests
        )
        progress.report(
            f"KV cache: {self.executor.num_blocks} blocks x {bs} tokens = "
            f"{self.executor.num_blocks * bs} tokens; max model length {self.max_model_len}"
        )
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._tracks: dict[str, _Track] = {}
        self._handoffs: set[str] = set()  # prefill-pool requests (add_request(handoff=True))
        self._ids = itertools.count()

    # ---- requests ---------------------------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "must not be empty")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest naming the field and the limit; changes no state."""
        n = len(token_ids)
        if n == 0:
            raise InvalidRequest("prompt", "must not be empty")
        bad = next((t for t in token_ids if not (0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise InvalidRequest(
                "prompt_token_ids",
                f"token id {bad} is outside the vocabulary [0, {self.vocab_size})",
            )
        if n >= self.max_model_len:
            raise InvalidRequest(
                "prompt", f"{n} tokens; the limit is max_model_len - 1 = {self.max_model_len - 1}"
            )
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                "max_tokens",
                f"{params.max_tokens} + {n} prompt tokens exceeds max_model_len={self.max_model_len}"
                f" (at most {self.max_model_len - n})",
            )
        bm = self.block_manager
        if bm.blocks_needed(n + params.max_tokens) > bm.num_blocks:
            raise InvalidRequest(
                "max_tokens",
                f"prompt + max_tokens = {n + params.max_tokens} tokens needs more KV blocks than "
                f"the cache holds ({bm.num_blocks} x {bm.block_size} tokens)",
            )
        if any(t < 0 or t >= self.vocab_size for t in params.stop_token_ids):
            raise InvalidRequest("stop_token_ids", f"ids must be in [0, {self.vocab_size})")
        bad = next((t for t in params.logit_bias if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest("logit_bias", f"token id {bad} is outside [0, {self.vocab_size})")

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        resume_output_ids: Sequence[int] = (),
        handoff: bool = False,
    ) -> str:
        """Queue a request. `resume_output_ids`: output tokens it already produced elsewhere
        (a prefill group's first token, or a group that died): it continues after them as if
        it had never moved -- same penalties, stop strings, seeded draws and max_tokens.
        `handoff`: a prefill-pool request: after its first token it finishes with reason
        "handoff" and its prompt's KV blocks in RequestOutput.kv, unless it ended for good."""
        params = params or SamplingParams()
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        if params.min_tokens and not params.ignore_eos:
            # The workers mask stop_token_ids until min_tokens (workers.logits_adjust) but have
            # no tokenizer: the EOS ids join them here, which finishes a request the same way.
            eos = sorted(self.eos_token_ids - set(params.stop_token_ids))
            params = params.model_copy(update={"stop_token_ids": [*params.stop_token_ids, *eos]})
        outputs = list(resume_output_ids)
        if outputs:
            self._validate_resume(outputs, params)
        if self.scheduler.num_waiting >= self.config.scheduler.max_waiting:
            raise EngineOverloaded(
                f"{self.scheduler.num_waiting} requests waiting (max_waiting="
                f"{self.config.scheduler.max_waiting})"
            )
        req_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if req_id in self.scheduler.requests:
            raise InvalidRequest("request_id", f"{req_id!r} is already in flight")
        if params.structured is not None:  # replayed over `outputs`: a resume continues it
            self.grammars.start(req_id, params.structured, outputs)
        req = Request(req_id, token_ids, params, token_ids=token_ids + outputs)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        detok = IncrementalDetokenizer(
            self.tokenizer, token_ids, list(params.stop), params.skip_special_tokens
        )
        track = _Track(detok)
        for i, tok in enumerate(outputs, 1):  # replay: the text the client has, what is held back
            track.text += track.detok.add_tokens([tok], i >= params.min_tokens)[0]
        track.sent_tokens = len(outputs)
        self._tracks[req_id] = track
        if handoff:
            self._handoffs.add(req_id)
        self.scheduler.add(req)
        return req_id

    def _validate_resume(self, outputs: list[int], params: SamplingParams) -> None:
        if len(outputs) >= params.max_tokens:
            raise InvalidRequest(
                "resume_output_ids", f"{len(outputs)} tokens, max_tokens is {params.max_tokens}"
            )
        bad = next((t for t in outputs if not (0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise InvalidRequest("resume_output_ids", f"token id {bad} is outside the vocabulary")

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        self._tracks.pop(request_id, None)
        self.grammars.drop(request_id)
        self._handoffs.discard(request_id)
        self.kv_export.drop(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.seqs and not plan.finished_req_ids:
            return []
        if len(self.grammars):  # masks for the constrained rows only, from this step's state
            plan.token_masks = self.grammars.masks([s.req_id for s in plan.seqs if s.sample])
        export = self.kv_export
        if self._handoffs:  # a slot for each hand-off scheduled for the first time
            export.begin([s.req_id for s in plan.seqs if s.req_id in self._handoffs])
        export.before_execute()
        result = self.executor.execute(plan)
        now = time.monotonic()
        outputs = [self._process(req, now) for req in self.scheduler.update(plan, result)]
        export.after_step()  # the full blocks this step completed, toward their slots
        # The whole step, as a stream sees it between two tokens (sizes the auto prefill cap).
        self.scheduler.observe_step(plan, time.perf_counter() - start)
        return outputs

    def _process(self, req: Request, now: float) -> RequestOutput:
        track = self._tracks[req.req_id]
        if req.first_token_time is None:
            req.first_token_time = now
        p = req.params
        delta = ""
        reason: str | None = None
        # Usually one new token; several after accepted drafts. Stop conditions apply after
        # each, in order, and the tokens after a stop are dropped.
        first_new = req.prompt_len + track.sent_tokens
        for end in range(first_new + 1, req.num_tokens + 1):
            tok = req.token_ids[end - 1]
            n_out = end - req.prompt_len
            if not self.grammars.accept(req.req_id, tok):  # the mask allowed it: a bug
                reason, req.stop_reason = "error", "the sampled token does not match the grammar"
            elif tok in p.stop_token_ids:
                reason, req.stop_reason = "stop", tok
            elif tok in self.eos_token_ids and not p.ignore_eos:
                reason, req.stop_reason = "stop", tok
            else:
                # min_tokens: a stop string may end the output from its min_tokens-th token on.
                piece, matched = track.detok.add_tokens([tok], n_out >= p.min_tokens)
                delta += piece
                if matched is not None:
                    reason, req.stop_reason = "stop", matched
            if reason is None and (n_out >= p.max_tokens or end >= self.max_model_len):
                reason = "length"
            if reason is not None:
                del req.token_ids[end:]
                break
        kv = None
        if req.req_id in self._handoffs:
            self._handoffs.discard(req.req_id)
            if reason is None:  # the decode group takes over; text held back stays held back
                reason, kv = "handoff", self.kv_export.finish(req)
            else:  # it ended at its first token: nothing to hand off
                self.kv_export.drop(req.req_id)
        if reason is not None:
            if reason != "handoff" and not isinstance(req.stop_reason, str):
                delta += track.detok.flush()
            self.scheduler.finish(req, reason)
            del self._tracks[req.req_id]
            self.grammars.drop(req.req_id)
        track.text += delta
        new_ids = req.token_ids[req.prompt_len + track.sent_tokens :]
        track.sent_tokens = req.num_output_tokens
        return RequestOutput(
            request_id=req.req_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=req.output_token_ids,
            new_token_ids=new_ids,
            text=track.text,
            delta_text=delta,
            finished=reason is not None,
            finish_reason=reason,
            stop_reason=req.stop_reason,
            new_logprobs=req.logprobs[-len(new_ids) :] if p.logprobs is not None else [],
            logprobs=req.logprobs,
            num_cached_tokens=req.num_cached_tokens,
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            scheduled_time=req.scheduled_time,
            finished_time=now if reason is not None else None,
            num_preemptions=req.num_preemptions,
            kv=kv,
        )

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Offline batch generation; returns the final output of each prompt, in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest("params", f"{len(params)} params for {len(prompts)} prompts")
        # Validate everything first so a bad prompt leaves no request behind.
        tokenized = [self.tokenize(p) for p in prompts]
        for ids, sp in zip(tokenized, params, strict=True):
            self.validate(ids, sp)
        pending = list(zip(tokenized, params, strict=True))[::-1]
        order: list[str] = []
        mine: set[str] = set()
        final: dict[str, RequestOutput] = {}
        limit = self.config.scheduler.max_waiting
        while pending or len(final) < len(order):
            # Offline callers are never refused: keep the queue under its limit by stepping.
            while pending and self.scheduler.num_waiting < limit:
                order.append(self.add_request(*pending.pop()))
                mine.add(order[-1])
            for out in self.step():
                if out.finished and out.request_id in mine:
                    final[out.request_id] = out
        return [final[r] for r in order]

    # ---- introspection ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        proposer = self.scheduler.proposer
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            prefix_hit_rate=bm.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            spec_num_draft_tokens=proposer.num_draft_tokens if proposer else 0,
            spec_num_accepted_tokens=proposer.num_accepted_tokens if proposer else 0,
        )

    def block_audit(self) -> dict[str, int]:
        """BlockManager.audit against the requests in flight: leaked > 0 means a finished or
        aborted request still holds blocks. Exact only between steps (the engine's thread)."""
        return self.block_manager.audit(self.scheduler.requests.keys())

    # ---- KV export / import (the hand-off between prefill and decode groups) ---------------
    def export_kv(self, request_id: str) -> tuple[list[int], Any]:
        """The computed full blocks of a running request: (their token ids, block data)."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id!r} is not in flight")
        return self.kv_export.export_now(req)

    def import_kv(
        self,
        token_ids: Sequence[int],
        data: Any,
        layout: KVLayout | None = None,
        still_valid: Callable[[], bool] | None = None,
    ) -> int:
        """Write exported blocks (the whole model's, from an engine of any parallel layout)
        into this engine's prefix cache; a later request with these tokens as its prefix reuses
        them instead of recomputing. Returns tokens imported. Raises ValueError, changing
        nothing, when the sender's `layout` or the data's shape / dtype do not fit this one,
        or when `still_valid` (data read in place from shared memory) says after the copy
        that the memory was reused meanwhile."""
        bm = self.block_manager
        n_full = len(token_ids) // bm.block_size
        self.kv_layout.check(list(token_ids[: n_full * bm.block_size]), data, layout)
        if n_full == 0:
            return 0
        tmp = f"__import-{next(self._ids)}"
        if not bm.allocate(tmp, n_full * bm.block_size):
            raise EngineOverloaded(f"no free KV blocks to import {n_full} blocks")
        try:
            self.executor.import_blocks(bm.block_table(tmp), data)
            if still_valid is not None and not still_valid():
                raise ValueError("the KV's shared memory was reused while it was imported")
            bm.cache_blocks(tmp, token_ids, n_full * bm.block_size)
        finally:
            bm.free(tmp)
        return n_full * bm.block_size

    def cached_block_hashes(self) -> list[int]:
        return self.block_manager.cached_block_hashes()

    def shutdown(self) -> None:
        self.kv_export.close()
        self.executor.shutdown()
