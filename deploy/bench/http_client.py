"""OpenAI-compatible HTTP client (Flotilla's router, vLLM, ...): streamed /v1/completions or
/v1/chat/completions read as server-sent events with aiohttp.

Token counting: SSE chunks carry text, not token ids, so the output token count comes from
the usage the stream ends with (`stream_options.include_usage`); it is cross-checked against
the number of chunks that carried text (each carries at least one token, so more chunks
than tokens is a mismatch). A server that sends no usage gets the chunk count, marked
`tokens_source="chunks"`. Chunks with empty text (vLLM's opening role-only chat delta, a
partial UTF-8 character) carry no visible output and are not timed.
A non-200 answer is an error under "HTTP <status>"; an `error` event inside a 200 stream is
one under "SSE <code or type>".
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from deploy.bench.clients import EndpointError, SendOptions, client_error
from deploy.bench.records import RequestResult, RequestSpec


class HttpClient:
    backend = "http"

    def __init__(self, base_url: str):
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else f"{base}/v1"
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # No connection cap: the load generator, not the connector, decides concurrency.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def probe(self, timeout_s: float) -> list[str]:
        """GET /v1/models, retried while the connection is refused (a server still starting),
        all within `timeout_s`."""
        assert self.session is not None, "open() first"
        url = f"{self.base}/models"
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=left)) as r:
                    body = await r.text()
                    if r.status != 200:
                        raise EndpointError(f"GET {url} answered HTTP {r.status}: {body[:200]}")
                    return [m["id"] for m in json.loads(body).get("data", [])]
            except (aiohttp.ClientConnectionError, TimeoutError) as e:
                if time.monotonic() + 0.25 < deadline and not isinstance(e, TimeoutError):
                    await asyncio.sleep(0.25)
                    continue
                raise EndpointError(
                    f"HTTP endpoint {self.base} unreachable within {timeout_s:g} s: "
                    f"{type(e).__name__}: {e}"
                ) from None
            except (aiohttp.ClientError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise EndpointError(f"GET {url}: unexpected answer: {e}") from None

    def request(self, spec: RequestSpec, opts: SendOptions) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": opts.model,
            "max_tokens": spec.max_tokens,
            "temperature": opts.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if opts.ignore_eos:
            body["ignore_eos"] = True
        if spec.messages is not None:
            body["messages"] = [{"role": r, "content": c} for r, c in spec.messages]
            return "chat/completions", body
        if opts.api == "chat":
            body["messages"] = [{"role": "user", "content": spec.prompt_text or ""}]
            return "chat/completions", body
        body["prompt"] = list(spec.prompt_ids) if spec.prompt_ids is not None else spec.prompt_text
        return "completions", body

    async def send(self, spec: RequestSpec, opts: SendOptions) -> RequestResult:
        assert self.session is not None, "open() first"
        result = RequestResult(
            index=spec.index, input_len=spec.input_len, chunk_tokens=None, streamed_tokens=None
        )
        path, body = self.request(spec, opts)
        headers = {"x-session-id": spec.session_id} if spec.session_id else {}
        t0 = time.perf_counter()
        try:
            async with self.session.post(
                f"{self.base}/{path}",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=opts.request_timeout_s),
            ) as resp:
                if resp.status != 200:
                    result.error_code = f"HTTP {resp.status}"
                    result.error_message = _error_message(await resp.text())
                else:
                    await self._read_stream(resp, result, t0)
        except Exception as e:  # a client-side failure: reported under its own code
            client_error(result, e)
        result.e2e = time.perf_counter() - t0
        if result.chunk_times:
            result.ttft = result.chunk_times[0]
        if result.usage_completion_tokens is not None:
            result.output_tokens, result.tokens_source = result.usage_completion_tokens, "usage"
        else:
            result.output_tokens, result.tokens_source = len(result.chunk_times), "chunks"
        if result.error_code is None:
            if result.finish_reason is None:
                result.error_code = "INCOMPLETE_STREAM"
                result.error_message = "the stream ended without a finish_reason"
            else:
                result.ok = True
        return result

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, result: RequestResult, t0: float
    ) -> None:
        buf = b""
        async for piece in resp.content.iter_any():
            now = time.perf_counter() - t0
            buf += piece
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                _apply_event(json.loads(data), result, now)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _apply_event(event: dict[str, Any], result: RequestResult, now: float) -> None:
    if "error" in event:
        err = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
        result.error_code = f"SSE {err.get('code') or err.get('type') or 'error'}"
        result.error_message = str(err.get("message", ""))
        return
    usage = event.get("usage")
    if usage:
        result.usage_prompt_tokens = usage.get("prompt_tokens")
        result.usage_completion_tokens = usage.get("completion_tokens")
    for choice in event.get("choices") or []:
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            result.chunk_times.append(now)
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]


def _error_message(body: str) -> str:
    try:
        err = json.loads(body).get("error", body)
    except (json.JSONDecodeError, AttributeError):
        return body[:300]
    if isinstance(err, dict):
        return str(err.get("message", ""))[:300]
    return str(err)[:300]
