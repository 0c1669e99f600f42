"""Per-request sampling parameters, validated once at the front door.

Pure Python (no torch) so the router can validate requests without loading a model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.errors import InvalidRequest
from workers.structured_output import StructuredOutput

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries; OpenAI's limits, as are the values' bounds
LOGIT_BIAS_BOUND = 100.0


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_k: int = Field(-1, ge=-1, description="Keep the k most likely tokens; -1 or 0 keeps all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass to keep, in (0, 1].")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p * p(max).")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Per-request RNG seed.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: list[str] = Field(
        default_factory=list, max_length=16, description="Stop strings (not emitted)."
    )
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    min_tokens: int = Field(
        0,
        ge=0,
        description="Tokens generated before an EOS or stop token id may be sampled (they are "
        "masked until then) and before a stop string may match.",
    )
    skip_special_tokens: bool = Field(
        True, description="Leave special tokens (e.g. <|im_end|>) out of the output text."
    )
    logit_bias: dict[int, float] = Field(
        default_factory=dict,
        description="Token id -> value added to its logit before sampling, in [-100, 100].",
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Top-n logprobs per token."
    )
    structured: StructuredOutput | None = Field(
        None, description="A grammar the output must match (the engine masks the sampler)."
    )

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_bounds(cls, v: dict[int, float]) -> dict[int, float]:
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(v)} entries; the limit is {MAX_LOGIT_BIAS}")
        for token, bias in v.items():
            if token < 0:
                raise ValueError(f"token id {token} is negative")
            if not -LOGIT_BIAS_BOUND <= bias <= LOGIT_BIAS_BOUND:  # NaN fails this too
                raise ValueError(f"token {token}: bias {bias} is outside [-100, 100]")
        return v

    @model_validator(mode="after")
    def _min_tokens_fit(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise InvalidRequest(
                "min_tokens", f"{self.min_tokens} is more than max_tokens={self.max_tokens}"
            )
        if self.min_tokens and self.structured is not None:
            # The grammar may have to end the output before min_tokens: no token would be allowed.
            raise InvalidRequest("min_tokens", "cannot be combined with structured output")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def adjusts_logits(self) -> bool:
        """The sampler changes this request's logits (workers.logits_adjust)."""
        return bool(self.logit_bias) or self.min_tokens > 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from untrusted input; any problem becomes an InvalidRequest naming the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise invalid_from_pydantic(e) from None


def invalid_from_pydantic(e: ValidationError) -> InvalidRequest:
    err = e.errors()[0]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, InvalidRequest):  # a cross-field check that names its own field
        return cause
    field = ".".join(str(p) for p in err["loc"]) or "request"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return InvalidRequest(field, msg)
