"""Fallbacks and retries (docs/proxy.md): a provider failing before any byte reached the
client is retried within bounds, then the next fallback serves, once, billed at its own
prices; after the first byte, nothing is tried again. Real gateway under uvicorn, fake
providers on loopback whose answers follow a script, on both stacks."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import ServerThread, free_port
from tests.fakes.harness import Gateway
from tollway.config import Secret
from tollway.money import Prices, Usage, cost, max_cost

KEY_A = "sk-prov-a-4Hq9Wz7Lm2Xc5Vb8Nr1Ty6Ui3Op0As"
KEY_B = "sk-prov-b-7Jk2Mn5Bv8Cx1Zl4Qw9Er6Ty3Ui0Pa"
MSG = [{"role": "user", "content": "Please answer in a few words, and take your time to think about it."}]
PROMPT, COMPLETION = 11, 7  # what the scripted provider reports
WINDOW = 40  # max_input_tokens of every model here: the prompt bound of these requests (their body is longer)
PRICES_A = {"input_usd_per_mtok": "1.00", "output_usd_per_mtok": "2.00"}
PRICES_B = {"input_usd_per_mtok": "3.00", "output_usd_per_mtok": "7.50"}
COST_B = 86  # micro-USD: 11 x 3.00 + 7 x 7.50 = 85.5, rounded up once
OUT_A, OUT_B = 100, 300  # max_output_tokens: each model's body carries its own


@dataclass
class Scripted:
    """An OpenAI-type provider whose answers, per upstream model, follow a script: each
    request takes the next step; the last step repeats. Steps: "ok", "cut" (a stream's
    first chunk, then the connection drops), or (status, headers) for an error whose body
    quotes the provider key it was sent."""

    script: dict[str, list[Any]] = field(default_factory=dict)
    hits: dict[str, list[float]] = field(default_factory=dict)  # model -> monotonic times
    seen: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    def count(self, model: str) -> int:
        return len(self.hits.get(model, []))

    async def chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        model = body["model"]
        with self.lock:
            self.hits.setdefault(model, []).append(time.monotonic())
            self.seen.append((model, dict(request.headers), body))
            steps = self.script.setdefault(model, ["ok"])
            step = steps.pop(0) if len(steps) > 1 else steps[0]
        if isinstance(step, tuple):
            status, headers = step
            sent = request.headers.get("authorization", "")
            err = {"error": {"message": f"failed for key {sent}", "type": "server_error", "code": f"e{status}"}}
            return Response(orjson.dumps(err), status_code=status, headers=headers, media_type="application/json")
        usage = {"prompt_tokens": PROMPT, "completion_tokens": COMPLETION, "total_tokens": PROMPT + COMPLETION}
        if not body.get("stream"):
            return Response(orjson.dumps({
                "id": "c1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Fine."},
                             "finish_reason": "stop"}],
                "usage": usage}), media_type="application/json")
        return StreamingResponse(self._stream(model, step == "cut", usage), media_type="text/event-stream")

    async def _stream(self, model: str, cut: bool, usage: dict[str, Any]) -> AsyncIterator[bytes]:
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model}
        for i, word in enumerate(("Fi", "ne.")):
            yield b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "delta": {"content": word},
                                                                 "finish_reason": None}]}) + b"\n\n"
            if cut and i == 0:
                raise ConnectionResetError  # uvicorn drops the connection mid-body
        yield b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                                       ) + b"\n\n"
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"


def model(slug: str, upstream: str, prices: dict[str, str], out: int, provider: str = "a",
          fallbacks: list[str] | None = None) -> dict[str, Any]:
    m = {"id": slug, "provider": provider, "upstream": upstream, **prices, "max_output_tokens": out,
         "max_input_tokens": WINDOW}
    if fallbacks:
        m["fallbacks"] = fallbacks
    return m


@pytest.fixture
def providers() -> tuple[Scripted, Scripted]:
    return Scripted(), Scripted()


def start(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], a: Scripted, b: Scripted,
          backend: dict[str, Any], *, a_url: str | None = None, credit: int = 10_000_000,
          server: dict[str, Any] | None = None) -> Gateway:
    """acme/a on provider a (KEY_A) falls back to acme/b on provider b (KEY_B); acme/solo has none."""
    b_url = serve_app(b.app).url
    models = [model("acme/a", "up-a", PRICES_A, OUT_A, fallbacks=["acme/b"]),
              model("acme/b", "up-b", PRICES_B, OUT_B, provider="b"),
              model("acme/solo", "up-solo", PRICES_A, OUT_A)]
    extra = {"a": ({"type": "openai", "base_url": (a_url or serve_app(a.app).url) + "/v1", "api_key_env": "KEY_A"},
                   Secret("KEY_A", KEY_A)),
             "b": ({"type": "openai", "base_url": b_url + "/v1", "api_key_env": "KEY_B"}, Secret("KEY_B", KEY_B))}
    settings = {"retry_attempts": 1, "retry_backoff_ms": 20, "retry_after_cap_seconds": 2, **(server or {})}
    return launch(b_url, models=models, extra_providers=extra, credit_micros=credit,
                  server=settings, attribution=None, **backend)


def post(gw: Gateway, slug: str, stream: bool = False, timeout: float = 30) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": slug, "messages": MSG, "stream": stream}, timeout=timeout)


def assert_settled(gw: Gateway, start_balance: int, charged: int) -> None:
    assert gw.balance() == start_balance - charged
    assert gw.held() == 0 and gw.open_reservations() == 0
    assert gw.verify() == []


def assert_no_key(text: str) -> None:
    for key in (KEY_A, KEY_B):
        assert not any(key[i:i + 8] in text for i in range(len(key) - 7)), text


# --- the acceptance cases -------------------------------------------------------------------


def test_a_503_falls_back_once_billed_at_the_fallbacks_prices(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], backend: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-a"] = [(503, {})]
    gw = start(launch, serve_app, a, b, backend)
    before = gw.balance()
    r = post(gw, "acme/a")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "acme/b"
    assert r.headers["x-tollway-model"] == "acme/b" and r.headers["x-tollway-attempts"] == "3"
    assert a.count("up-a") == 2 and b.count("up-b") == 1  # one retry of acme/a, then acme/b once
    assert COST_B == cost(Usage(prompt_tokens=PROMPT, completion_tokens=COMPLETION),
                          Prices(Decimal("3.00"), Decimal("7.50"))) == 86
    assert r.headers["x-tollway-cost-usd"] == "0.000086"
    row = gw.usage_row(r.headers["x-request-id"])
    assert (row["model"], row["requested_model"], row["provider"], row["attempts"]) == ("acme/b", "acme/a", "b", 3)
    assert row["cost_micros"] == COST_B and row["status"] == 200 and row["estimated"] is False
    # Each candidate got its own upstream name, output bound and key, and only its own.
    (_, ha, ba), (_, hb, bb) = a.seen[0], b.seen[0]
    assert (ba["model"], ba["max_tokens"], ha["authorization"]) == ("up-a", OUT_A, f"Bearer {KEY_A}")
    assert (bb["model"], bb["max_tokens"], hb["authorization"]) == ("up-b", OUT_B, f"Bearer {KEY_B}")
    assert_settled(gw, before, COST_B)

    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": "acme/a", "messages": MSG, "stream": True}, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-tollway-model"] == "acme/b" and resp.headers["x-tollway-attempts"] == "3"
        text = resp.read().decode()
        rid = resp.headers["x-request-id"]
    events = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events and all(e["model"] == "acme/b" for e in events) and text.rstrip().endswith("[DONE]")
    assert a.count("up-a") == 4 and b.count("up-b") == 2
    row = gw.usage_row(rid)
    assert (row["model"], row["attempts"], row["cost_micros"]) == ("acme/b", 3, COST_B)
    assert_settled(gw, before, 2 * COST_B)


def test_a_429_retry_after_is_honoured_up_to_the_cap_then_the_fallback_serves(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], backend: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-a"] = [(429, {"retry-after": "1"}), (429, {"retry-after-ms": "30000"})]
    gw = start(launch, serve_app, a, b, backend, server={"retry_attempts": 2})
    before = gw.balance()
    started = time.monotonic()
    r = post(gw, "acme/a")
    took = time.monotonic() - started
    assert r.status_code == 200 and r.json()["model"] == "acme/b"
    first, second = a.hits["up-a"]
    assert 1.0 <= second - first <= 2.0  # waited the provider's second, within the 2 s cap
    # The second 429 asked for 30 s, above the cap: acme/b at once, not after a wait.
    assert b.hits["up-b"][0] - second < 0.5 and took < 2.5
    row = gw.usage_row(r.headers["x-request-id"])
    assert (row["model"], row["requested_model"], row["attempts"], row["cost_micros"]) == ("acme/b", "acme/a", 3,
                                                                                         COST_B)
    assert_settled(gw, before, COST_B)


def test_a_refused_connection_falls_back(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], backend: dict[str, Any]) -> None:
    a, b = providers
    gw = start(launch, serve_app, a, b, backend, a_url=f"http://127.0.0.1:{free_port()}")  # nothing listens
    before = gw.balance()
    r = post(gw, "acme/a")
    assert r.status_code == 200 and r.json()["model"] == "acme/b"
    assert r.headers["x-tollway-attempts"] == "3" and b.count("up-b") == 1
    row = gw.usage_row(r.headers["x-request-id"])
    assert (row["model"], row["attempts"], row["cost_micros"]) == ("acme/b", 3, COST_B)
    assert_settled(gw, before, COST_B)


def test_a_stream_failing_after_its_first_byte_is_not_tried_again(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], backend: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-a"] = ["cut"]
    gw = start(launch, serve_app, a, b, backend)
    before = gw.balance()
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": "acme/a", "messages": MSG, "stream": True}, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["x-tollway-model"] == "acme/a"
        text = resp.read().decode()
        rid = resp.headers["x-request-id"]
    last = orjson.loads(text.strip().splitlines()[-1][6:])
    assert "error" in last and '"Fi"' in text and "[DONE]" not in text
    time.sleep(0.3)
    assert a.count("up-a") == 1 and b.count("up-b") == 0  # no retry, no fallback
    row = gw.usage_row(rid)
    assert (row["model"], row["requested_model"], row["attempts"]) == ("acme/a", "acme/a", 1)
    assert row["estimated"] is True and row["cost_micros"] > 0  # what was delivered, at acme/a's prices
    assert_settled(gw, before, row["cost_micros"])


def test_retries_are_bounded_and_a_call_failing_everywhere_costs_nothing(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], backend: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-a"] = [(503, {})]
    a.script["up-solo"] = [(500, {})]
    b.script["up-b"] = [(502, {})]
    gw = start(launch, serve_app, a, b, backend, server={"retry_attempts": 2})
    before = gw.balance()
    for stream in (False, True):
        r = post(gw, "acme/a", stream=stream)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
        assert "HTTP 502" in r.json()["error"]["message"]  # the last failure's, acme/b's
        assert_no_key(r.text + repr(r.headers))
        row = gw.usage_row(r.headers["x-request-id"])
        assert (row["model"], row["requested_model"], row["attempts"], row["cost_micros"]) == ("acme/b", "acme/a",
                                                                                             6, 0)
    assert a.count("up-a") == 6 and b.count("up-b") == 6  # 1 + 2 retries each, per request
    r = post(gw, "acme/solo")
    assert r.status_code == 502 and a.count("up-solo") == 3
    assert gw.usage_row(r.headers["x-request-id"])["attempts"] == 3
    assert_settled(gw, before, 0)


def test_a_400_is_neither_retried_nor_sent_to_a_fallback(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], backend: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-a"] = [(400, {})]
    gw = start(launch, serve_app, a, b, backend)
    before = gw.balance()
    r = post(gw, "acme/a")
    assert r.status_code == 400 and a.count("up-a") == 1 and b.count("up-b") == 0
    assert_no_key(r.text)
    row = gw.usage_row(r.headers["x-request-id"])
    assert (row["model"], row["attempts"], row["cost_micros"]) == ("acme/a", 1, 0)
    assert_settled(gw, before, 0)


def test_the_reservation_covers_the_most_expensive_candidate(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], backend: dict[str, Any]) -> None:
    a, b = providers
    most = max(max_cost(WINDOW, OUT_A, Prices(Decimal("1.00"), Decimal("2.00"))),
               max_cost(WINDOW, OUT_B, Prices(Decimal("3.00"), Decimal("7.50"))))
    assert most == 2370  # acme/b's (40 x 3.00 + 300 x 7.50), though acme/a is asked for
    gw = start(launch, serve_app, a, b, backend, credit=most - 1)
    r = post(gw, "acme/a")
    assert r.status_code == 402 and a.count("up-a") == 0 and b.count("up-b") == 0
    assert post(gw, "acme/solo").status_code == 200  # without fallbacks, its own bound
    assert gw.open_reservations() == 0 and gw.verify() == []


# --- more ways to fail --------------------------------------------------------------------------


def test_credentials_refused_move_on_to_the_fallback_without_a_retry(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], embedded: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-a"] = [(401, {})]
    gw = start(launch, serve_app, a, b, embedded)
    r = post(gw, "acme/a")
    assert r.status_code == 200 and a.count("up-a") == 1 and b.count("up-b") == 1
    assert r.headers["x-tollway-attempts"] == "2"


def test_the_provider_saying_do_not_retry_is_obeyed(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], embedded: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-solo"] = [(503, {"x-should-retry": "false"})]
    gw = start(launch, serve_app, a, b, embedded, server={"retry_attempts": 3})
    assert post(gw, "acme/solo").status_code == 502 and a.count("up-solo") == 1


def test_a_client_leaving_during_a_wait_stops_the_call_and_pays_nothing(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], embedded: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-a"] = [(429, {"retry-after": "2"})]
    gw = start(launch, serve_app, a, b, embedded, server={"retry_after_cap_seconds": 5})
    before = gw.balance()
    with pytest.raises(httpx.ReadTimeout):
        post(gw, "acme/a", timeout=0.5)
    time.sleep(2.5)  # past the wait: nothing more was sent
    assert a.count("up-a") == 1 and b.count("up-b") == 0
    assert_settled(gw, before, 0)


def test_retries_stay_within_the_calls_timeout(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], embedded: dict[str, Any]) -> None:
    a, b = providers
    a.script["up-solo"] = [(503, {"retry-after": "1.2"})]
    gw = start(launch, serve_app, a, b, embedded,
               server={"retry_attempts": 5, "retry_after_cap_seconds": 5, "request_timeout_seconds": 2})
    started = time.monotonic()
    r = post(gw, "acme/solo")
    assert r.status_code == 502 and time.monotonic() - started < 2.0
    assert a.count("up-solo") == 2  # a second wait of 1.2 s would end past the 2 s deadline


def test_without_fallbacks_the_answer_names_its_model_too(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], embedded: dict[str, Any]) -> None:
    a, b = providers
    gw = start(launch, serve_app, a, b, embedded)
    r = post(gw, "acme/solo")
    assert r.status_code == 200 and r.json()["model"] == "acme/solo"
    assert r.headers["x-tollway-model"] == "acme/solo" and r.headers["x-tollway-attempts"] == "1"
    row = gw.usage_row(r.headers["x-request-id"])
    assert (row["model"], row["requested_model"], row["attempts"]) == ("acme/solo", "acme/solo", 1)


def test_a_model_whose_provider_has_no_key_is_skipped(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread],
        providers: tuple[Scripted, Scripted], embedded: dict[str, Any]) -> None:
    _, b = providers
    b_url = serve_app(b.app).url
    keyless = {"type": "openai", "base_url": b_url + "/v1", "api_key_env": "KEY_NONE"}
    models = [model("acme/nokey", "up-nokey", PRICES_A, OUT_A, provider="c", fallbacks=["acme/b"]),
              model("acme/b", "up-b", PRICES_B, OUT_B, provider="b"),
              model("acme/a", "up-a", PRICES_A, OUT_A, provider="b", fallbacks=["acme/nokey"])]
    extra = {"b": ({"type": "openai", "base_url": b_url + "/v1", "api_key_env": "KEY_B"}, Secret("KEY_B", KEY_B)),
             "c": (keyless, None)}
    gw = launch(b_url, models=models, extra_providers=extra, attribution=None, **embedded)
    before = gw.balance()
    r = post(gw, "acme/nokey")
    assert r.status_code == 200 and r.json()["model"] == "acme/b" and r.headers["x-tollway-attempts"] == "1"
    assert b.count("up-nokey") == 0 and b.count("up-b") == 1
    row = gw.usage_row(r.headers["x-request-id"])
    assert (row["model"], row["requested_model"], row["attempts"], row["cost_micros"]) == ("acme/b", "acme/nokey",
                                                                                         1, COST_B)
    b.script["up-a"] = [(503, {})]
    r = post(gw, "acme/a")  # its only fallback has no key: its own failure, after its retry
    assert r.status_code == 502 and b.count("up-a") == 2 and b.count("up-nokey") == 0
    assert_settled(gw, before, COST_B)
