"""Per-key rate limits when scaled out: one limit for a key across 4 worker processes on
PostgreSQL + Redis, and what a Redis outage does (the gateway keeps serving, each worker
limits on its own, and the shared limit is back once Redis is).

The outage is made with a TCP relay in front of Redis that the test closes and reopens:
the shared Redis itself is never stopped or flushed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import REDIS_URL, ServerThread, free_port, fresh_pg_database, need_redis
from tests.fakes.harness import PROVIDER_KEY, Gateway
from tests.fakes.openai_upstream import PROMPT_TOKENS, REPLY_WORDS, FakeOpenAI
from tests.test_scaleout import Gateway as Workers
from tests.test_scaleout import gateway  # noqa: F401  (the 4-worker gateway, one per module)
from tollway.proxy import ratelimit
from tollway.services import Services

pytestmark = pytest.mark.slow


def _limited(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit-")}


def _post(url: str, key: str, model: str = "demo/echo") -> httpx.Response:
    # A new connection each time, so that requests land on different workers.
    return httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}", "connection": "close"},
                      json={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "ping"}]},
                      timeout=30)


def test_a_key_limited_to_3_a_minute_is_limited_across_4_workers(gateway: Workers) -> None:  # noqa: F811
    tid, _ = gateway.tenant_with_keys("5.00", keys=0)
    limited = gateway.admin("POST", f"/tenants/{tid}/keys", json={"requests_per_minute": 3})["key"]
    other = gateway.admin("POST", f"/tenants/{tid}/keys", json={"requests_per_minute": 3})["key"]
    answers = [_post(gateway.url, limited) for _ in range(6)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429, 429], [r.text for r in answers]
    assert [_limited(r)["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0", "0", "0", "0"]
    assert all(_limited(r)["x-ratelimit-limit-requests"] == "3" for r in answers)
    assert all(1 <= int(r.headers["retry-after"]) <= 20 for r in answers[3:])
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in answers[3:])
    assert [_post(gateway.url, other).status_code for _ in range(3)] == [200, 200, 200]


async def test_a_burst_over_4_workers_admits_exactly_the_limit(gateway: Workers) -> None:  # noqa: F811
    tid, _ = gateway.tenant_with_keys("5.00", keys=0)
    key = gateway.admin("POST", f"/tenants/{tid}/keys", json={"requests_per_minute": 5})["key"]
    answers = await asyncio.gather(*(asyncio.to_thread(_post, gateway.url, key) for _ in range(16)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 5 + [429] * 11
    debits = gateway.sql("SELECT count(*) AS n FROM ledger_entries WHERE tenant_id = $1 AND kind = 'debit'", tid)
    assert debits[0]["n"] == 5, "only admitted requests are charged"


def _raw(url: str, key: str, body: bytes) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=body, timeout=30,
                      headers={"authorization": f"Bearer {key}", "connection": "close",
                               "content-type": "application/json"})


def test_a_key_over_its_limit_gets_429_whatever_body_it_sends(gateway: Workers) -> None:  # noqa: F811
    """The limit is checked before the body is read: a key over it gets its 429 whatever it
    sent (a bad or huge body included), and a refused body still counts as a request."""
    tid, _ = gateway.tenant_with_keys("5.00", keys=0)
    key = gateway.admin("POST", f"/tenants/{tid}/keys", json={"requests_per_minute": 2})["key"]
    big = orjson.dumps({"model": "demo/echo", "messages": [{"role": "user", "content": "a" * 100_000}]})
    within = [_raw(gateway.url, key, b"{not json"), _raw(gateway.url, key, b'{"model": "no/such", "messages": []}')]
    assert [r.status_code for r in within] == [400, 404], [r.text for r in within]
    assert [_limited(r)["x-ratelimit-remaining-requests"] for r in within] == ["1", "0"], "a refused body counts"
    over = [_raw(gateway.url, key, b"{not json"), _raw(gateway.url, key, b'{"model": "no/such", "messages": []}'),
            _raw(gateway.url, key, big), _post(gateway.url, key)]
    assert [r.status_code for r in over] == [429] * 4, [r.text[:200] for r in over]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in over)
    assert all(_limited(r)["x-ratelimit-remaining-requests"] == "0" for r in over)
    debits = gateway.sql("SELECT count(*) AS n FROM ledger_entries WHERE tenant_id = $1", tid)
    assert debits[0]["n"] == 1, "only the seed credit: nothing refused was reserved or charged"


def test_tokens_per_minute_across_4_workers(gateway: Workers) -> None:  # noqa: F811
    tid, _ = gateway.tenant_with_keys("5.00", keys=0)
    tpm = 60
    rate = tpm / 60_000  # tokens refilled a millisecond
    key = gateway.admin("POST", f"/tenants/{tid}/keys", json={"tokens_per_minute": tpm})["key"]
    used: list[int] = []
    spans: list[tuple[float, float]] = []  # (sent, answered), ms
    for _ in range(40):
        sent = time.monotonic() * 1000
        r = _post(gateway.url, key)
        spans.append((sent, time.monotonic() * 1000))
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        used.append(r.json()["usage"]["total_tokens"])
        time.sleep(0.3)  # each worker sends its token counts to Redis within 0.1 s
    else:
        raise AssertionError("never limited")
    assert "tokens per min (TPM)" in r.json()["error"]["message"]
    # What the window held is what was used less what refilled since the first call (the
    # bucket never ran empty). Bounded by the times each call was sent and answered:
    # the last call admitted found less than the limit; the refused one found it reached.
    # Counts reach Redis up to 0.1 s after the settle, on the wall clock: the window's
    # refill is known to 0.2 s (0.2 tokens here), and 9 calls of 7 tokens against 60 a
    # minute land on the limit within that, so the refusal is checked with that slack.
    first_answered, last_answered, refused_sent = spans[0][1], spans[-2][1], spans[-1][0]
    slack = 200 * rate
    assert sum(used[:-1]) - (last_answered - spans[0][0]) * rate < tpm + slack, used
    assert sum(used) - (refused_sent - first_answered) * rate >= tpm - slack, used


# --- a Redis outage --------------------------------------------------------------------------------


class TcpRelay:
    """127.0.0.1:port -> Redis, in a thread of its own; `close()` drops the listener and
    every connection (what a Redis crash looks like to the gateway), `open()` restores it."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target = free_port(), target_port
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def open(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._call(start())

    def close(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                self.server.close()
            for w in self.writers:
                w.close()
            self.writers.clear()
            await asyncio.sleep(0.1)  # the closes reach both ends before close() returns

        self._call(stop())

    def shut(self) -> None:
        self.close()

        async def settle() -> None:
            if self.server is not None:
                await self.server.wait_closed()
            await asyncio.sleep(0.05)  # the pipes see their connections closed and end

        self._call(settle())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture
def relay() -> Iterator[TcpRelay]:
    need_redis()
    r = TcpRelay(int(REDIS_URL.rsplit(":", 1)[1].split("/")[0]))
    r.open()
    yield r
    r.shut()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


def test_redis_outage_keeps_serving_and_limits_per_worker_then_shares_again(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], relay: TcpRelay, pg_url: str,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ratelimit, "OUTAGE_RETRY_SECONDS", 0.5)
    fake = FakeOpenAI(PROVIDER_KEY)
    db = REDIS_URL.rsplit("/", 1)[1]
    gw = launch(serve_app(fake.app).url, database={"url": pg_url},
                cache={"url": f"redis://127.0.0.1:{relay.port}/{db}"})

    async def create(svc: Services) -> str:
        return str((await svc.keys.create(gw.tenant_id, requests_per_minute=3, tokens_per_minute=1000))["key"])

    key = gw.run(create)
    # Verified (now in the worker's memory); 1 of 3 used, in Redis.
    assert _limited(_post(gw.url, key, "acme/chat"))["x-ratelimit-remaining-requests"] == "2"
    time.sleep(0.3)  # its tokens reach Redis (within 0.1 s)
    relay.close()
    time.sleep(0.1)  # the gateway sees its connection to Redis closed
    started = time.monotonic()
    during = [_post(gw.url, key, "acme/chat") for _ in range(5)]
    assert time.monotonic() - started < 5, "an outage costs no timeout per request"
    # This worker limits on its own now: 3 more in its memory, then 429 — never a 503.
    assert [r.status_code for r in during] == [200, 200, 200, 429, 429], [r.text for r in during]
    assert [_limited(r)["x-ratelimit-remaining-requests"] for r in during] == ["2", "1", "0", "0", "0"]
    tokens = PROMPT_TOKENS + len(REPLY_WORDS)
    # The two calls before it used 2 x 23 tokens, counted in memory too (refilling at ~17 a second).
    assert 1000 - 2 * tokens <= int(_limited(during[2])["x-ratelimit-remaining-tokens"]) < 1000 - tokens
    time.sleep(0.6)
    assert _post(gw.url, key, "acme/chat").status_code == 429  # Redis tried again, still down: memory
    relay.open()
    time.sleep(0.6)
    back = [_post(gw.url, key, "acme/chat") for _ in range(3)]
    # Redis's own count again: 1 of 3 was used before the outage.
    assert [r.status_code for r in back] == [200, 200, 429], [r.text for r in back]
    assert gw.open_reservations() == 0 and gw.verify() == []
    logged = capfd.readouterr().out
    assert logged.count('"rate_limit_store_unavailable"') == 1, "logged once per outage"
    assert logged.count('"rate_limit_store_recovered"') == 1
