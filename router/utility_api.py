"""The HTTP endpoints beside the OpenAI ones (vLLM has the same): `POST /tokenize`,
`POST /detokenize`, `GET /version`, `GET /metrics`.

/tokenize and /detokenize use the router's copy of the engine's tokenizer, so their ids are
exactly the ones a completion would see; they need an API key like every endpoint but
/health. /metrics is the router replica's own series (router.metrics_mirror).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from router.core import Router
from router.metrics_mirror import CONTENT_TYPE
from router.openai_api import HttpCall, chat_ids, check_model, error_response, read_body
from router.validation import ChatMessage, check_messages, check_token_ids, parse_body
from router.version import version as flotilla_version
from workers.errors import InvalidRequest


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown: ignored, see router.unknown_fields

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompt only: what /v1/completions adds
    add_generation_prompt: bool = True  # messages only: what /v1/chat/completions adds
    chat_template_kwargs: dict[str, Any] | None = None  # messages only (router.template_kwargs)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


async def tokenize(router: Router, request: Request) -> Response:
    call = HttpCall(request, "tokenize")
    try:
        body = await read_body(router, request)
        req = parse_body(body, TokenizeRequest, router.config.unknown_fields == "reject")
        call.note_ignored(req)
        check_model(router, req.model)
        limits = router.prompt_limits()
        assert router.tokenizer is not None
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequest("prompt", "send exactly one of prompt or messages")
        if req.prompt is not None:
            if len(req.prompt) > limits.max_prompt_chars:
                raise InvalidRequest(
                    "prompt",
                    f"{len(req.prompt)} characters; the limit is {limits.max_prompt_chars}",
                )
            tokens = router.tokenizer.encode(req.prompt, req.add_special_tokens)
        else:
            check_messages(len(req.messages), limits)
            tokens = chat_ids(
                router, req.messages, req.add_generation_prompt, None, req.chat_template_kwargs
            )
    except Exception as e:
        return call.error(e)
    body = {"tokens": tokens, "count": len(tokens), "max_model_len": limits.max_model_len}
    return JSONResponse(body, headers=call.headers())


async def detokenize(router: Router, request: Request) -> Response:
    call = HttpCall(request, "detokenize")
    try:
        body = await read_body(router, request)
        req = parse_body(body, DetokenizeRequest, router.config.unknown_fields == "reject")
        call.note_ignored(req)
        check_model(router, req.model)
        check_token_ids(req.tokens, router.prompt_limits(), "tokens")
        assert router.tokenizer is not None
        text = router.tokenizer.decode(req.tokens)
    except Exception as e:
        return call.error(e)
    return JSONResponse({"prompt": text}, headers=call.headers())


def version(router: Router, request: Request) -> Response:
    try:
        router.keys.check(request.headers.get("authorization"))
    except Exception as e:
        return error_response(e)
    return JSONResponse({"version": flotilla_version()})


def metrics(router: Router, request: Request) -> Response:
    try:
        router.keys.check(request.headers.get("authorization"))
    except Exception as e:
        return error_response(e)
    return Response(router.metrics.mirror.render(), media_type=CONTENT_TYPE)
