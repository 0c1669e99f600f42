"""The typed messages of a benchmark run: what to send (`RequestSpec`) and what happened
(`RequestResult`). Workloads produce specs, clients turn one spec into one result, the metric
code reads only results.

Times in a result are seconds from the moment the client sent the request (`time.perf_counter`
based), so they are independent of when in the run the request went out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload. Exactly one of `prompt_ids`, `prompt_text`, `messages`."""

    index: int
    max_tokens: int
    # Prompt length in tokens as generated (the server's own count arrives in usage).
    input_len: int
    prompt_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    # Same session -> same replica group on Flotilla (gRPC session_id / x-session-id header).
    session_id: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class RequestResult:
    """What the client observed for one request.

    `chunk_times[i]` is when the i-th streamed chunk carrying output arrived and
    `chunk_tokens[i]` how many token ids it carried (None when the API does not say: OpenAI
    SSE chunks carry text, not ids -- one chunk then counts as one ITL sample).
    """

    index: int
    start: float = 0.0  # seconds since the run started, when the request was sent
    ok: bool = False
    error_code: str | None = None  # gRPC status name, "HTTP 400", "TIMEOUT", ...
    error_message: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] | None = field(default_factory=list)
    # Output tokens: counted from streamed ids (gRPC) or taken from usage (OpenAI).
    output_tokens: int = 0
    streamed_tokens: int | None = None  # ids counted in the stream (None: not countable)
    tokens_source: str = "ids"  # where output_tokens came from: "ids", "usage" or "chunks"
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    finish_reason: str | None = None
    input_len: int = 0  # what the workload generated

    @property
    def prompt_tokens(self) -> int:
        """The server's prompt token count when it reported one, else the generated length."""
        return self.usage_prompt_tokens if self.usage_prompt_tokens is not None else self.input_len

    @property
    def usage_mismatch(self) -> bool:
        """The stream contradicts the server's usage: a different number of streamed ids, or
        (OpenAI SSE, one or more tokens per chunk) more output chunks than tokens."""
        if not self.ok or self.usage_completion_tokens is None:
            return False
        if self.streamed_tokens is not None:
            return self.streamed_tokens != self.usage_completion_tokens
        return len(self.chunk_times) > self.usage_completion_tokens

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestResult:
        return cls(**data)
