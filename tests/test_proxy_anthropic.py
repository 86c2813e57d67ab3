"""POST /v1/messages through Tollway with the official anthropic client: key custody,
model mapping, and metering with cache tokens priced apart (integrations.md 4.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import ServerThread
from tests.fakes.anthropic_upstream import CACHE_READ, CACHE_WRITE, INPUT, OUTPUT, WORDS, FakeAnthropic
from tests.fakes.harness import ANTHROPIC_KEY, Gateway, launcher
from tests.fakes.openai_upstream import FakeOpenAI
from tollway.config import Config
from tollway.money import Prices, Usage, cost, format_usd

CLAUDE_PRICES = {"input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00",
                 "cached_input_usd_per_mtok": "0.30", "cache_write_usd_per_mtok": "3.75"}
PRICES = Prices(Decimal("3.00"), Decimal("15.00"), cached_input=Decimal("0.30"), cache_write=Decimal("3.75"))
EXPECTED = cost(Usage(INPUT + CACHE_READ + CACHE_WRITE, OUTPUT, cached_tokens=CACHE_READ,
                      cache_write_tokens=CACHE_WRITE), PRICES)
MSG = [{"role": "user", "content": "Salut"}]


@pytest.fixture
def fake() -> FakeAnthropic:
    return FakeAnthropic(ANTHROPIC_KEY)


@pytest.fixture
def gw(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
       fake: FakeAnthropic) -> Iterator[Gateway]:
    models = [{"id": f"anthropic/{n}", "provider": "claude", "upstream": f"fake-claude-{n}", **CLAUDE_PRICES}
              for n in ("sonnet", "cut", "overloaded")]
    models.append({"id": "acme/chat", "provider": "fake", "upstream": "fake-chat",
                   "input_usd_per_mtok": "1", "output_usd_per_mtok": "1"})
    for launch in launcher(make_config, serve_app):
        yield launch(serve_app(FakeOpenAI("unused").app).url, models=models, anthropic_url=serve_app(fake.app).url)


def client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def test_messages_non_streaming(gw: Gateway, fake: FakeAnthropic) -> None:
    with client(gw) as c:
        raw = c.messages.with_raw_response.create(model="anthropic/sonnet", max_tokens=100, messages=MSG)
    msg = raw.parse()
    assert msg.model == "anthropic/sonnet" and msg.content[0].text == "".join(WORDS)
    assert raw.headers["x-tollway-cost-usd"] == format_usd(EXPECTED)
    row = gw.usage_row(raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
        INPUT + CACHE_READ + CACHE_WRITE, CACHE_READ, OUTPUT)
    assert row["cost_micros"] == EXPECTED
    headers, body = fake.requests[-1]
    h = dict(headers)
    assert h["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in h and "ak_" not in repr(headers) and body["model"] == "fake-claude-sonnet"


def test_messages_streaming_uses_the_final_cumulative_usage(gw: Gateway) -> None:
    with client(gw) as c, c.messages.stream(model="anthropic/sonnet", max_tokens=100, messages=MSG) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["x-request-id"]
    assert text == "".join(WORDS) and final.model == "anthropic/sonnet"
    assert final.usage.output_tokens == OUTPUT
    row = gw.usage_row(rid)
    assert row["cost_micros"] == EXPECTED and row["estimated"] is False
    assert gw.verify() == []


def test_messages_stream_cut_after_start_bills_known_input_plus_estimated_output(gw: Gateway) -> None:
    with (client(gw) as c, pytest.raises(anthropic.APIError) as err,
          c.messages.stream(model="anthropic/cut", max_tokens=100, messages=MSG) as stream):
        rid = stream.response.headers["x-request-id"]
        for _ in stream.text_stream:
            pass
    assert "closed the stream" in str(err.value)
    row = gw.usage_row(rid)
    text_tokens = -(-len("".join(WORDS)) // 4)
    assert row["estimated"] is True and row["prompt_tokens"] == INPUT + CACHE_READ + CACHE_WRITE
    assert row["completion_tokens"] == text_tokens and gw.verify() == []


def test_upstream_overloaded_error_is_mapped_and_scrubbed(gw: Gateway) -> None:
    r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": gw.key, "anthropic-version": "2023-06-01"},
                   json={"model": "anthropic/overloaded", "max_tokens": 5, "messages": MSG})
    assert r.status_code == 502 and "HTTP 529" in r.json()["error"]["message"]
    assert ANTHROPIC_KEY not in r.text and ANTHROPIC_KEY[-10:] not in r.text
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_client_anthropic_version_is_forwarded_or_defaulted(gw: Gateway, fake: FakeAnthropic) -> None:
    for sent, expected in (({"anthropic-version": "2099-01-01"}, "2099-01-01"), ({}, "2023-06-01")):
        r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": gw.key, **sent},
                       json={"model": "anthropic/sonnet", "max_tokens": 5, "messages": MSG})
        assert r.status_code == 200 and r.json()["model"] == "anthropic/sonnet"
        assert dict(fake.requests[-1][0])["anthropic-version"] == expected


def test_messages_require_max_tokens_and_a_generation_endpoint(gw: Gateway) -> None:
    h = {"x-api-key": gw.key}
    r = httpx.post(gw.url + "/v1/messages", headers=h, json={"model": "anthropic/sonnet", "messages": MSG})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"  # Anthropic's shape
    # Chat completions are translated (tests/test_translate_chat.py); legacy completions are not.
    r = httpx.post(gw.url + "/v1/completions", headers=h, json={"model": "anthropic/sonnet", "prompt": "Hi"})
    assert r.status_code == 400 and "/v1/messages" in r.json()["error"]["message"]
