"""OpenAI-compatible HTTP front end: /v1/completions, /v1/chat/completions (the model's chat
template), /v1/models, /health (router.utility_api: /tokenize, /detokenize, /version,
/metrics). Streaming is SSE ending with `data: [DONE]`.

Like vLLM's server: unknown body fields are ignored and named in `x-flotilla-ignored-fields`
(router.unknown_fields); a client's `X-Request-Id` is the id the request runs under (choice i
of n > 1: `<id>-<i>`) and what gRPC `Abort` takes (router.request_ids); Serve's HTTP proxy
echoes it, and gives a request without one an id of its own, which we then use.

Errors use OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}) with 400
(invalid field or malformed JSON), 404 (unknown model), 429 (every group's queue is full) or
503 (no healthy group). A request is only answered 200 once a group has accepted it and
produced its first token, so overload and validation errors always get their status code;
an error after that (a group dying mid-stream) arrives as a final SSE `error` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router import request_ids, template_kwargs, tools, unknown_fields
from router.choices import choice_id
from router.core import Chunk, Router
from router.errors import BodyTooLarge, ModelNotFound, api_error
from router.tools import ToolPlan
from router.validation import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    chat_params,
    check_messages,
    completion_params,
    completion_prompts,
    finalize,
    parse_body,
    seeded,
)

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(exc: BaseException, request_id: str = "") -> JSONResponse:
    err = api_error(exc, request_id)
    return JSONResponse(err.openai_body(), status_code=err.http_status)


def check_model(router: Router, model: str | None) -> None:
    if model and model != router.model:
        raise ModelNotFound(model, router.model)


def _usage(chunks: list[Chunk], n: int) -> dict[str, int]:
    """Summed over the choices' final chunks; a prompt's tokens once for its n choices."""
    firsts = [c.usage for c in chunks if c.usage and c.index % n == 0]
    prompt = sum(u["prompt_tokens"] for u in firsts)
    completion = sum(c.usage["completion_tokens"] for c in chunks if c.usage)
    cached = sum(u.get("cached_tokens", 0) for u in firsts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _completion_logprobs(router: Router, c: Chunk, offset: int) -> dict[str, Any] | None:
    if c.logprobs is None:
        return None
    tok = router.tokenizer
    assert tok is not None
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, lp in zip(c.ids, c.logprobs, strict=False):
        text = tok.token_text(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(lp[0])
        tops.append({tok.token_text(i): v for i, v in zip(lp[1], lp[2], strict=False)})
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _chat_logprobs(router: Router, c: Chunk) -> dict[str, Any] | None:
    if c.logprobs is None:
        return None
    tok = router.tokenizer
    assert tok is not None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tok.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, lp in zip(c.ids, c.logprobs, strict=False):
        if lp is None:
            continue
        item = entry(token_id, lp[0])
        item["top_logprobs"] = [entry(i, v) for i, v in zip(lp[1], lp[2], strict=False)]
        content.append(item)
    return {"content": content}


def _session(router: Router, request: Request) -> str | None:
    return request.headers.get(router.config.session_header)


async def read_body(router: Router, request: Request) -> bytes:
    """The API key first (nothing is read for a caller without one), then the body, refused
    once it passes router.max_body_bytes instead of being read whole into memory."""
    router.keys.check(request.headers.get("authorization"))
    limit = router.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"{declared} bytes; the limit is {limit}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BodyTooLarge(f"more than {limit} bytes; the limit is {limit}")
    return bytes(body)


class HttpCall:
    """What one HTTP request carries besides its body: its ids and the fields ignored."""

    def __init__(self, request: Request, prefix: str):
        self.client_id = request.headers.get(request_ids.HEADER)
        self.run_id = self.client_id or f"{prefix}-{request_ids.new()}"  # what the router uses
        self.body_id = f"{prefix}-{self.client_id}" if self.client_id else self.run_id
        self.ignored: list[str] = []

    def check(self) -> None:
        if self.client_id is not None:
            request_ids.check(self.client_id, request_ids.HEADER)

    def note_ignored(self, req: Any) -> None:
        self.ignored = unknown_fields.unknown_fields(req)
        if self.ignored:
            log.warning("request %s: ignored unknown fields: %s", self.run_id,
                        ", ".join(self.ignored))  # fmt: skip

    def headers(self) -> dict[str, str]:
        # A request that came with an id gets it echoed by Serve's HTTP proxy, which also gives
        # every request without one an id of its own (so through Serve, client_id is always
        # set); a second copy from us would make the header a list. Only an id we made up is
        # ours to send.
        h = {} if self.client_id else {request_ids.HEADER: self.run_id}
        if self.ignored:
            h[unknown_fields.HEADER] = unknown_fields.header_value(self.ignored)
        return h

    def error(self, exc: BaseException) -> JSONResponse:
        resp = error_response(request_ids.as_field(exc, request_ids.HEADER), self.body_id)
        resp.headers.update(self.headers())
        return resp


def _reject_unknown(router: Router) -> bool:
    return router.config.unknown_fields == "reject"


async def completions(router: Router, request: Request) -> Response:
    call = HttpCall(request, "cmpl")
    try:
        body = await read_body(router, request)
        call.check()
        req = parse_body(body, CompletionRequest, _reject_unknown(router))
        call.note_ignored(req)
        check_model(router, req.model)
        limits = router.prompt_limits()
        params, opts = completion_params(req, limits)
        prompts = completion_prompts(req)
        jobs = []  # (prompt ids, params) per choice: prompt p's choice j is index p * n + j
        for prompt in prompts:
            token_ids = router.tokenize(prompt)
            sp = finalize(params, opts, len(token_ids), limits)
            jobs += [(token_ids, seeded(sp, i)) for i in range(opts.n)]
        if req.echo:
            assert router.tokenizer is not None
            opts.echo = [p if isinstance(p, str) else router.tokenizer.decode(p) for p in prompts]
    except Exception as e:
        return call.error(e)
    return await _respond(router, request, call, jobs, opts, chat=False)


async def chat_completions(router: Router, request: Request) -> Response:
    call = HttpCall(request, "chatcmpl")
    try:
        body = await read_body(router, request)
        call.check()
        req = parse_body(body, ChatCompletionRequest, _reject_unknown(router))
        call.note_ignored(req)
        check_model(router, req.model)
        limits = router.prompt_limits()
        check_messages(len(req.messages), limits)
        assert router.tokenizer is not None
        params, opts = chat_params(req, limits, router.tokenizer.supports_tools)
        token_ids = chat_ids(
            router,
            req.messages,
            req.add_generation_prompt,
            opts.tools.tools,
            req.chat_template_kwargs,
        )
        sp = finalize(params, opts, len(token_ids), limits)
    except Exception as e:
        return call.error(e)
    jobs = [(token_ids, seeded(sp, i)) for i in range(opts.n)]
    return await _respond(router, request, call, jobs, opts, chat=True)


def chat_ids(
    router: Router,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    tool_list: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
):
    extra = template_kwargs.check(chat_template_kwargs)
    rendered = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages]
    assert router.tokenizer is not None
    return router.tokenizer.apply_chat_template(rendered, add_generation_prompt, tool_list, extra)


async def _respond(router, request, call: HttpCall, jobs, opts, chat: bool):
    """`jobs`: (prompt token ids, params) of each choice, in index order."""
    session = _session(router, request)
    created = int(time.time())
    n = len(jobs)
    if not opts.stream:
        # One message per choice from the group (Router.complete): no per-token hops.
        tasks = [
            asyncio.ensure_future(
                router.complete(ids, sp, session, choice_id(call.run_id, i, n), i, call.run_id)
            )
            for i, (ids, sp) in enumerate(jobs)
        ]
        try:
            chunks = list(await asyncio.gather(*tasks))
        except Exception as e:
            for t in tasks:  # one choice failed: stop the others (frees their KV blocks)
                t.cancel()
            return call.error(e)
        headers = {"x-flotilla-group": chunks[0].group} | call.headers()
        body = _merge(router, call.body_id, created, chunks, chat, opts)
        return JSONResponse(body, headers=headers)
    stream = router.stream_n([j[0] for j in jobs], [j[1] for j in jobs], session, call.run_id)
    try:
        first = await stream.__anext__()  # accepted (200) or the error's own status code
    except Exception as e:
        await stream.aclose()
        return call.error(e)
    headers = {"x-flotilla-group": first.group} | call.headers()
    body = _sse(router, call.body_id, created, first, stream, opts, chat)
    return StreamingResponse(body, media_type="text/event-stream", headers=headers | _SSE_HEADERS)


def _merge(router, request_id, created, chunks: list[Chunk], chat: bool, opts) -> dict[str, Any]:
    choices = []
    finals = []
    tp: ToolPlan = opts.tools
    for i in range(len(chunks)):
        mine = [c for c in chunks if c.index == i]
        merged = Chunk(
            ids=[t for c in mine for t in c.ids],
            text="".join(c.text for c in mine),
            logprobs=None
            if mine[0].logprobs is None
            else [x for c in mine for x in (c.logprobs or [])],
            finish=mine[-1].finish,
            usage=mine[-1].usage,
            index=i,
        )
        finals.append(merged)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": merged.text}
            finish = merged.finish
            if tp.parse:
                content, calls = tools.parse(merged.text, tp.forced is not None)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": _chat_logprobs(router, merged),
                    "finish_reason": finish,
                }
            )
        else:
            choices.append(
                {
                    "index": i,
                    "text": (opts.echo[i // opts.n] if opts.echo else "") + merged.text,
                    "logprobs": _completion_logprobs(router, merged, 0),
                    "finish_reason": merged.finish,
                }
            )
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": router.model,
        "choices": choices,
        "usage": _usage(finals, opts.n),
    }


async def _sse(
    router, request_id, created, first: Chunk, rest, opts, chat: bool
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets: dict[int, int] = {}
    finals: list[Chunk] = []

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": request_id,
            "object": obj,
            "created": created,
            "model": router.model,
            "choices": choices,
        }

    tp: ToolPlan = opts.tools
    held: dict[int, tuple[str, bool]] = {}  # tool calls: per choice, (text held, holding)

    def render(c: Chunk) -> str:
        if c.finish is not None:
            finals.append(c)
        if chat:
            delta: dict[str, Any] = {"content": c.text}
            finish = c.finish
            if tp.parse:  # text that may be a tool call waits for the end of the answer
                text, holding = held.get(c.index, ("", tp.forced is not None))
                send, keep, holding = tools.split_stream(text + c.text, holding)
                held[c.index] = (keep, holding)
                delta["content"] = send
                if c.finish is not None:
                    content, calls = tools.parse(keep, tp.forced is not None)
                    delta["content"] = send + (content or "")
                    if calls:
                        delta["tool_calls"] = [{"index": j} | x for j, x in enumerate(calls)]
                        finish = "tool_calls" if finish == "stop" else finish
                elif not send and c.index in offsets:
                    return ""  # all held: nothing to send yet
            if c.index not in offsets:
                delta["role"] = "assistant"
                offsets[c.index] = 0
            choice = {
                "index": c.index,
                "delta": delta,
                "logprobs": _chat_logprobs(router, c),
                "finish_reason": finish,
            }
        else:
            off = offsets.get(c.index, 0)
            echo = opts.echo[c.index // opts.n] if opts.echo and c.index not in offsets else ""
            choice = {
                "index": c.index,
                "text": echo + c.text,
                "logprobs": _completion_logprobs(router, c, off),
                "finish_reason": c.finish,
            }
            offsets[c.index] = off + len(echo + c.text)
        return event(base([choice]))

    try:
        yield render(first)
        async for c in rest:
            if out := render(c):
                yield out
        if opts.include_usage:
            yield event(base([]) | {"usage": _usage(finals, opts.n)})
    except Exception as e:  # after the 200: report in-band, then end the stream properly
        yield event(api_error(e, request_id).openai_body())
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"


def models(router: Router, request: Request) -> Response:
    try:
        router.keys.check(request.headers.get("authorization"))
    except Exception as e:
        return error_response(e)
    limits = router.limits
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": router.model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "flotilla",
                    "max_model_len": limits.max_model_len if limits else None,
                }
            ],
        }
    )


def health(router: Router) -> Response:
    groups = {g.name: g.healthy for g in router.groups.values()}
    ok = any(groups.values()) and router.limits is not None
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "groups": groups}, status_code=200 if ok else 503
    )
