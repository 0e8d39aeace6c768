"""A scripted vision-language-model endpoint on 127.0.0.1 for the re-rank tests.

A real HTTP server (the standard library's threading server, one thread per
request) that speaks both protocols the re-ranker uses:

* OpenAI chat completions: ``POST /v1/chat/completions``;
* Gemini: ``POST /v1beta/models/<model>:generateContent``.

Every request is recorded (path, headers, JSON body, the images decoded from
its data URLs / inline data, its text parts, the candidate labels read back
out of the prompt) and answered by the next scripted action, or by
``default`` when the script is empty. The server counts the requests in
flight, so tests can observe the client's concurrency limit.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

DATA_URL = re.compile(r"^data:image/jpeg;base64,(.+)$")


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    headers: dict
    body: dict
    protocol: str  # "openai" or "gemini"
    texts: list = field(default_factory=list)
    images: list = field(default_factory=list)  # decoded bytes, in order
    system: Optional[str] = None
    started: float = 0.0

    @property
    def candidates(self) -> list[str]:
        """The candidate labels, read back out of the prompt's last text part."""
        last = next(t for t in reversed(self.texts) if t.startswith("Candidate labels"))
        return json.loads(last.split(": ", 1)[1].split("\n", 1)[0])


@dataclass
class Action:
    """A scripted answer: wait ``delay`` s, then send status, headers and either a model ``text`` or a raw body."""

    status: int = 200
    text: Optional[str] = None
    raw: Optional[bytes] = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    tokens: tuple = (1000, 20)


def reply(text: str, *, delay: float = 0.0, tokens: tuple = (1000, 20)) -> Action:
    return Action(text=text, delay=delay, tokens=tokens)


def label(name: str, rationale: str = "looks like one", **kw) -> Action:
    return reply(json.dumps({"label": name, "rationale": rationale}), **kw)


def status(code: int, *, retry_after: Optional[str] = None, message: str = "scripted failure") -> Action:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = json.dumps({"error": {"code": code, "message": message, "status": "SCRIPTED"}}).encode()
    return Action(status=code, raw=body, headers=headers)


def raw(body: bytes, *, code: int = 200) -> Action:
    return Action(status=code, raw=body)


class VLMDouble:
    """``with VLMDouble() as d:`` serves on ``d.url`` (OpenAI root: ``d.openai_url``)."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.script: deque = deque()
        self.default: Callable[[Seen], Action] = lambda seen: label(seen.candidates[0])
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                double._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.openai_url = self.url + "/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "VLMDouble":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def push(self, *actions: Action) -> None:
        self.script.extend(actions)

    # -- the server side ----------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        started = time.monotonic()
        body = json.loads(h.rfile.read(int(h.headers.get("content-length", 0))) or b"{}")
        seen = _decode(h.path, dict(h.headers.items()), body)
        seen.started = started
        with self._lock:
            self.requests.append(seen)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            action = self.script.popleft() if self.script else None
        try:
            action = action or self.default(seen)
            if action.delay:
                time.sleep(action.delay)
            payload = action.raw if action.raw is not None else _answer(seen, action)
            h.send_response(action.status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            for k, v in action.headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass
        finally:
            with self._lock:
                self.in_flight -= 1


def _decode(path: str, headers: dict, body: dict) -> Seen:
    if path.endswith("/chat/completions"):
        msgs = body["messages"]
        seen = Seen(path, headers, body, "openai", system=next((m["content"] for m in msgs if m["role"] == "system"), None))
        for part in next(m for m in msgs if m["role"] == "user")["content"]:
            if part["type"] == "text":
                seen.texts.append(part["text"])
            else:
                m = DATA_URL.match(part["image_url"]["url"])
                seen.images.append(base64.b64decode(m.group(1)) if m else None)
        return seen
    if ":generateContent" in path:
        sys_parts = (body.get("systemInstruction") or {}).get("parts") or []
        seen = Seen(path, headers, body, "gemini", system="".join(p.get("text", "") for p in sys_parts) or None)
        for part in body["contents"][0]["parts"]:
            if "text" in part:
                seen.texts.append(part["text"])
            else:
                blob = part.get("inlineData") or part.get("inline_data")
                # google-genai sends URL-safe base64; the API accepts either alphabet
                data = blob["data"].replace("+", "-").replace("/", "_")
                seen.images.append(base64.urlsafe_b64decode(data) if blob.get("mimeType", blob.get("mime_type")) == "image/jpeg" else None)
        return seen
    raise ValueError(f"unexpected path {path}")


def _answer(seen: Seen, action: Action) -> bytes:
    p, c = action.tokens
    if seen.protocol == "openai":
        return json.dumps({
            "id": "chatcmpl-double", "object": "chat.completion", "model": seen.body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": action.text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }).encode()
    return json.dumps({
        "candidates": [{"content": {"role": "model", "parts": [{"text": action.text}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c},
        "modelVersion": "double",
    }).encode()
