"""A fake OpenAI-compatible provider whose answers carry a canary string.

Used by the privacy canary test: the completion text, streamed deltas, tool-call
arguments and an error message that echoes the prompt all contain the canary, so the
test can prove it flowed through the gateway and then look for it everywhere it must
not be. Behaviour by upstream model name:

  canary-chat    chat/completions and completions, streaming or not, with usage
  canary-error   HTTP 400 whose message quotes the first message of the prompt
  canary-keyecho HTTP 400 (Messages: 422) whose message, code and param quote the
                 provider key the request carried (a provider echoing credentials)
  canary-slow    a stream of many canary chunks, 20 ms apart (for disconnects)
  (embeddings)   a small vector per input
  /v1/messages   the same three behaviours in Anthropic's Messages format
  /v1/responses  canary-chat in the Responses format, streaming or not (text and a
                 function call's arguments carry the canary)
  /v1/messages/count_tokens  {"input_tokens": 21}
"""

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


@dataclass
class CanaryUpstream:
    canary: str
    raw_requests: list[bytes] = field(default_factory=list)
    cancelled: int = 0
    keys_echoed: list[str] = field(default_factory=list)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
        ])

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30,
                "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}

    async def generate(self, request: Request) -> Response:
        raw = await request.body()
        self.raw_requests.append(raw)
        body = orjson.loads(raw)
        model = body["model"]
        chat = request.url.path.endswith("/chat/completions")
        if model == "canary-keyecho":
            return self._key_echo(request.headers.get("authorization", "").removeprefix("Bearer "), 400)
        if model == "canary-error":
            first = (body.get("messages") or [{}])[0].get("content") if chat else body.get("prompt")
            err = {"error": {"message": f"Invalid prompt: {first!s} is not allowed",
                             "type": "invalid_request_error", "param": "messages", "code": "invalid_prompt"}}
            return Response(orjson.dumps(err), status_code=400, media_type="application/json")
        if body.get("stream"):
            asked = (body.get("stream_options") or {}).get("include_usage") is True
            return StreamingResponse(self._stream(model, chat, asked), media_type="text/event-stream")
        text = f"The answer is {self.canary}."
        if chat:
            choice: dict[str, Any] = {"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": text, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "lookup", "arguments": orjson.dumps({"q": self.canary}).decode()}}]}}
        else:
            choice = {"index": 0, "finish_reason": "stop", "text": text}
        out = {"id": "cmpl-canary", "object": "chat.completion" if chat else "text_completion", "created": 1,
               "model": model, "choices": [choice], "usage": self.usage()}
        return Response(orjson.dumps(out), media_type="application/json")

    def _key_echo(self, key: str, status: int) -> Response:
        self.keys_echoed.append(key)
        err = {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error",
                         "param": key, "code": key}}
        return Response(orjson.dumps(err), status_code=status, media_type="application/json")

    async def _stream(self, model: str, chat: bool, asked: bool) -> AsyncIterator[bytes]:
        base = {"id": "cmpl-canary", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 1, "model": model}
        count = 300 if model == "canary-slow" else 4
        try:
            for i in range(count):
                if model == "canary-slow":
                    await asyncio.sleep(0.02)
                words = f" {self.canary} part {i}"
                if chat:
                    delta: dict[str, Any] = {"content": words}
                    if i == 1:
                        delta["tool_calls"] = [{"index": 0, "id": "call_1", "type": "function", "function": {
                            "name": "lookup", "arguments": orjson.dumps({"q": self.canary}).decode()}}]
                    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": words, "finish_reason": None}
                yield b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"
            if asked:
                yield b"data: " + orjson.dumps({**base, "choices": [], "usage": self.usage()}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    async def embeddings(self, request: Request) -> Response:
        raw = await request.body()
        self.raw_requests.append(raw)
        body = orjson.loads(raw)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.25]} for i in range(len(inputs))]
        return Response(orjson.dumps({"object": "list", "data": data, "model": body["model"],
                                      "usage": {"prompt_tokens": 8, "total_tokens": 8}}),
                        media_type="application/json")

    # --- Anthropic Messages -------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        raw = await request.body()
        self.raw_requests.append(raw)
        body = orjson.loads(raw)
        model = body["model"]
        if model == "canary-keyecho":
            return self._key_echo(request.headers.get("x-api-key", ""), 422)
        if model == "canary-error":
            first = (body.get("messages") or [{}])[0].get("content")
            err = {"type": "error", "error": {"type": "invalid_request_error",
                                              "message": f"messages.0.content: {first!s} is not allowed"}}
            return Response(orjson.dumps(err), status_code=400, media_type="application/json")
        usage = {"input_tokens": 21, "output_tokens": 9}
        if body.get("stream"):
            return StreamingResponse(self._anthropic_stream(model, usage), media_type="text/event-stream")
        out = {"id": "msg_canary", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": f"The answer is {self.canary}."},
                           {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": self.canary}}],
               "stop_reason": "tool_use", "stop_sequence": None, "usage": usage}
        return Response(orjson.dumps(out), media_type="application/json")

    async def _anthropic_stream(self, model: str, usage: dict[str, int]) -> AsyncIterator[bytes]:
        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\n".encode() + b"data: " + orjson.dumps({"type": name, **data}) + b"\n\n"

        count = 300 if model == "canary-slow" else 3
        try:
            yield event("message_start", {"message": {
                "id": "msg_canary", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 21, "output_tokens": 1}}})
            yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            for i in range(count):
                if model == "canary-slow":
                    await asyncio.sleep(0.02)
                yield event("content_block_delta", {"index": 0, "delta": {
                    "type": "text_delta", "text": f" {self.canary} part {i}"}})
            yield event("content_block_stop", {"index": 0})
            yield event("content_block_start", {"index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}})
            yield event("content_block_delta", {"index": 1, "delta": {
                "type": "input_json_delta", "partial_json": orjson.dumps({"q": self.canary}).decode()}})
            yield event("content_block_stop", {"index": 1})
            yield event("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                          "usage": {"output_tokens": usage["output_tokens"]}})
            yield event("message_stop", {})
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    # --- Responses API and token counting -------------------------------------------------------

    async def count_tokens(self, request: Request) -> Response:
        self.raw_requests.append(await request.body())
        return Response(b'{"input_tokens": 21}', media_type="application/json")

    async def responses(self, request: Request) -> Response:
        raw = await request.body()
        self.raw_requests.append(raw)
        body = orjson.loads(raw)
        text = f"The answer is {self.canary}."
        call = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "lookup",
                "arguments": orjson.dumps({"q": self.canary}).decode()}
        message = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response = {"id": "resp_canary", "object": "response", "status": "completed", "model": body["model"],
                    "error": None, "output": [message, call],
                    "usage": {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
                              "output_tokens_details": {"reasoning_tokens": 0}}}
        if not body.get("stream"):
            return Response(orjson.dumps(response), media_type="application/json")

        async def events() -> AsyncIterator[bytes]:
            def event(name: str, **data: Any) -> bytes:
                return f"event: {name}\ndata: ".encode() + orjson.dumps({"type": name, **data}) + b"\n\n"

            yield event("response.created", response={**response, "status": "in_progress", "output": [],
                                                      "usage": None})
            for word in text.split(" "):
                yield event("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0,
                            delta=word + " ")
            yield event("response.function_call_arguments.delta", item_id="fc_1", output_index=1,
                        delta=call["arguments"])
            yield event("response.completed", response=response)

        return StreamingResponse(events(), media_type="text/event-stream")
