"""A provider on loopback that answers what the test scripted, in either wire format.

It serves POST /v1/chat/completions (an OpenAI-format provider whose base_url ends in
/v1) and POST /v1/messages (an Anthropic provider), records every request (headers and
body), and answers each with the next scripted Reply: a JSON body with a status, or SSE
events sent one write each. With nothing scripted it answers 500, so a test that
expected nothing to be forwarded sees it in `requests` and in the answer.
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

from tests.fakes.harness import Gateway


@dataclass
class Reply:
    body: dict[str, Any] | None = None
    status: int = 200
    events: list[bytes] | None = None  # raw SSE events, each sent as it is (terminator included)


def anthropic_event(name: str, **data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


def openai_chunk(delta: dict[str, Any] | None = None, finish: str | None = None, *, usage: Any = None,
                 choices: bool = True) -> bytes:
    data: dict[str, Any] = {"id": "chatcmpl-up1", "object": "chat.completion.chunk", "created": 1,
                            "model": "up-model-2025"}
    data["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage is not None:
        data["usage"] = usage
    return b"data: " + orjson.dumps(data) + b"\n\n"


@dataclass
class Scripted:
    replies: list[Reply] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    url: str = ""  # where the test serves it

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.serve, methods=["POST"]),
                                 Route("/v1/messages", self.serve, methods=["POST"])])

    async def serve(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.requests.append((request.url.path, dict(request.headers), body))
        if not self.replies:
            return Response(b'{"error": {"message": "nothing scripted"}}', status_code=500)
        reply = self.replies.pop(0)
        if reply.events is not None:
            return StreamingResponse(self._events(reply.events), media_type="text/event-stream")
        return Response(orjson.dumps(reply.body), status_code=reply.status, media_type="application/json")

    async def _events(self, events: list[bytes]) -> AsyncIterator[bytes]:
        for event in events:
            yield event
            await asyncio.sleep(0.001)  # one read each, as a provider streaming token by token


def charged(gw: Gateway, request_id: str, charge: int, credit: int) -> dict[str, Any]:
    """Assert the request was charged exactly `charge` on the provider's own usage, with
    nothing left on hold and the books consistent; its usage row."""
    row = gw.usage_row(request_id)
    assert row["cost_micros"] == charge and row["estimated"] is False
    assert gw.balance() == credit - charge
    assert gw.open_reservations() == 0 and gw.verify() == []
    return row
