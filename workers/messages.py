"""Typed messages between a replica group's scheduler and its worker ranks.

Small by design: ids, the tokens to feed this step, and block tables. A request's prompt and
sampling parameters travel once (in `new_requests`); each worker keeps its own per-request state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from workers.sampling_params import SamplingParams


@dataclass
class NewRequest:
    req_id: str
    prompt_token_ids: list[int]  # sent once: penalties need the prompt
    params: SamplingParams
    # Output tokens it already had when it came here (a request resumed after a prefill
    # hand-off or a migration): a seeded sampler skips that many draws, so it continues
    # exactly where the other group stopped.
    num_output_tokens: int = 0


@dataclass
class SeqPlan:
    req_id: str
    token_ids: list[int]  # the tokens to compute this step (positions start_pos ..)
    start_pos: int  # tokens already in the KV cache for this request
    block_table: list[int]
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    # Speculative decoding: the last num_draft of token_ids are draft tokens, not yet known to
    # be the request's; the worker samples at each of the last num_draft + 1 positions, keeps
    # the drafts that match and returns them plus one token of its own (workers/spec_decode.py).
    # With a draft model the drafts arrive as DRAFT_SLOT (-1) and the worker's draft model
    # chooses them first (workers/draft_model.py).
    num_draft: int = 0

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start_pos > 0


@dataclass
class TokenMasks:
    """Allowed next tokens of the grammar-constrained requests sampling this step (the engine's
    cluster.grammar builds them): row i of `words` (int32, one bit per token id, as
    workers.token_mask reads it) belongs to `req_ids[i]`."""

    req_ids: list[str]
    words: np.ndarray  # [len(req_ids), ceil(vocab / 32)] int32


@dataclass
class StepPlan:
    step_id: int
    seqs: list[SeqPlan]
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    token_masks: TokenMasks | None = None


@dataclass
class TokenLogprobs:
    token_logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class StepResult:
    step_id: int
    req_ids: list[str]  # the requests that sampled this step, in plan order
    token_ids: list[int]  # each request's first new token
    logprobs: list[TokenLogprobs | None] | None = None
    # Speculative decoding: the tokens each request got after token_ids[i] (accepted drafts,
    # then the worker's own), aligned with req_ids; None when no request speculated.
    more_token_ids: list[list[int]] | None = None

    def new_tokens(self, i: int) -> list[int]:
        """Every token the i-th request got this step, in order."""
        more = self.more_token_ids[i] if self.more_token_ids is not None else []
        return [self.token_ids[i], *more]
