"""Every /v1 error path: the client gets a clear OpenAI-style error (or SSE error event
once a stream started), and the reservation is released or settled, never left open."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import ServerThread, free_port
from tests.fakes.harness import PROVIDER_KEY, Gateway
from tests.fakes.openai_upstream import FakeOpenAI
from tollway.money import Prices, Usage, cost

PRICES = Prices(Decimal("2.50"), Decimal("10.00"), Decimal("1.25"), Decimal("12.00"))
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI(PROVIDER_KEY)


@pytest.fixture
def gw(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI) -> Gateway:
    return launch(serve_app(fake.app).url,
                         server={"request_timeout_seconds": 2, "stream_idle_timeout_seconds": 1,
                                 "max_body_bytes": 10_000,
                                 # One attempt: these tests read each failure as the provider gave it
                                 # (retries and fallbacks: test_fallback.py).
                                 "retry_attempts": 0})


def post(gw: Gateway, body: Any, path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gw.url + path, content=content, timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json", **headers})


def test_missing_or_wrong_key_is_401(gw: Gateway, fake: FakeOpenAI) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "acme/chat", "messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        gw.client(api_key="ak_" + "x" * 51).chat.completions.create(model="acme/chat", messages=MSG)
    assert fake.requests == []


def test_unknown_model_is_404_model_not_found(gw: Gateway, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        gw.client().chat.completions.create(model="acme/does-not-exist", messages=MSG)
    assert err.value.code == "model_not_found" and "acme/does-not-exist" in err.value.message
    assert fake.requests == [] and gw.open_reservations() == 0


@pytest.mark.parametrize(("body", "fragment", "param"), [
    (b'{"model": "acme/chat", "messages": [', "not valid JSON", None),
    (b"[1, 2]", "must be a JSON object", None),
    (b"", "empty", None),
    ({"messages": MSG}, "Missing required field 'model'", "model"),
    ({"model": 5, "messages": MSG}, "'model' must be", "model"),
    ({"model": "acme/chat"}, "Missing required field 'messages'", "messages"),
    ({"model": "acme/chat", "messages": []}, "non-empty array", "messages"),
    ({"model": "acme/chat", "messages": MSG, "max_tokens": -1}, "'max_tokens' must be a positive integer",
     "max_tokens"),
    ({"model": "acme/chat", "messages": MSG, "n": "2"}, "'n' must be a positive integer", "n"),
    ({"model": "acme/chat", "messages": MSG, "stream": "yes"}, "'stream' must be true or false", "stream"),
    ({"model": "acme/embed", "messages": MSG}, "embedding model", "model"),
])
def test_malformed_requests_are_400_saying_what_is_wrong(gw: Gateway, fake: FakeOpenAI, body: Any,
                                                         fragment: str, param: str | None) -> None:
    r = post(gw, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"
    assert fake.requests == [] and gw.open_reservations() == 0


def test_wrong_endpoint_for_the_model_kind(gw: Gateway) -> None:
    r = post(gw, {"model": "acme/chat", "input": "x"}, "/v1/embeddings")
    assert r.status_code == 400 and "chat model" in r.json()["error"]["message"]
    # (A chat model on /v1/messages is translated: tests/test_translate_messages.py.)
    r = post(gw, {"model": "acme/embed", "max_tokens": 5, "messages": MSG}, "/v1/messages")
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]


def test_body_over_the_limit_is_413_declared_or_not(gw: Gateway, fake: FakeOpenAI) -> None:
    big = orjson.dumps({"model": "acme/chat", "messages": [{"role": "user", "content": "x" * 20_000}]})
    r = post(gw, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Any:  # no content-length: the limit is enforced while reading
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = httpx.post(gw.url + "/v1/chat/completions", content=chunks(), timeout=30,
                   headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"})
    assert r.status_code == 413
    assert fake.requests == [] and gw.open_reservations() == 0


def test_insufficient_balance_is_402_without_retries(launch: Callable[..., Gateway],
                                                     serve_app: Callable[[Any], ServerThread],
                                                     fake: FakeOpenAI) -> None:
    gw = launch(serve_app(fake.app).url, credit_micros=10)
    r = post(gw, {"model": "acme/chat", "messages": MSG})
    assert r.status_code == 402 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "insufficient_quota"
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        gw.client(max_retries=2).chat.completions.create(model="acme/chat", messages=MSG)
    assert err.value.status_code == 402
    assert time.monotonic() - started < 0.45, "the SDK retried (its first backoff is 0.5 s)"
    assert fake.requests == [] and gw.balance() == 10 and gw.verify() == []


def test_spend_limited_key_is_429_without_retries(gw: Gateway, fake: FakeOpenAI) -> None:
    async def limited(svc: Any) -> str:
        created = await svc.keys.create(gw.tenant_id, spend_limit_micros=5, spend_limit_period="day")
        return str(created["key"])

    key = gw.run(limited)
    r = post(gw, {"model": "acme/chat", "messages": MSG}, authorization=f"Bearer {key}")
    assert r.status_code == 429 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "spend_limit_exceeded" and fake.requests == []


def test_upstream_timeout_is_504_and_released(gw: Gateway, fake: FakeOpenAI) -> None:
    before = gw.balance()
    r = post(gw, {"model": "acme/sleep", "messages": MSG})
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert "2 seconds" in r.json()["error"]["message"]
    assert gw.usage_row(r.headers["x-request-id"])["error_type"] == "UpstreamTimeout"
    assert gw.balance() == before and gw.open_reservations() == 0 and gw.verify() == []


def test_stream_whose_headers_never_come_stops_at_the_idle_limit(gw: Gateway, fake: FakeOpenAI) -> None:
    """A stream's idle limit (1 s here) also bounds the wait for the provider's headers,
    before the request's total limit (2 s) would."""
    before = gw.balance()
    started = time.monotonic()
    r = post(gw, {"model": "acme/sleep", "messages": MSG, "stream": True})
    assert 0.9 < time.monotonic() - started < 4  # the message, not the clock, tells the two limits apart
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_stalled"
    assert "sent nothing for 1 seconds" in r.json()["error"]["message"]
    assert gw.balance() == before and gw.open_reservations() == 0 and gw.verify() == []


