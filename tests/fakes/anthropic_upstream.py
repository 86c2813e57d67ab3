"""A fake Anthropic Messages API on loopback: records requests, answers with cache
token counts reported apart from input_tokens, streams with cumulative message_delta
usage (integrations.md 4.1). Model "fake-claude-cut" stops after message_start;
"fake-claude-think" streams summarised thinking and `think_chunks` text deltas
`interval` apart, then reports HIDDEN_THINKING more output tokens than it streamed;
"fake-claude-think-endless" streams text deltas `interval` apart for minutes, no usage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

INPUT, CACHE_READ, CACHE_WRITE = 11, 7, 5
WORDS = ["Bonjour", " from", " Claude", "."]
OUTPUT = 9  # final cumulative output_tokens
HIDDEN_THINKING = 50_000


@dataclass
class FakeAnthropic:
    key: str
    requests: list[tuple[list[tuple[str, str]], dict[str, Any]]] = field(default_factory=list)
    think_chunks: int = 12
    interval: float = 0.05

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/messages", self.messages, methods=["POST"])])

    async def messages(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.requests.append(([(k, v) for k, v in request.headers.items()], body))
        if request.headers.get("x-api-key") != self.key:
            return Response(orjson.dumps({"type": "error", "error": {
                "type": "authentication_error", "message": f"invalid x-api-key {request.headers.get('x-api-key')}"}}),
                status_code=401, media_type="application/json")
        if body.get("model") == "fake-claude-overloaded":
            return Response(orjson.dumps({"type": "error", "error": {
                "type": "overloaded_error", "message": f"Overloaded (key {self.key})"}}),
                status_code=529, media_type="application/json")
        usage = {"input_tokens": INPUT, "output_tokens": OUTPUT, "cache_read_input_tokens": CACHE_READ,
                 "cache_creation_input_tokens": CACHE_WRITE}
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"] + "-20250101",
                   "stop_reason": "end_turn", "stop_sequence": None}
        if not body.get("stream"):
            out = {**message, "content": [{"type": "text", "text": "".join(WORDS)}], "usage": usage}
            return Response(orjson.dumps(out), media_type="application/json")
        return StreamingResponse(self._stream(body, message), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], message: dict[str, Any]) -> AsyncIterator[bytes]:
        def event(name: str, data: dict[str, Any]) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"

        start_usage = {"input_tokens": INPUT, "output_tokens": 1, "cache_read_input_tokens": CACHE_READ,
                       "cache_creation_input_tokens": CACHE_WRITE}
        yield event("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                                  "usage": start_usage}})
        yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield event("ping", {})
        if body["model"] in ("fake-claude-think", "fake-claude-think-endless"):
            async for part in self._thinking(body["model"], event):
                yield part
            return
        for w in WORDS:
            yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
        if body["model"] == "fake-claude-cut":
            return
        yield event("content_block_stop", {"index": 0})
        yield event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"output_tokens": 4}})
        yield event("message_delta", {"delta": {}, "usage": {"output_tokens": OUTPUT}})  # cumulative, not added
        yield event("message_stop", {})

    async def _thinking(self, model: str, event: Any) -> AsyncIterator[bytes]:
        yield event("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "Hm."}})
        count = self.think_chunks if model == "fake-claude-think" else 100_000
        for i in range(count):
            await asyncio.sleep(self.interval)
            yield event("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": f" t{i}"}})
        yield event("content_block_stop", {"index": 1})
        yield event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"output_tokens": HIDDEN_THINKING + count}})
        yield event("message_stop", {})
