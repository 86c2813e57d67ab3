"""A fake OpenAI-compatible provider on loopback.

It records every request (path, headers, body) and behaves by the model name the
gateway sends it (the config's `upstream`):

  fake-chat            normal answers; usage with cached and reasoning details; the
                       model comes back dated ("fake-chat-2024-06-01"), as OpenAI does
  fake-usage-on-choice the usage rides on the last chunk that also carries choices
  fake-nousage         a stream that never sends usage, even when asked
  fake-groq            usage only in x_groq.usage (Groq's stream extension)
  fake-stall           one chunk, then silence for `stall_seconds`
  fake-slow            `slow_chunks` chunks, `slow_interval` seconds apart
  fake-cut             two chunks, then the connection closes (no [DONE])
  fake-onewrite        the whole stream (chunks, usage, [DONE]) in one write
  fake-sleep           a normal non-streaming answer after `stall_seconds`
  fake-big             `big_chunks` chunks of BIG_CHUNK_BYTES of text each, as fast as they are read
  fake-think           `think_chunks` chunks `think_interval` apart, then usage reporting
                       HIDDEN_REASONING reasoning tokens that were never streamed
  fake-think-endless   chunks `think_interval` apart for minutes, never any usage
  fake-running         as fake-think, with a running usage on every chunk (vLLM's
                       continuous usage stats): only the last one is the total
  fake-400 / fake-401 / fake-429 / fake-500 / fake-503
                       errors whose body echoes the provider key (and any
                       cf-aig-authorization token) it was sent
"""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

REPLY_WORDS = ["Hello", " from", " the", " fake", " upstream", "."]
PROMPT_TOKENS = 17
CACHED_TOKENS = 5
REASONING_TOKENS = 3
BIG_CHUNK_BYTES = 65_536
HIDDEN_REASONING = 50_000


@dataclass
class Recorded:
    path: str
    headers: list[tuple[str, str]]
    body: dict[str, Any]
    raw: bytes


