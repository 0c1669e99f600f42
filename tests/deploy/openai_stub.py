"""A minimal OpenAI-compatible HTTP server on a free loopback port, for CLI tests that need
an endpoint but no model: it lists one model, records every request body, and answers each
completion with the same two tokens ("Hi", "!"), whole or as server-sent events."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKENS = ["Hi", "!"]


class Stub:
    def __init__(self, model: str):
        self.model = model
        self.bodies: list[dict[str, Any]] = []
        self.url = ""


def _handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/v1/models":
                return self._send(404, b'{"error": {"message": "not found"}}')
            self._send(200, json.dumps({"data": [{"id": stub.model}]}).encode())

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.bodies.append(body)
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                return self._send(404, b'{"error": {"message": "not found"}}')
            n = min(body.get("max_tokens", 2), len(TOKENS))
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}

            def choice(text: str, finish: str | None, whole: bool = False) -> dict:
                if not chat:
                    return {"index": 0, "text": text, "finish_reason": finish}
                key = "message" if whole else "delta"
                return {"index": 0, key: {"content": text}, "finish_reason": finish}

            if not body.get("stream"):
                resp = {"choices": [choice("".join(TOKENS[:n]), "length", True)], "usage": usage}
                return self._send(200, json.dumps(resp).encode())
            events = [
                {"choices": [choice(t, "length" if i == n - 1 else None)]}
                for i, t in enumerate(TOKENS[:n])
            ] + [{"choices": [], "usage": usage}]
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            self._send(200, sse.encode(), "text/event-stream")

    return Handler


@contextlib.contextmanager
def openai_stub(model: str) -> Iterator[Stub]:
    stub = Stub(model)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
