"""A fake OpenAI-compatible provider that generates as much as it is allowed to.

Model `fake-greedy` answers with as many completion tokens as the request's output bound
allows (`max_completion_tokens`, else `max_tokens`, times `n`), and UNBOUNDED per choice
when the request sets none: what a real provider does with a long answer. Model
`fake-liar` reports ten times that whatever the bound said: a broken provider. Each
answer waits `delay` seconds, so concurrent requests overlap. `billed` keeps what each
answer reported, by the provider's response id, so a test can compare what the gateway
charged with what the provider would bill.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tests.fakes.openai_upstream import FakeOpenAI, Recorded

UNBOUNDED = 50_000
GREEDY_PROMPT_TOKENS = 20


@dataclass
class FakeGreedy(FakeOpenAI):
    delay: float = 0.3
    billed: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (prompt, completion)
    _ids: Any = field(default_factory=itertools.count)

    async def chat(self, request: Request) -> Response:
        raw = await request.body()
        body = orjson.loads(raw)
        if body.get("model") not in ("fake-greedy", "fake-liar"):
            return await super().chat(request)  # Starlette keeps the body it read
        self.requests.append(Recorded(request.url.path, list(request.headers.items()), body, raw))
        per_choice = body.get("max_completion_tokens") or body.get("max_tokens") or UNBOUNDED
        completion = per_choice * (body.get("n") or 1)
        if body["model"] == "fake-liar":
            completion *= 10
        await asyncio.sleep(self.delay)
        rid = f"chatcmpl-{next(self._ids)}"
        self.billed[rid] = (GREEDY_PROMPT_TOKENS, completion)
        out = {"id": rid, "object": "chat.completion", "created": 1, "model": body["model"],
               "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                            "message": {"role": "assistant", "content": "many words"}}],
               "usage": {"prompt_tokens": GREEDY_PROMPT_TOKENS, "completion_tokens": completion,
                         "total_tokens": GREEDY_PROMPT_TOKENS + completion}}
        return Response(orjson.dumps(out), media_type="application/json")