def test_stream_slower_than_the_idle_limit_in_all_but_no_gap_completes(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread]) -> None:
    """The idle limit is per gap, not per stream: 12 chunks 0.3 s apart (3.6 s in all)
    under a 1 s idle limit arrive whole and are charged from the stream's usage."""
    fake = FakeOpenAI(PROVIDER_KEY, slow_chunks=12, slow_interval=0.3)
    gw = launch(serve_app(fake.app).url, server={"request_timeout_seconds": 30, "stream_idle_timeout_seconds": 1})
    stream = gw.client().chat.completions.with_raw_response.create(model="acme/slow", messages=MSG, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert text == "".join(f" w{i}" for i in range(12))
    row = gw.usage_row(stream.headers["x-request-id"])
    assert row["status"] == 200 and row["estimated"] is False and row["completion_tokens"] == 12


def test_connection_refused_is_502_and_released(launch: Callable[..., Gateway]) -> None:
    gw = launch(f"http://127.0.0.1:{free_port()}")
    before = gw.balance()
    with pytest.raises(openai.InternalServerError) as err:
        gw.client().chat.completions.create(model="acme/chat", messages=MSG)
    assert err.value.status_code == 502 and "Could not connect to the model provider" in err.value.message
    assert "127.0.0.1" not in err.value.message  # provider URLs (account ids) are never shown
    assert gw.balance() == before and gw.open_reservations() == 0 and gw.verify() == []


def test_stalled_stream_gets_an_sse_error_event_and_is_settled(gw: Gateway, fake: FakeOpenAI) -> None:
    stream = gw.client().chat.completions.with_raw_response.create(model="acme/stall", messages=MSG, stream=True)
    received = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        for chunk in stream.parse():
            received.append(chunk)
    assert 0.9 < time.monotonic() - started < 4
    assert "sent nothing for 1 seconds" in err.value.message and len(received) == 1
    assert fake.cancelled.wait(5), "the stalled upstream call was not cancelled"
    row = gw.usage_row(stream.headers["x-request-id"])
    assert row["estimated"] is True and row["error_type"] == "UpstreamTimeout" and row["completion_tokens"] == 2
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_stream_cut_by_the_provider_gets_an_error_event_and_an_estimate(gw: Gateway) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": "acme/cut", "stream": True, "messages": MSG}, timeout=30) as resp:
        rid = resp.headers["x-request-id"]
        body = resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert b"[DONE]" not in body
    last = orjson.loads(events[-1][6:])
    assert last["error"]["type"] == "upstream_error"
    row = gw.usage_row(rid)
    assert row["estimated"] is True and row["cost_micros"] > 0 and gw.verify() == []


@pytest.fixture
def gw_both(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI,
            backend: dict[str, Any]) -> Gateway:
    return launch(serve_app(fake.app).url, **backend)


def test_client_disconnect_reads_on_for_the_providers_usage_and_bills_it(gw_both: Gateway,
                                                                       fake: FakeOpenAI) -> None:
    gw = gw_both
    before = gw.balance()
    read = b""
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": "acme/slow", "stream": True, "messages": MSG}, timeout=30) as resp:
        rid = resp.headers["x-request-id"]
        for part in resp.iter_raw():
            read += part
            if read.count(b"\n\n") >= 5:
                break
    row = gw.usage_row(rid, wait=30)
    # The stream was read to its end without the client (docs/proxy.md): the provider's usage.
    assert row["status"] == 499 and row["error_type"] == "client_disconnected" and row["estimated"] is False
    assert fake.chunks_sent == fake.slow_chunks and not fake.cancelled.is_set()
    charged = cost(Usage(17, fake.slow_chunks, 5, reasoning_tokens=3), PRICES)
    assert row["completion_tokens"] == fake.slow_chunks and row["cost_micros"] == charged
    assert gw.balance() == before - charged
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_provider_without_a_key_is_503_and_nothing_is_reserved(launch: Callable[..., Gateway],
                                                              serve_app: Callable[[Any], ServerThread],
                                                              fake: FakeOpenAI) -> None:
    gw = launch(serve_app(fake.app).url, provider_keys={})
    r = post(gw, {"model": "acme/chat", "messages": MSG})
    assert r.status_code == 503 and "no key configured" in r.json()["error"]["message"]
    assert fake.requests == [] and gw.open_reservations() == 0
    echo = post(gw, {"model": "demo/echo", "messages": MSG})  # the in-process provider needs no key
    assert echo.status_code == 200
