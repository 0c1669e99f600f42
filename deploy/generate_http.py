"""`flotilla generate --http URL`: one request through the OpenAI-compatible HTTP API of a
running server (Flotilla's router, or any other: vLLM, ...), for when only its HTTP port is
reachable. Standard library only, like the gRPC path needs only grpcio.

/v1/completions, or /v1/chat/completions with --chat; streamed as server-sent events with
--stream. The model is --model, else the first one the server lists (GET /v1/models).
Prints the text on stdout and "[finish_reason; N prompt + M completion tokens]" on stderr;
an HTTP error or an unreachable server prints one line and returns 1.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any


def _url(base: str, path: str) -> str:
    base = base.rstrip("/")
    return f"{base if base.endswith('/v1') else base + '/v1'}/{path}"


def _headers(api_key: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def _served_model(base: str, api_key: str | None, timeout: float) -> str:
    req = urllib.request.Request(_url(base, "models"), headers=_headers(api_key))
    with urllib.request.urlopen(req, timeout=timeout) as r:
        models = json.load(r).get("data", [])
    if not models:
        raise ValueError(f"{_url(base, 'models')} lists no model: pass --model")
    return models[0]["id"]


def _text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta") or choice.get("message") or {}
    return part.get("content") or ""


def generate(args: Any) -> int:
    """args: prompt, http, chat, stream, max_tokens, temperature, timeout, model, api_key."""
    try:
        model = args.model or _served_model(args.http, args.api_key, args.timeout)
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
        }
        if args.chat:
            body["messages"] = [{"role": "user", "content": args.prompt}]
        else:
            body["prompt"] = args.prompt
        if args.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        path = "chat/completions" if args.chat else "completions"
        req = urllib.request.Request(
            _url(args.http, path), json.dumps(body).encode(), _headers(args.api_key)
        )
        with urllib.request.urlopen(req, timeout=args.timeout) as r:
            reason, usage = _stream(r, args.chat) if args.stream else _whole(r, args.chat)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        print(f"error: HTTP {e.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"error: {args.http}: {e}", file=sys.stderr)
        return 1
    if usage:
        print(
            f"[{reason}; {usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
            "completion tokens]",
            file=sys.stderr,
        )
    return 0


def _whole(r, chat: bool) -> tuple[str | None, dict | None]:
    resp = json.load(r)
    choice = resp["choices"][0]
    print(_text(choice, chat))
    return choice.get("finish_reason"), resp.get("usage")


def _stream(r, chat: bool) -> tuple[str | None, dict | None]:
    """Server-sent events: `data: {chunk}` lines up to `data: [DONE]`."""
    reason, usage = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise ValueError(f"the server ended the stream: {chunk['error']}")
        for choice in chunk.get("choices") or []:
            print(_text(choice, chat), end="", flush=True)
            reason = choice.get("finish_reason") or reason
        usage = chunk.get("usage") or usage
    print()
    return reason, usage
