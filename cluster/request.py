"""Per-request state kept by the scheduler.

There is no "prefill phase": a request has `token_ids` (prompt + outputs so far) and
`num_computed_tokens` (how many of them have KV in the cache). Each step computes some of the
difference; when it catches up, that step samples the next token. This one rule covers
chunked prefill, prefix-cache hits and recompute after preemption.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from workers.messages import TokenLogprobs
from workers.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token that ended it
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (first schedule)
    sent_to_workers: bool = False
    scheduled_time: float | None = None  # first admitted by the scheduler (ends queue time)
    first_token_time: float | None = None
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # Speculative decoding (cluster/spec_decode.py): drafts verified, accepted, switched off.
    spec_drafted: int = 0
    spec_accepted: int = 0
    spec_off: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
