"""gRPC front end: flotilla.v1 messages <-> Router calls (the Serve ingress methods delegate here).

Errors are set on the call's context (code + "field: problem" details) -- never raised raw,
which Serve would turn into INTERNAL with a traceback. A streaming method cannot return a
status after the fact, so `GenerateStream` sets the code and then raises `GrpcAbort`; Serve
keeps the code and details the context carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from router import request_ids, structured
from router.choices import choice_id
from router.core import Chunk, Router
from router.errors import ModelNotFound, api_error
from router.proto import flotilla_pb2 as pb
from router.validation import check_limits, check_messages, check_token_ids, seeded
from workers.errors import InvalidRequest
from workers.sampling_params import SamplingParams

# Optional proto fields -> SamplingParams fields (same names).
_OPTIONAL = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "logprobs",
    "min_tokens",
    "skip_special_tokens",
)
_FINISH_CODES = {
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}


class GrpcAbort(Exception):
    """Raised after setting an error status on the gRPC context of a streaming call."""


def _params_dict(p: pb.SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(p, name) for name in _OPTIONAL if p.HasField(name)}
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if name in out:  # float32 on the wire: 0.7 -> 0.699999988; keep what the client typed
            out[name] = float(f"{out[name]:.6g}")
    out["stop"] = list(p.stop)
    out["stop_token_ids"] = list(p.stop_token_ids)
    if p.logit_bias:  # float32 on the wire, as above
        out["logit_bias"] = {k: float(f"{v:.6g}") for k, v in p.logit_bias.items()}
    kind = p.WhichOneof("structured")
    if kind is not None:  # the same checks as the HTTP API's vLLM-style fields
        key = {"json_schema": "json", "json_object": "json_object"}.get(kind, kind)
        spec = structured.one(key, getattr(p, kind), f"params.{kind}")
        if spec is not None:
            out["structured"] = spec.model_dump()
    return out


def authenticate(router: Router, context: Any) -> None:
    """The API key from the `authorization` metadata (router.auth)."""
    if not router.keys.enabled:
        return
    meta = dict(context.invocation_metadata()) if context is not None else {}
    router.keys.check(meta.get("authorization"))


def choices(router: Router, req: pb.GenerateRequest) -> int:
    """SamplingParams.n: how many choices (not a sampling parameter of each)."""
    n = req.params.n if req.params.HasField("n") else 1
    limit = router.prompt_limits().max_n
    if not 1 <= n <= limit:
        raise InvalidRequest("n", f"{n}; must be in [1, {limit}]")
    return n


def prepare(router: Router, req: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
    """Validate a GenerateRequest -> (prompt token ids, SamplingParams)."""
    if req.model and req.model != router.model:
        raise ModelNotFound(req.model, router.model)
    limits = router.prompt_limits()
    kind = req.WhichOneof("input")
    if kind == "prompt":
        token_ids = router.tokenize(req.prompt)
    elif kind == "prompt_token_ids":
        token_ids = list(req.prompt_token_ids.ids)
        if not token_ids:
            raise InvalidRequest("prompt_token_ids", "must not be empty")
        check_token_ids(token_ids, limits, "prompt_token_ids")
    elif kind == "messages":
        check_messages(len(req.messages.messages), limits)
        assert router.tokenizer is not None
        token_ids = router.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in req.messages.messages]
        )
    else:
        raise InvalidRequest("input", "set one of prompt, prompt_token_ids or messages")
    params = SamplingParams.from_dict(_params_dict(req.params))
    check_limits(len(token_ids), params, limits)
    return token_ids, params


def _logprobs(router: Router, chunk: Chunk) -> list[pb.TokenLogprob]:
    if not chunk.logprobs:
        return []
    tok = router.tokenizer
    assert tok is not None
    out = []
    for token_id, lp in zip(chunk.ids, chunk.logprobs, strict=False):
        if lp is None:
            continue
        logprob, top_ids, top_lps = lp
        out.append(
            pb.TokenLogprob(
                token_id=token_id,
                logprob=logprob,
                token=tok.token_text(token_id),
                top=[
                    pb.TopLogprob(token_id=i, logprob=v, token=tok.token_text(i))
                    for i, v in zip(top_ids, top_lps, strict=False)
                ],
            )
        )
    return out


def finish_code(c: Chunk) -> int:
    """The FinishReason enum of a chunk (UNSPECIFIED while the request runs)."""
    if c.finish == "stop":
        stop_string = isinstance(c.stop_reason, str)
        return pb.FINISH_REASON_STOP_STRING if stop_string else pb.FINISH_REASON_STOP_TOKEN
    return _FINISH_CODES.get(c.finish or "", pb.FINISH_REASON_UNSPECIFIED)


def _total_usage(chunks: list[Chunk]) -> dict[str, int] | None:
    """The choices' usage summed: their one prompt counted once."""
    if any(c.usage is None for c in chunks):
        return None
    first = chunks[0].usage
    assert first is not None
    done = sum(c.usage["completion_tokens"] for c in chunks if c.usage)
    return first | {"completion_tokens": done}


