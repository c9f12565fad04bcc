"""A real HTTP server speaking the OpenAI chat-completions API, with scripted answers.

Tests start it on loopback to stand in for a frontier provider.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Script:
    answers: dict[str, str] = field(default_factory=dict)  # user text -> label
    default: str = "no_such_label"
    delay_s: float = 0.0
    calls: int = 0
    prompt_tokens: int = 100
    completion_tokens: int = 5
    # Failures: the first ``fail_first`` calls, or every call while ``failing`` is set,
    # answer with HTTP ``fail_status`` instead, with an optional Retry-After header.
    fail_status: int = 500
    fail_first: int = 0
    failing: bool = False  # every call fails while set
    retry_after_s: float | None = None
    hints: list[str] = field(default_factory=list)  # what the cheaper tiers said, per call
    offered: list[list[str]] = field(default_factory=list)  # the labels offered, per call
    keys: list[str] = field(default_factory=list)  # the Authorization header, per call
    body: bytes | None = None  # answer 200 with exactly these bytes (a broken provider)
    inflight: int = 0
    max_inflight: int = 0  # the most calls it held at once


@contextmanager
def fake_provider(script: Script) -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT/v1) of a provider following ``script``."""

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:  # the server answers on several threads at once
                script.calls += 1
                fail = script.failing or script.calls <= script.fail_first
                script.inflight += 1
                script.max_inflight = max(script.max_inflight, script.inflight)
            # What was asked is on record on arrival, before any scripted delay.
            content = body["messages"][-1]["content"]
            text, _, hint = content.partition("\n\n(cheaper tiers")
            script.hints.append(hint)
            script.keys.append(self.headers.get("Authorization", ""))
            schema = body.get("response_format", {}).get("json_schema", {}).get("schema", {})
            script.offered.append(list(schema.get("properties", {}).get("label", {})["enum"]))
            if script.delay_s:
                time.sleep(script.delay_s)
            with lock:
                script.inflight -= 1
            if fail:
                error = json.dumps({"error": {"message": "scripted failure", "type": "x"}})
                self.send_response(script.fail_status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(error)))
                if script.retry_after_s is not None:
                    self.send_header("Retry-After", str(script.retry_after_s))
                self.end_headers()
                self.wfile.write(error.encode())
                return
            if script.body is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(script.body)))
                self.end_headers()
                self.wfile.write(script.body)
                return
            label = script.answers.get(text, script.default)
            message = {"role": "assistant", "content": json.dumps({"label": label})}
            payload = {
                "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": {"prompt_tokens": script.prompt_tokens,
                          "completion_tokens": script.completion_tokens,
                          "total_tokens": script.prompt_tokens + script.completion_tokens},
            }  # fmt: skip
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # many calls at once must not wait on the backlog

        def handle_error(self, request: object, client_address: object) -> None:
            # A client that hangs up mid-answer (a body it refuses to read) is expected.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)  # type: ignore[arg-type]

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
