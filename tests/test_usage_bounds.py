"""A provider's usage report is bounded (providers/base.py `count`): a count that is not a
whole number of tokens in [0, MAX_TOKENS] is a provider error, and the answer, delivered,
is charged its reservation (docs/proxy.md). Before, a count of 2^63 stopped every journal
flush and every restart (SQLite) or failed the settle and went free (PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import ServerThread
from tests.fakes.harness import Gateway
from tollway.money import Prices, Usage, cost, format_usd, max_cost
from tollway.providers.base import MAX_TOKENS, InvalidUsage, count
from tollway.providers.openai import parse_usage

PRICES = Prices(Decimal("2.50"), Decimal("10.00"), Decimal("1.25"), Decimal("12.00"))
GOOD = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}


@pytest.mark.parametrize("value", [-1, 1.5, 7.0, True, "12", MAX_TOKENS + 1, 2**31, 2**63, 2**64, [3], {}])
def test_a_count_out_of_bounds_is_a_provider_error(value: Any) -> None:
    with pytest.raises(InvalidUsage) as caught:
        count(value, "completion_tokens")
    assert caught.value.instance_code == "upstream_invalid_usage" and caught.value.status == 502
    with pytest.raises(InvalidUsage):
        parse_usage({**GOOD, "completion_tokens_details": {"reasoning_tokens": value}})


def test_a_count_in_bounds_is_itself_and_absent_is_zero() -> None:
    assert [count(v) for v in (None, 0, 5, MAX_TOKENS)] == [0, 0, 5, MAX_TOKENS]
    assert parse_usage({**GOOD, "prompt_tokens_details": None}) == Usage(12, 7)


class Upstream:
    """An OpenAI-style provider whose usage report the test sets."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = GOOD

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        head = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return JSONResponse({**head, "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": "hello there"}}],
                                 "usage": self.usage})

        async def events() -> AsyncIterator[bytes]:
            for word in ("hello", " there"):
                yield b"data: " + orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": word}}],
                                                "usage": None}) + b"\n\n"
            yield b"data: " + orjson.dumps({**head, "choices": [], "usage": self.usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def _ask(gw: Gateway, stream: bool) -> tuple[httpx.Response, int]:
    """One request with a body of known size; returns the response and its reservation."""
    raw = orjson.dumps({"model": "acme/chat", "max_tokens": 40, "stream": stream,
                        "messages": [{"role": "user", "content": "say hello"}]})
    resp = httpx.post(gw.url + "/v1/chat/completions", content=raw, timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"})
    return resp, max_cost(len(raw), 40, PRICES)


def test_an_absurd_count_is_charged_the_reservation_and_billing_goes_on(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], backend: dict[str, Any]) -> None:
    upstream = Upstream()
    gw = launch(serve_app(upstream.app()).url, **backend)
    start = gw.balance()
    upstream.usage = {"prompt_tokens": 12, "completion_tokens": 2**63, "total_tokens": 2**63 + 12}
    resp, reserved = _ask(gw, stream=False)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "hello there"
    assert resp.headers["x-tollway-cost-usd"] == format_usd(reserved)
    row = gw.usage_row(resp.headers["x-request-id"])
    assert row["cost_micros"] == reserved and row["estimated"] is True and row["error_type"] == "InvalidUsage"
    assert 0 < row["completion_tokens"] < 100
    assert gw.balance() == start - reserved

    upstream.usage = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
                      "completion_tokens_details": {"reasoning_tokens": -5}}
    resp, reserved_too = _ask(gw, stream=True)
    assert resp.status_code == 200 and b"hello" in resp.content and resp.content.endswith(b"data: [DONE]\n\n")
    assert gw.usage_row(resp.headers["x-request-id"])["cost_micros"] == reserved_too
    assert gw.balance() == start - reserved - reserved_too

    upstream.usage = GOOD  # the next answers are billed as ever
    resp, _ = _ask(gw, stream=False)
    normal = cost(Usage(12, 7), PRICES)
    assert resp.headers["x-tollway-cost-usd"] == format_usd(normal)
    assert gw.usage_row(resp.headers["x-request-id"])["cost_micros"] == normal
    assert gw.balance() == start - reserved - reserved_too - normal
    assert gw.verify() == []