def _usage(u: dict[str, int] | None) -> pb.Usage | None:
    if u is None:
        return None
    return pb.Usage(
        prompt_tokens=u["prompt_tokens"],
        completion_tokens=u["completion_tokens"],
        total_tokens=u["prompt_tokens"] + u["completion_tokens"],
        cached_tokens=u.get("cached_tokens", 0),
    )


def _session(router: Router, req: pb.GenerateRequest, context: Any) -> str | None:
    if req.session_id:
        return req.session_id
    if context is not None:
        for key, value in context.invocation_metadata():
            if key == router.config.session_header.lower():
                return value
    return None


def _fail(context: Any, exc: BaseException, request_id: str) -> None:
    err = api_error(exc, request_id)
    context.set_code(err.grpc_code)
    context.set_details(err.grpc_details)


async def generate(router: Router, req: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
    request_id = request_ids.new()
    try:
        authenticate(router, context)
        if req.request_id:
            request_id = request_ids.check(req.request_id, "request_id")
        token_ids, params = prepare(router, req)
        n, session = choices(router, req), _session(router, req, context)
        tasks = [
            asyncio.ensure_future(
                router.complete(
                    token_ids,
                    seeded(params, i),
                    session,
                    choice_id(request_id, i, n),
                    i,
                    request_id,
                )
            )
            for i in range(n)
        ]
        try:
            chunks = list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:  # one choice failed: stop the others (frees their KV blocks)
                t.cancel()
    except Exception as e:
        _fail(context, e, request_id)
        return pb.GenerateResponse()
    out = [
        pb.Choice(
            index=i,
            text=c.text,
            token_ids=c.ids,
            logprobs=_logprobs(router, c),
            finish_reason=c.finish or "",
            finish_reason_code=finish_code(c),
        )
        for i, c in enumerate(chunks)
    ]
    first = out[0]
    return pb.GenerateResponse(
        request_id=request_id,
        model=router.model,
        text=first.text,
        token_ids=first.token_ids,
        logprobs=first.logprobs,
        finish_reason=first.finish_reason,
        usage=_usage(_total_usage(chunks)),
        finish_reason_code=first.finish_reason_code,
        choices=out,
    )


async def generate_stream(
    router: Router, req: pb.GenerateRequest, context: Any
) -> AsyncIterator[pb.GenerateStreamResponse]:
    request_id = request_ids.new()
    try:
        authenticate(router, context)
        if req.request_id:
            request_id = request_ids.check(req.request_id, "request_id")
        token_ids, params = prepare(router, req)
        n, session = choices(router, req), _session(router, req, context)
        per_choice = [seeded(params, i) for i in range(n)]
        async for c in router.stream_n([token_ids] * n, per_choice, session, request_id):
            yield pb.GenerateStreamResponse(
                request_id=request_id,
                text=c.text,
                token_ids=c.ids,
                logprobs=_logprobs(router, c),
                finish_reason=c.finish or "",
                usage=_usage(c.usage),
                finish_reason_code=finish_code(c),
                index=c.index,
            )
    except Exception as e:
        _fail(context, e, request_id)
        raise GrpcAbort(context.details()) from None


def abort(router: Router, req: pb.AbortRequest, context: Any = None) -> pb.AbortResponse:
    """Stop the running requests of that id here (Router.abort)."""
    try:
        authenticate(router, context)
        request_ids.check(req.request_id, "request_id")
    except Exception as e:
        _fail(context, e, "")
        return pb.AbortResponse()
    return pb.AbortResponse(aborted=router.abort(req.request_id))


async def health(router: Router) -> pb.HealthResponse:
    groups = [
        pb.GroupHealth(
            name=g.name,
            healthy=g.healthy,
            num_running=g.num_running,
            num_waiting=g.num_waiting,
            kv_usage=g.kv_usage,
        )
        for g in router.groups.values()
    ]
    status = "SERVING" if router.healthy_groups() and router.limits else "NOT_SERVING"
    return pb.HealthResponse(status=status, groups=groups)


def list_models(router: Router, context: Any = None) -> pb.ListModelsResponse:
    try:
        authenticate(router, context)
    except Exception as e:
        _fail(context, e, "")
        return pb.ListModelsResponse()
    limits = router.limits
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                id=router.model,
                max_model_len=limits.max_model_len if limits else 0,
                owned_by="flotilla",
            )
        ]
    )
