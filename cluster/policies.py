"""The scheduler's two choices, as small objects picked from SchedulerConfig:

* an admission policy -- in which order waiting requests are offered the step's budget:
    fcfs       arrival order (preempted requests, put back at the front, come first).
    sjf_aging  preempted requests first; then any request that has waited `max_wait_s` or
               longer, oldest first; then the rest of the first `sjf_window` waiting requests,
               shortest first by an aged length: tokens * (1 - waited / max_wait_s). A long
               prompt's key falls to 0 as it waits, so it overtakes ever more short ones and is
               overdue (first) after `max_wait_s` at most. Requests past the window follow in
               arrival order.
* a prefill cap -- how many prefill tokens a step may carry while decodes run (stall-free
  batching, as in Sarathi-Serve): none, a fixed number, or "auto": as many as the step-time
  model predicts fit under `target_step_ms` next to this step's decodes, never fewer than
  `min_prefill_tokens` so prefill always progresses. With `ttft_target_ms` set, "auto" also
  looks at the prompts waiting for their first token (in the order they will be served): when
  steps under `target_step_ms` would finish one of them after its deadline (arrival +
  ttft_target_ms), the step takes what fits under `max_step_ms` instead. So the
  stream-protecting cap holds while the queue is short, and gives way -- bounded -- under
  queue pressure, when small chunks would only add steps to everyone's time to first token.
  A prompt already too late for any step to save (a 1,024-token prompt is ~4 s of compute on
  2 cores) loosens it too unless `hurry_late_prompts` is off: those steps stall every stream
  and save no deadline, but give fewer, larger steps (throughput) and the late prompt its
  first token sooner (benchmarks/RESULTS.md, long-prompt mix).
  It goes straight to the ceiling rather than to the smallest chunk that would just meet the
  deadlines: every step over the target is a stall for every stream, and a few large ones
  leave most of a stream's gaps under the target (its p99 ITL), where a run of slightly long
  ones would not; fewer steps also spend less on per-step overhead. Measured: goodput with
  p99 ITL <= 200 ms at 0.4 req/s, 50% -> 66% (benchmarks/RESULTS.md).

Both are pure functions of the queue, the clock and the step-time model; no tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import islice
from typing import NamedTuple, Protocol

from cluster.config import SchedulerConfig
from cluster.request import Request
from cluster.step_model import StepTimeModel


# ---- admission ---------------------------------------------------------------------------------
class AdmissionPolicy(Protocol):
    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Waiting requests in the order they are offered the budget (admission stops at the
        first one that does not fit)."""
        ...


class FCFS:
    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return list(waiting)


class SJFAging:
    def __init__(self, window: int, max_wait_s: float):
        self.window = window
        self.max_wait_s = max_wait_s

    def _key(self, req: Request, now: float) -> tuple[int, float]:
        if req.num_preemptions:
            return (0, 0.0)  # back from preemption: first, in queue order (the sort is stable)
        waited = now - req.arrival_time
        if waited >= self.max_wait_s:
            return (1, req.arrival_time)
        return (2, req.num_tokens * (1.0 - waited / self.max_wait_s))

    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        head = sorted(islice(waiting, self.window), key=lambda r: self._key(r, now))
        return head + list(islice(waiting, self.window, None))


# ---- prefill cap while decoding ------------------------------------------------------------------
class Pending(NamedTuple):
    """A prompt that has not produced its first token yet, as the prefill cap sees it."""

    tokens: int  # prompt tokens still to compute
    arrival: float  # Request.arrival_time: its first token is due ttft_target_ms after it


class PrefillCap(Protocol):
    def limit(self, num_decodes: int, pending: Sequence[Pending], now: float) -> int | None:
        """Most prefill tokens for a step that also runs `num_decodes` (> 0) decodes, given the
        prompts waiting for a first token in service order; None: no cap beyond the step's
        token budget."""
        ...


class NoCap:
    def limit(self, num_decodes: int, pending: Sequence[Pending], now: float) -> int | None:
        return None


class FixedCap:
    def __init__(self, tokens: int):
        self.tokens = tokens

    def limit(self, num_decodes: int, pending: Sequence[Pending], now: float) -> int | None:
        return self.tokens


class AutoCap:
    """Sized from the step-time model; uncapped until the model has seen enough steps. With
    `ttft_s`, raised to what fits in `max_step_s` while a prompt would miss its deadline."""

    HORIZON = 16  # pending prompts looked at: a longer queue is already behind at the ceiling

    def __init__(
        self,
        model: StepTimeModel,
        target_s: float,
        min_tokens: int,
        ttft_s: float | None = None,
        max_step_s: float | None = None,
        hurry_late: bool = True,
    ):
        self.model = model
        self.target_s = target_s
        self.min_tokens = min_tokens
        self.ttft_s = ttft_s
        self.max_step_s = max(target_s, max_step_s or target_s)
        self.hurry_late = hurry_late

    def limit(self, num_decodes: int, pending: Sequence[Pending], now: float) -> int | None:
        fit = self.model.max_prefill(num_decodes, self.target_s)
        if fit is None:
            return None
        cap = max(self.min_tokens, fit)
        if self.ttft_s is None or not pending:
            return cap
        ceiling = self.model.max_prefill(num_decodes, self.max_step_s)
        if ceiling is None:
            return None  # prefill looks free
        loosen = self._loosens(num_decodes, pending, now, cap, ceiling)
        return max(cap, ceiling) if loosen else cap

    def _loosens(
        self, num_decodes: int, pending: Sequence[Pending], now: float, cap: int, ceiling: int
    ) -> bool:
        """Whether some pending prompt finishes after its deadline in steps of `cap` prefill
        tokens, and (unless hurry_late) before it in steps of `ceiling`. The first `total`
        pending tokens take n = ceil(total / chunk) steps of overhead A = a + b*d each, plus
        total*c of prefill work, so a deadline allows at most n = floor((slack - total*c) / A)
        steps, and needs chunks of ceil(total / n)."""
        a, b, c = self.model.coefficients()  # known: max_prefill answered
        overhead = max(a + b * num_decodes, 1e-6)
        total = 0
        for tokens, arrival in islice(pending, self.HORIZON):
            total += tokens
            steps = math.floor((arrival + self.ttft_s - now - total * c) / overhead)
            if steps < 1 or -(-total // steps) > ceiling:  # too late for any step
                if self.hurry_late:
                    return True
            elif -(-total // steps) > cap:
                return True
        return False


def make_admission(config: SchedulerConfig) -> AdmissionPolicy:
    if config.policy == "sjf_aging":
        return SJFAging(config.sjf_window, config.max_wait_s)
    return FCFS()


def make_prefill_cap(config: SchedulerConfig, model: StepTimeModel) -> PrefillCap:
    cap = config.max_prefill_tokens_when_decoding
    if cap is None or not config.enable_chunked_prefill:
        return NoCap()
    if cap == "auto":
        ttft = config.ttft_target_ms
        return AutoCap(
            model,
            config.target_step_ms / 1000.0,
            config.min_prefill_tokens,
            None if ttft is None else ttft / 1000.0,
            config.max_step_ms / 1000.0,
            config.hurry_late_prompts,
        )
    return FixedCap(cap)