@dataclass
class FakeOpenAI:
    key: str
    stall_seconds: float = 5.0
    slow_chunks: int = 200
    slow_interval: float = 0.02
    big_chunks: int = 128
    think_chunks: int = 12
    think_interval: float = 0.05
    requests: list[Recorded] = field(default_factory=list)
    streams_cancelled: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    chunks_sent: int = 0

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.chat, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ])

    async def _record(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        body = orjson.loads(raw)
        self.requests.append(Recorded(request.url.path, [(k, v) for k, v in request.headers.items()], body, raw))
        return body

    def _error(self, status: int, request: Request) -> Response:
        token = request.headers.get("cf-aig-authorization", "none")
        body = {"error": {"message": f"Incorrect API key provided: {self.key}. You can find your key at "
                                     f"https://example.invalid (fragment {self.key[3:15]}; gateway {token}).",
                          "type": "invalid_request_error", "param": None, "code": f"fake_{status}"}}
        headers = {"retry-after": "7", "set-cookie": "session=upstream-secret", "openai-organization": "org-operator",
                   "x-ratelimit-remaining-requests": "12"}
        return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)

    async def chat(self, request: Request) -> Response:
        body = await self._record(request)
        model = body.get("model", "")
        status = int(model.split("-")[1]) if model.split("-")[-1].isdigit() else 0
        if status:
            return self._error(status, request)
        if model == "fake-sleep":
            await asyncio.sleep(self.stall_seconds)
        chat = request.url.path.endswith("/chat/completions")
        if body.get("stream"):
            if model == "fake-onewrite":
                whole = b"".join([part async for part in self._stream(body, chat)])
                return Response(whole, media_type="text/event-stream")
            return StreamingResponse(self._stream(body, chat), media_type="text/event-stream",
                                     headers={"set-cookie": "a=b", "openai-organization": "org-operator"})
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        text = "".join(REPLY_WORDS)
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        out = {"id": "chatcmpl-fake", "object": "chat.completion" if chat else "text_completion",
               "created": int(time.time()), "model": model + "-2024-06-01", "choices": [choice],
               "system_fingerprint": "fp_fake", "unknown_upstream_field": {"kept": True}}
        if model != "fake-nousage":
            out["usage"] = self._usage(len(REPLY_WORDS))
        return Response(orjson.dumps(out), media_type="application/json",
                        headers={"set-cookie": "session=upstream", "openai-organization": "org-operator",
                                 "openai-project": "proj_operator", "x-ratelimit-limit-requests": "100"})

    def _usage(self, completion: int, reasoning: int | None = None) -> dict[str, Any]:
        return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
                "total_tokens": PROMPT_TOKENS + completion,
                "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS},
                "completion_tokens_details": {
                    "reasoning_tokens": min(REASONING_TOKENS, completion) if reasoning is None else reasoning}}

    def stream_usage(self, model: str, words: list[str]) -> dict[str, Any]:
        """The usage the stream of `model` reports at its end."""
        if model == "fake-big":
            return self._usage(sum(len(w) for w in words) // 4)
        if model in ("fake-think", "fake-running"):
            return self._usage(len(words) + HIDDEN_REASONING, HIDDEN_REASONING)
        return self._usage(len(words))

    async def _stream(self, body: dict[str, Any], chat: bool) -> AsyncIterator[bytes]:
        model = body["model"]
        opts = body.get("stream_options") or {}
        asked = opts.get("include_usage") is True and model not in ("fake-nousage", "fake-groq",
                                                                       "fake-think-endless")
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 1, "model": model + "-2024-06-01", "system_fingerprint": "fp_fake"}
        extra = {"usage": None} if asked else {}

        def chunk(text: str | None, finish: str | None = None, **more: Any) -> bytes:
            if chat:
                choice: dict[str, Any] = {"index": 0, "delta": {"content": text} if text is not None else {},
                                          "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return b"data: " + orjson.dumps({**base, "choices": [choice], **extra, **more}) + b"\n\n"

        words = REPLY_WORDS
        if model == "fake-slow":
            words = [f" w{i}" for i in range(self.slow_chunks)]
        elif model == "fake-big":
            words = ["x" * BIG_CHUNK_BYTES] * self.big_chunks
        elif model in ("fake-think", "fake-think-endless", "fake-running"):
            words = [f" t{i}" for i in range(100_000 if model == "fake-think-endless" else self.think_chunks)]
        try:
            for i, w in enumerate(words):
                if model == "fake-stall" and i == 1:
                    await asyncio.sleep(self.stall_seconds)
                if model == "fake-slow":
                    await asyncio.sleep(self.slow_interval)
                elif model in ("fake-think", "fake-think-endless", "fake-running"):
                    await asyncio.sleep(self.think_interval)
                if model == "fake-cut" and i == 2:
                    raise ConnectionResetError  # uvicorn drops the connection mid-body
                last = i == len(words) - 1
                if last and model == "fake-usage-on-choice":
                    yield chunk(w, "stop", usage=self.stream_usage(model, words))
                    yield b"data: [DONE]\n\n"
                    return
                self.chunks_sent += 1
                yield chunk(w, usage=self._usage(i + 1, 0)) if model == "fake-running" else chunk(w)
            yield chunk(None, "stop")
            if asked:
                usage = self.stream_usage(model, words)
                yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
            if model == "fake-groq":
                yield b"data: " + orjson.dumps({**base, "choices": [], "x_groq": {
                    "id": "req_x", "usage": self._usage(len(words))}}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.streams_cancelled.append(model)
            self.cancelled.set()
            raise

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for i, _ in enumerate(inputs):
            vector = [0.25, -0.5, 0.125]
            value: Any = vector
            if body.get("encoding_format") == "base64":
                value = base64.b64encode(struct.pack("<3f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        out = {"object": "list", "data": data, "model": body["model"],
               "usage": {"prompt_tokens": 4 * len(inputs), "total_tokens": 4 * len(inputs)}}
        return Response(orjson.dumps(out), media_type="application/json")
