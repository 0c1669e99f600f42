"""Speculative decoding, scheduler side: n-gram prompt lookup, the draft model's slots, and
the per-request switch-off.

Lifecycle of one speculating request (every step it decodes):

    propose  -- ngram: the latest earlier occurrence of its last n tokens (n from
                prompt_lookup_max down to prompt_lookup_min) gives up to num_tokens draft
                tokens d1..dk. draft_model: k = num_tokens slots of DRAFT_SLOT, which the
                worker fills with its draft model's tokens before verifying
                (workers/draft_model.py): the scheduler only sizes and places the drafts
    schedule -- its SeqPlan feeds [last, d1..dk] (num_draft=k); the drafts take KV slots and
                budget only if both are free (drafts never preempt or starve anyone)
    verify   -- the worker samples the target at all k+1 positions (workers/spec_decode.py)
                and returns d1..da (the accepted prefix) plus one token of its own
    update   -- the tokens are appended, computed = start + 1 + a, and blocks past what the
                request now needs are given back (the rejected drafts' slots)
    record   -- once it has had probe_tokens drafts with acceptance under min_acceptance, it
                stops proposing for good: text that does not repeat costs at most the probe.
                A draft model is also probed engine-wide: every probe_tokens drafts of all
                requests together under min_acceptance switch drafting off for everyone for
                reprobe_after_s, so a draft that does not fit the target costs one probe per
                period rather than one per request

Requests whose sampling reads more than the sampled token (logprobs, penalties over the
history) do not speculate: the verify step would need those per accepted position.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.config import SpeculativeConfig
from cluster.request import Request
from workers.sampling_params import SamplingParams


def can_speculate(params: SamplingParams) -> bool:
    """The one place that says which requests may speculate: drafts are verified on the raw
    logits (workers/spec_decode.py), so not requests whose sampling reads more than them --
    logprobs, penalties (the token history), a grammar's mask, a logit bias or min_tokens."""
    return (
        params.logprobs is None
        and not params.needs_penalties
        and params.structured is None
        and not params.adjusts_logits
    )


def ngram_lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to `k` tokens that followed an earlier occurrence of the last n tokens of `tokens`,
    for the longest n in [min_n, max_n] that has one: the latest occurrence with k tokens
    after it, else the latest one (its continuation runs into the end)."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        pattern = tokens[size - n :]
        first = pattern[0]
        partial: list[int] = []
        # Latest start first: in an edit / repeat, the nearest copy is the likeliest source.
        # Starts run to size - n - 1, so every match has a continuation.
        for i in range(size - n - 1, -1, -1):
            if tokens[i] == first and tokens[i : i + n] == pattern:
                if i + n + k <= size:
                    return tokens[i + n : i + n + k]
                partial = partial or tokens[i + n : size]
        if partial:
            return partial
    return []


DRAFT_SLOT = -1
"""A draft token the worker's draft model chooses (never a token id: an unfilled one fails
loudly in the embedding)."""


class Proposer:
    """Drafts per step (n-gram tokens, or the draft model's slots) and the acceptance
    bookkeeping, for either method."""

    def __init__(self, config: SpeculativeConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.num_draft_tokens = 0  # engine totals, for the acceptance rate
        self.num_accepted_tokens = 0
        self._window = [0, 0]  # draft_model: (drafted, accepted) of the engine-wide probe
        self.off_until = 0.0  # draft_model: no drafts before this clock reading

    def propose(self, req: Request, max_new: int) -> list[int]:
        """Draft tokens for `req`'s next step, at most `max_new` (what its max_tokens leaves
        after the token the step samples anyway)."""
        c = self.config
        if req.spec_off or max_new <= 0 or not can_speculate(req.params):
            return []
        if c.method == "draft_model":
            if self.clock() < self.off_until:
                return []
            return [DRAFT_SLOT] * min(c.num_tokens, max_new)
        return ngram_lookup(
            req.token_ids, c.prompt_lookup_min, c.prompt_lookup_max, min(c.num_tokens, max_new)
        )

    def record(self, req: Request, drafted: int, accepted: int) -> None:
        c = self.config
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        req.spec_drafted += drafted
        req.spec_accepted += accepted
        if req.spec_drafted >= c.probe_tokens and (
            req.spec_accepted < c.min_acceptance * req.spec_drafted
        ):
            req.spec_off = True
        if c.method == "draft_model" and drafted:
            w = self._window
            w[0] += drafted
            w[1] += accepted
            if w[0] >= c.probe_tokens:  # one window of the engine-wide probe is complete
                if w[1] < c.min_acceptance * w[0]:
                    self.off_until = self.clock() + c.reprobe_after_s
                w[0] = w[1] = 0
