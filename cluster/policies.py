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
  `min_prefill_tokens` so prefill always progresses.

Both are pure functions of the queue, the clock and the step-time model; no tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Protocol

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
class PrefillCap(Protocol):
    def limit(self, num_decodes: int) -> int | None:
        """Most prefill tokens for a step that also runs `num_decodes` (> 0) decodes; None:
        no cap beyond the step's token budget."""
        ...


class NoCap:
    def limit(self, num_decodes: int) -> int | None:
        return None


class FixedCap:
    def __init__(self, tokens: int):
        self.tokens = tokens

    def limit(self, num_decodes: int) -> int | None:
        return self.tokens


class AutoCap:
    """Sized from the step-time model; uncapped until the model has seen enough steps."""

    def __init__(self, model: StepTimeModel, target_s: float, min_tokens: int):
        self.model = model
        self.target_s = target_s
        self.min_tokens = min_tokens

    def limit(self, num_decodes: int) -> int | None:
        fit = self.model.max_prefill(num_decodes, self.target_s)
        return None if fit is None else max(self.min_tokens, fit)


def make_admission(config: SchedulerConfig) -> AdmissionPolicy:
    if config.policy == "sjf_aging":
        return SJFAging(config.sjf_window, config.max_wait_s)
    return FCFS()


def make_prefill_cap(config: SchedulerConfig, model: StepTimeModel) -> PrefillCap:
    cap = config.max_prefill_tokens_when_decoding
    if cap is None or not config.enable_chunked_prefill:
        return NoCap()
    if cap == "auto":
        return AutoCap(model, config.target_step_ms / 1000.0, config.min_prefill_tokens)
    return FixedCap(cap)
