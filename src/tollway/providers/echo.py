"""An offline OpenAI-compatible upstream served inside Tollway, for trying it out.

Chat repeats the last user message; completions repeat the prompt; the Responses API
repeats the input's last user text (echo_responses.py); embeddings are
deterministic 16-dimension vectors derived from a hash of each input. Token counts use
the same estimate Tollway bills when a real provider reports none (base.py), and
streaming honours stream_options.include_usage, so the whole billing path runs with
no network and no provider key.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import struct
import time
from typing import Any

import orjson

from tollway.errors import BadRequest
from tollway.providers.base import (
    BYTES_PER_TOKEN,
    UpstreamRequest,
    estimate_prompt_tokens,
    tokens_from_bytes,
)
from tollway.providers.echo_responses import responses
from tollway.providers.openai import OpenAIAdapter

DIMENSIONS = 16


class EchoAdapter(OpenAIAdapter):
    in_process = True


class EchoResponse:
    """An UpstreamResponse over bytes computed in memory."""

    def __init__(self, body: bytes | list[bytes], content_type: str) -> None:
        self.status = 200
        self.headers = [("content-type", content_type)]
        self._parts = [body] if isinstance(body, bytes) else body
        self._next = 0

    async def read(self, limit: int) -> bytes:
        return b"".join(self._parts)  # made here from the request, which max_body_bytes bounds

    async def chunk(self) -> bytes:
        if self._next >= len(self._parts):
            return b""
        self._next += 1
        return self._parts[self._next - 1]

    def at_end(self) -> bool:
        return self._next >= len(self._parts)

    def close(self) -> None:
        self._next = len(self._parts)

    def release(self) -> None:
        self.close()


class EchoTransport:
    async def send(self, request: UpstreamRequest) -> EchoResponse:
        body = orjson.loads(request.body)
        if request.url.endswith("/embeddings"):
            return EchoResponse(orjson.dumps(embeddings(body)), "application/json")
        if request.url.endswith("/responses"):
            answer = responses(body)
            return EchoResponse(answer, "text/event-stream" if isinstance(answer, list) else "application/json")
        chat = request.url.endswith("/chat/completions")
        reply, finish = _reply(body, chat)
        prompt = estimate_prompt_tokens(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens_from_bytes(len(reply.encode())),
                 "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model", "echo")}
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": reply}
            else:
                choice["text"] = reply
            return EchoResponse(orjson.dumps({**head, "choices": [choice], "usage": usage}), "application/json")
        opts = body.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        return EchoResponse(_stream(head, reply, finish, usage if with_usage else None, chat), "text/event-stream")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _reply(body: dict[str, Any], chat: bool) -> tuple[str, str]:
    if chat:
        messages = body.get("messages") or []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        text = _text(users[-1].get("content")) if users else ""
    else:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else _text(prompt)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and len(text.encode()) > limit * BYTES_PER_TOKEN:
        return text.encode()[: limit * BYTES_PER_TOKEN].decode("utf-8", "ignore"), "length"
    return text, "stop"


def _stream(head: dict[str, Any], reply: str, finish: str, usage: dict[str, int] | None,
            chat: bool) -> list[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    extra: dict[str, Any] = {"usage": None} if usage is not None else {}

    def chunk(delta: str | None, reason: str | None, role: bool = False) -> bytes:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": delta} if delta is not None else {})
            choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": reason}
        return b"data: " + orjson.dumps({**head, "object": kind, "choices": [choice], **extra}) + b"\n\n"

    words = reply.split(" ")
    parts = [chunk(None, None, role=True)] if chat else []
    parts += [chunk(w if i == 0 else " " + w, None) for i, w in enumerate(words) if w or i == 0]
    parts.append(chunk(None, finish))
    if usage is not None:
        parts.append(b"data: " + orjson.dumps({**head, "object": kind, "choices": [], "usage": usage}) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return parts


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list):
        inputs = raw
    else:
        raise BadRequest("'input' must be a string or an array", param="input")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(inputs):
        digest = hashlib.sha256(orjson.dumps(item)).digest()
        vector = [(b - 128) / 128 for b in digest[:DIMENSIONS]]
        value: Any = base64.b64encode(struct.pack(f"<{DIMENSIONS}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    prompt = estimate_prompt_tokens(body)
    return {"object": "list", "data": data, "model": body.get("model", "echo"),
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
