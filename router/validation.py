"""Untrusted request fields -> (prompt, SamplingParams, options), or InvalidRequest naming the
field and the limit.

Both APIs end here: the OpenAI request bodies (pydantic models below; unknown fields are
ignored, typos of known ones refused: router.unknown_fields) and the gRPC GenerateRequest (router.grpc_api converts it to the same dict first). Limits that
need the model (context length, vocabulary) are checked in `check_limits` once the prompt is
tokenized; the replica group checks them again, authoritatively, before queueing anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router import structured, tools, unknown_fields
from router.text_check import check_text
from router.tools import NO_TOOLS, ToolPlan
from workers.errors import InvalidRequest
from workers.sampling_params import MAX_LOGPROBS, SamplingParams, invalid_from_pydantic

# Fields both OpenAI endpoints and gRPC pass straight to SamplingParams when set.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
)


MAX_BATCH_PROMPTS = 32  # prompts in one /v1/completions request (each then has n choices)


@dataclass(frozen=True)
class Limits:
    """What the served model allows (from the replica group's info())."""

    max_model_len: int
    vocab_size: int
    max_n: int = 8
    max_prompt_chars: int = 1_000_000
    max_messages: int = 1024
    max_stop_strings: int = 16
    max_stop_chars: int = 1024


@dataclass
class Options:
    """Per-request options that are not sampling parameters."""

    n: int = 1
    stream: bool = False
    include_usage: bool = False
    default_max_tokens: bool = False  # max_tokens was not given: fill the context
    tools: ToolPlan = NO_TOOLS  # chat: what the request's tools mean (router.tools)
    echo: list[str] | None = None  # completions with echo: each prompt's text, by prompt


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown: ignored, see router.unknown_fields
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown: ignored, see router.unknown_fields

    model: str | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None  # accepted, unused
    logit_bias: dict[str, float] | None = None  # token id (a JSON key: a string) -> bias
    # Extensions (vLLM's names).
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    # Output constraints (router.structured): OpenAI's, then vLLM's names.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_grammar: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest("messages.content", "only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # router.template_kwargs
    tools: list[Any] | None = None  # router.tools
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None  # the legacy names of tools / tool_choice
    function_call: str | dict[str, Any] | None = None

    def tools_and_choice(self) -> tuple[list[Any] | None, str | dict[str, Any] | None]:
        """`tools` / `tool_choice`, or the legacy `functions` / `function_call` as those."""
        if self.functions and self.tools:
            raise InvalidRequest("functions", "give tools or functions, not both")
        if not self.functions:
            return self.tools, self.tool_choice
        tools = [{"type": "function", "function": f} for f in self.functions]
        choice = self.function_call
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
        return tools, choice


def parse_body(body: bytes, model: type[BaseModel], reject_unknown: bool = False) -> Any:
    """JSON bytes -> a request model; malformed JSON, a bad field or an unknown one that looks
    like a typo (any unknown one with `reject_unknown`) -> InvalidRequest."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest("body", f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body", "expected a JSON object")
    check_text(data)
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise invalid_from_pydantic(e) from None
    unknown_fields.check(req, reject_unknown)
    return req


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _common_params(req: _Common, max_n: int) -> tuple[dict[str, Any], Options]:
    if req.n > max_n:
        raise InvalidRequest("n", f"{req.n}; the limit is {max_n}")
    params: dict[str, Any] = {
        k: getattr(req, k) for k in _SAMPLING_FIELDS if getattr(req, k) is not None
    }
    params["stop"] = _stop_list(req.stop)
    if req.logit_bias:
        params["logit_bias"] = _bias_by_id(req.logit_bias)
    extra = {
        "structured_outputs": req.structured_outputs,
        "guided_json": req.guided_json,
        "guided_regex": req.guided_regex,
        "guided_grammar": req.guided_grammar,
    }
    spec = structured.from_request(req.response_format, extra)
    if spec is not None:
        params["structured"] = spec.model_dump()
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options", "only allowed when stream is true")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return params, Options(n=req.n, stream=req.stream, include_usage=include_usage)


def _bias_by_id(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as JSON strings ("50256")."""
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise InvalidRequest("logit_bias", f"key {key!r} is not a token id")
        out[int(key)] = value
    return out


def completion_params(req: CompletionRequest, limits: Limits) -> tuple[dict[str, Any], Options]:
    params, opts = _common_params(req, limits.max_n)
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequest("best_of", "only best_of == n is supported")
    if req.max_tokens is None:
        opts.default_max_tokens = True
    else:
        params["max_tokens"] = req.max_tokens
    if req.echo and req.logprobs is not None:
        # Echoed text would need the prompt's logprobs, which the engine does not compute.
        raise InvalidRequest("echo", "echo with logprobs is not supported (no prompt logprobs)")
    if req.logprobs is not None:
        params["logprobs"] = req.logprobs
    return params, opts


def chat_params(
    req: ChatCompletionRequest, limits: Limits, template_has_tools: bool = False
) -> tuple[dict[str, Any], Options]:
    params, opts = _common_params(req, limits.max_n)
    field = "functions" if req.functions else "tools"
    opts.tools = tools.plan(*req.tools_and_choice(), template_has_tools, field)
    if opts.tools.forced is not None:
        if "structured" in params:
            raise InvalidRequest(
                "tool_choice", "a forced tool call cannot also have an output format"
            )
        params["structured"] = opts.tools.forced.model_dump()
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    if max_tokens is None:
        opts.default_max_tokens = True
    else:
        params["max_tokens"] = max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs", "requires logprobs to be true")
    if req.logprobs:
        params["logprobs"] = req.top_logprobs or 0
    return params, opts


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: one (text or token ids), or a batch (a list of either): each
    gets its n choices, at indices prompt * n + choice."""
    p = req.prompt
    if not (isinstance(p, list) and p and isinstance(p[0], (str, list))):
        return [p]
    if len(p) > MAX_BATCH_PROMPTS:
        raise InvalidRequest("prompt", f"{len(p)} prompts; the limit is {MAX_BATCH_PROMPTS}")
    return list(p)


def finalize(
    params: dict[str, Any], opts: Options, num_prompt_tokens: int, limits: Limits
) -> SamplingParams:
    """Fill the default max_tokens, build SamplingParams, check the model's limits."""
    params = dict(params)
    if opts.default_max_tokens:
        params["max_tokens"] = max(1, limits.max_model_len - num_prompt_tokens)
    sp = SamplingParams.from_dict(params)
    check_limits(num_prompt_tokens, sp, limits)
    return sp


def check_limits(num_prompt_tokens: int, params: SamplingParams, limits: Limits) -> None:
    check_stop(params.stop, limits)
    check_token_ids(list(params.logit_bias), limits, "logit_bias")
    n, cap = num_prompt_tokens, limits.max_model_len
    if n == 0:
        raise InvalidRequest("prompt", "must not be empty")
    if n >= cap:
        raise InvalidRequest("prompt", f"{n} tokens; the limit is max_model_len - 1 = {cap - 1}")
    if n + params.max_tokens > cap:
        raise InvalidRequest(
            "max_tokens",
            f"{params.max_tokens} + {n} prompt tokens exceeds max_model_len={cap} "
            f"(at most {cap - n})",
        )


def check_stop(stop: Sequence[str], limits: Limits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest("stop", f"{len(stop)} strings; the limit is {limits.max_stop_strings}")
    longest = max((len(x) for x in stop), default=0)
    if longest > limits.max_stop_chars:
        raise InvalidRequest(
            "stop", f"a stop string of {longest} characters; the limit is {limits.max_stop_chars}"
        )


def check_messages(count: int, limits: Limits) -> None:
    if count == 0:
        raise InvalidRequest("messages", "must not be empty")
    if count > limits.max_messages:
        raise InvalidRequest("messages", f"{count} messages; the limit is {limits.max_messages}")


def check_token_ids(token_ids: list[int], limits: Limits, field: str = "prompt") -> None:
    bad = next((t for t in token_ids if not (0 <= t < limits.vocab_size)), None)
    if bad is not None:
        raise InvalidRequest(
            field, f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})"
        )


def check_prompt_text(prompt: str, limits: Limits) -> None:
    if not prompt:
        raise InvalidRequest("prompt", "must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            "prompt", f"{len(prompt)} characters; the limit is {limits.max_prompt_chars}"
        )


def seeded(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice `index` of n: distinct seeds so seeded choices differ."""
    if index == 0 or params.seed is None:
        return params
    return params.model_copy(update={"seed": (params.seed + index) % 2**63})
