"""A fake OpenAI Responses API (POST /v1/responses) on loopback, shaped as OpenAI answers.

It records every request and behaves by the model name the gateway sends it:

  fake-resp             the answer WORDS; usage with cached and reasoning details (USAGE);
                        the model comes back dated, as OpenAI does
  fake-resp-slow        `slow_chunks` text deltas `interval` apart, then response.completed
                        with SLOW_USAGE (for disconnects: only a read-on gets the usage)
  fake-resp-cut         three deltas, then the connection closes: no response.completed
  fake-resp-absurd      response.completed whose usage says 10^12 input tokens
  fake-resp-incomplete  response.incomplete (max_output_tokens reached) with USAGE
  fake-resp-failed      response.failed with an error and USAGE
  fake-resp-error       two deltas, then an `error` event quoting the provider key, then
                        the connection closes (a provider failing mid-stream)

`stored` keeps the id of every response it was asked to store (store not false), as
OpenAI would: a test can check that no tenant's response ever is.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.openai_upstream import Recorded

WORDS = ["Hello", " from", " the", " Responses", " fake", "."]
USAGE = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 12}, "output_tokens": 30,
         "output_tokens_details": {"reasoning_tokens": 9}, "total_tokens": 70}
SLOW_USAGE = {"input_tokens": 25, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5_000,
              "output_tokens_details": {"reasoning_tokens": 4_000}, "total_tokens": 5_025}
ABSURD = 10**12


@dataclass
class FakeResponses:
    key: str
    slow_chunks: int = 200
    interval: float = 0.02
    requests: list[Recorded] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    _ids: Any = field(default_factory=itertools.count)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/responses", self.responses, methods=["POST"])])

    async def responses(self, request: Request) -> Response:
        raw = await request.body()
        body = orjson.loads(raw)
        self.requests.append(Recorded(request.url.path, list(request.headers.items()), body, raw))
        if request.headers.get("authorization") != f"Bearer {self.key}":
            err = {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": None,
                   "code": "invalid_api_key"}
            return Response(orjson.dumps({"error": err}), status_code=401, media_type="application/json")
        rid = f"resp_{next(self._ids):048x}"  # as long as OpenAI's: key-shaped to a scrubber
        if body.get("store", True) is not False:
            self.stored.append(rid)
        model = body["model"]
        text = "".join(WORDS)
        usage: dict[str, Any] = {**USAGE}
        if model == "fake-resp-absurd":
            usage = {**USAGE, "input_tokens": ABSURD}
        item = {"id": f"msg_{rid}", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
        response = {"id": rid, "object": "response", "created_at": 1_765_000_000, "status": "completed",
                    "background": False, "error": None, "incomplete_details": None,
                    "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                    "model": model + "-2025-04-14", "output": [item], "parallel_tool_calls": True,
                    "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
                    "store": body.get("store", True), "temperature": 1.0, "text": {"format": {"type": "text"}},
                    "tool_choice": "auto", "tools": body.get("tools", []), "top_p": 1.0, "truncation": "disabled",
                    "usage": usage, "user": None, "metadata": body.get("metadata") or {}}
        if not body.get("stream"):
            return Response(orjson.dumps(response), media_type="application/json")
        return StreamingResponse(self._stream(model, response, item), media_type="text/event-stream")

    async def _stream(self, model: str, response: dict[str, Any], item: dict[str, Any]) -> AsyncIterator[bytes]:
        seq = itertools.count()

        def event(kind: str, **data: Any) -> bytes:
            return (b"event: " + kind.encode() + b"\ndata: "
                    + orjson.dumps({"type": kind, "sequence_number": next(seq), **data}) + b"\n\n")

        started = {**response, "status": "in_progress", "output": [], "usage": None}
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        words = [f" w{i}" for i in range(self.slow_chunks)] if model == "fake-resp-slow" else WORDS
        try:
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            yield event("response.output_item.added", output_index=0, item={**item, "status": "in_progress",
                                                                           "content": []})
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            for i, w in enumerate(words):
                if model == "fake-resp-slow":
                    await asyncio.sleep(self.interval)
                if model == "fake-resp-cut" and i == 3:
                    raise ConnectionResetError  # uvicorn drops the connection mid-body
                if model == "fake-resp-error" and i == 2:
                    yield event("error", code="server_error", param=None,
                                message=f"The server had an error (key {self.key} was used).")
                    raise ConnectionResetError
                yield event("response.output_text.delta", **where, delta=w, logprobs=[])
            text = "".join(words)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done_item = {**item, "content": [part]}
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=part)
            yield event("response.output_item.done", output_index=0, item=done_item)
            final = {**response, "output": [done_item]}
            if model == "fake-resp-slow":
                final["usage"] = SLOW_USAGE
            if model == "fake-resp-incomplete":
                final.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
                yield event("response.incomplete", response=final)
            elif model == "fake-resp-failed":
                final.update(status="failed", error={"code": "server_error", "message": "The model failed."})
                yield event("response.failed", response=final)
            else:
                yield event("response.completed", response=final)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(model)
            raise
