"""The streaming relay against clients that misbehave: one that stops reading (the whole
relay is bounded by a deadline and its hold is never swept while it is served) and one
that leaves mid-stream (the provider's own usage is read after it left, or the
documented conservative rule is billed). Real gateway under uvicorn, real sockets."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ServerThread
from tests.fakes.anthropic_upstream import CACHE_READ, CACHE_WRITE, HIDDEN_THINKING, INPUT, FakeAnthropic
from tests.fakes.harness import ANTHROPIC_KEY, PROVIDER_KEY, Gateway, fake_models
from tests.fakes.openai_upstream import BIG_CHUNK_BYTES, HIDDEN_REASONING, FakeOpenAI
from tollway.errors import render_sse
from tollway.money import Prices, Usage, cost
from tollway.providers.openai import OpenAIStream
from tollway.proxy.relay import Relay, RelayLimits, StreamEnd

PRICES = Prices(Decimal("2.50"), Decimal("10.00"), Decimal("1.25"), Decimal("12.00"))
PLAIN = Prices(Decimal("2.50"), Decimal("10.00"))  # acme/think-hidden: no cached or reasoning price
CLAUDE = Prices(Decimal("3.00"), Decimal("15.00"), cached_input=Decimal("0.30"), cache_write=Decimal("3.75"))
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI(PROVIDER_KEY)


@pytest.fixture
def claude() -> FakeAnthropic:
    return FakeAnthropic(ANTHROPIC_KEY)


@pytest.fixture
def gw(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI,
       claude: FakeAnthropic, backend: dict[str, Any]) -> Gateway:
    claude_prices = {"input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00",
                     "cached_input_usd_per_mtok": "0.30", "cache_write_usd_per_mtok": "3.75"}
    models = [*fake_models(),
              {"id": "acme/think-hidden", "provider": "fake", "upstream": "fake-think-endless",
               "input_usd_per_mtok": "2.50", "output_usd_per_mtok": "10.00", "hidden_reasoning": True},
              *({"id": f"anthropic/{n}", "provider": "claude", "upstream": f"fake-claude-{n}", **claude_prices}
                for n in ("think", "think-endless"))]
    # Output bounds above the clients' max tokens here, so the bound a request reserves is its own.
    models = [{**m, "max_output_tokens": 100_000} for m in models]
    return launch(serve_app(fake.app).url, models=models, anthropic_url=serve_app(claude.app).url,
                  # The idle limit stays well above the fakes' 50 ms between chunks even on a loaded
                  # CI machine (at 1 s a stalled scheduler once cut a read-on short), and below
                  # the 5 s of silence the stall test sends.
                  server={"disconnect_drain_seconds": 3, "stream_idle_timeout_seconds": 2}, **backend)


def leave_after(gw: Gateway, path: str, body: bytes, marker: bytes, count: int) -> str:
    """Stream `body`, hang up once `marker` was read `count` times; the request id."""
    read = b""
    with httpx.stream("POST", gw.url + path, content=body, timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"}) as resp:
        assert resp.status_code == 200
        rid = resp.headers["x-request-id"]
        for part in resp.iter_raw():
            read += part
            if read.count(marker) >= count:
                break
    return rid


def settled_at(gw: Gateway, rid: str, before: int) -> dict[str, Any]:
    row = gw.usage_row(rid, wait=30)
    assert row["status"] == 499 and row["error_type"] == "client_disconnected"
    assert gw.balance() == before - row["cost_micros"]
    assert gw.open_reservations() == 0 and gw.verify() == []
    return row


def raw_stream(gw: Gateway, body: bytes, *, rcvbuf: int = 4096, stall: float = 0.0,
               path: str = "/v1/chat/completions") -> tuple[dict[str, str], bytes, bool]:
    """POST `body` on a socket with a small receive buffer, read nothing for `stall` seconds,
    then read to the end. Returns (headers, de-chunked body, whether the chunked body ended)."""
    host, port = gw.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {gw.key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    time.sleep(stall)
    raw = bytearray()
    while part := sock.recv(1 << 16):
        raw += part
    sock.close()
    header_block, _, rest = bytes(raw).partition(b"\r\n\r\n")
    headers = dict(line.decode().lower().split(": ", 1) for line in header_block.split(b"\r\n")[1:])
    out, complete = bytearray(), False
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            complete = True
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return headers, bytes(out), complete


def delivered_text(body: bytes) -> tuple[int, list[bytes]]:
    """Bytes of content received in complete SSE events, and the events' data lines."""
    total, data = 0, []
    for event in body.split(b"\n\n")[:-1]:  # the last piece is cut or empty
        payload = event.removeprefix(b"data: ")
        data.append(payload)
        if payload.startswith(b"{") and b'"choices"' in payload:
            for choice in orjson.loads(payload)["choices"]:
                total += len((choice.get("delta") or {}).get("content") or "")
    return total, data


def test_a_client_that_stalls_past_the_sweep_backstop_is_never_served_for_free(
        launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI,
        backend: dict[str, Any]) -> None:
    # Backstop: request_timeout 2 s + drain 1 s + grace 1 s, a sweep every 2 s; the client
    # reads nothing for 8 s through a 4 KiB receive buffer while the provider has 8 MiB to send.
    gw = launch(serve_app(fake.app).url, server={"request_timeout_seconds": 2, "disconnect_drain_seconds": 1,
                                                 "sweep_grace_seconds": 1, "stream_idle_timeout_seconds": 30},
                credit_micros=100_000_000, **backend)
    before = gw.balance()
    body = orjson.dumps({"model": "acme/big", "stream": True, "messages": MSG})
    headers, received, complete = raw_stream(gw, body, stall=8.0)
    text, events = delivered_text(received)
    assert text >= BIG_CHUNK_BYTES  # it got megabytes...
    charged = before - gw.balance()
    assert charged > 0  # ...and never for free
    row = gw.usage_row(headers["x-request-id"])
    assert row["cost_micros"] == charged
    assert charged == cost(Usage(row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"],
                                 reasoning_tokens=row["reasoning_tokens"]), PRICES)
    if not row["estimated"]:
        # The provider's usage: the stream was read to its end, by the client or, past the
        # deadline, by the gateway (its rest had already arrived).
        assert row["completion_tokens"] == fake.big_chunks * BIG_CHUNK_BYTES // 4
    else:
        # Cut at the deadline: at least what it received, its prompt at the reservation's
        # bound (the conservative rule of docs/proxy.md).
        assert row["completion_tokens"] >= -(-text // 4) and row["prompt_tokens"] == len(body)
    # Past the deadline the stream ends unfinished, or with an error event if the client
    # read again within the grace; never with its end marker.
    assert not complete or (events[-1] != b"[DONE]" and b'"stream_deadline"' in events[-1])
    assert all(b'"error"' not in e for e in events[:-1])
    assert gw.open_reservations() == 0 and gw.verify() == []


# --- a client that leaves: the provider's usage, read on after it left ---------------------------


def test_openai_stream_left_after_three_chunks_is_billed_the_providers_hidden_reasoning(
        gw: Gateway, fake: FakeOpenAI) -> None:
    before = gw.balance()
    body = orjson.dumps({"model": "acme/think", "stream": True, "messages": MSG})
    row = settled_at(gw, leave_after(gw, "/v1/chat/completions", body, b'"content":"', 3), before)
    reported = Usage(17, fake.think_chunks + HIDDEN_REASONING, 5, reasoning_tokens=HIDDEN_REASONING)
    assert row["estimated"] is False and row["reasoning_tokens"] == HIDDEN_REASONING
    assert row["cost_micros"] == cost(reported, PRICES) == 600_157


def test_a_running_usage_is_read_on_to_the_providers_final_count(gw: Gateway, fake: FakeOpenAI) -> None:
    before = gw.balance()
    body = orjson.dumps({"model": "acme/running", "stream": True, "messages": MSG})
    row = settled_at(gw, leave_after(gw, "/v1/chat/completions", body, b'"content":"', 3), before)
    reported = Usage(17, fake.think_chunks + HIDDEN_REASONING, 5, reasoning_tokens=HIDDEN_REASONING)
    assert row["estimated"] is False and row["cost_micros"] == cost(reported, PRICES)


def test_anthropic_stream_left_after_three_chunks_is_billed_the_providers_hidden_thinking(
        gw: Gateway, claude: FakeAnthropic) -> None:
    before = gw.balance()
    body = orjson.dumps({"model": "anthropic/think", "stream": True, "max_tokens": 64_000, "messages": MSG,
                         "thinking": {"type": "enabled", "budget_tokens": 60_000}})
    row = settled_at(gw, leave_after(gw, "/v1/messages", body, b'"text_delta"', 3), before)
    reported = Usage(INPUT + CACHE_READ + CACHE_WRITE, HIDDEN_THINKING + claude.think_chunks, CACHE_READ, CACHE_WRITE)
    assert row["estimated"] is False and row["completion_tokens"] == HIDDEN_THINKING + claude.think_chunks
    assert row["cost_micros"] == cost(reported, CLAUDE)


# --- ...or, when that usage cannot be had within the cap, the conservative rule -------------------


def test_openai_stream_without_usage_within_the_cap_is_billed_its_bounds(gw: Gateway, fake: FakeOpenAI) -> None:
    before = gw.balance()
    body = orjson.dumps({"model": "acme/think-hidden", "stream": True, "messages": MSG,
                         "max_completion_tokens": 60_000})
    row = settled_at(gw, leave_after(gw, "/v1/chat/completions", body, b'"content":"', 3), before)
    # hidden_reasoning model: completion = what was seen + the rest of the output bound;
    # prompt = the reservation's bound, the body's size (no count came from the provider).
    assert row["estimated"] is True and row["completion_tokens"] == 60_000 and row["prompt_tokens"] == len(body)
    assert 0 < row["reasoning_tokens"] < 60_000
    assert row["cost_micros"] == cost(Usage(len(body), 60_000), PLAIN) == 600_000 + -(-len(body) * 5 // 2)
    assert fake.cancelled.wait(5), "the provider's stream was not stopped at the cap"


def test_anthropic_stream_without_usage_within_the_cap_is_billed_its_bounds(gw: Gateway) -> None:
    before = gw.balance()
    body = orjson.dumps({"model": "anthropic/think-endless", "stream": True, "max_tokens": 40_000,
                         "thinking": {"type": "enabled", "budget_tokens": 30_000}, "messages": MSG})
    row = settled_at(gw, leave_after(gw, "/v1/messages", body, b'"text_delta"', 3), before)
    # Thinking asked for: the output bound in full; the prompt as message_start counted it.
    prompt = INPUT + CACHE_READ + CACHE_WRITE
    assert row["estimated"] is True and row["completion_tokens"] == 40_000 and row["prompt_tokens"] == prompt
    assert row["cost_micros"] == cost(Usage(prompt, 40_000, CACHE_READ, CACHE_WRITE), CLAUDE)


def test_a_stream_the_gateway_cuts_for_silence_is_billed_by_the_rule(gw: Gateway, fake: FakeOpenAI) -> None:
    # A reasoning model thinks in silence; past stream_idle_timeout_seconds the gateway hangs
    # up, and the provider bills the reasoning done until then.
    before = gw.balance()
    body = orjson.dumps({"model": "acme/stall", "stream": True, "messages": MSG, "reasoning_effort": "high",
                         "max_completion_tokens": 30_000})
    with httpx.stream("POST", gw.url + "/v1/chat/completions", content=body, timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"}) as resp:
        rid = resp.headers["x-request-id"]
        assert b'"upstream_stalled"' in resp.read()
    row = gw.usage_row(rid)
    seen = -(-len("Hello") // 4)
    assert row["estimated"] is True and row["error_type"] == "UpstreamTimeout" and row["prompt_tokens"] == len(body)
    assert row["completion_tokens"] == 30_000 and row["reasoning_tokens"] == 30_000 - seen
    expected = cost(Usage(len(body), 30_000, reasoning_tokens=30_000 - seen), PRICES)
    assert row["cost_micros"] == expected and gw.balance() == before - expected
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_without_reasoning_the_rule_bills_what_was_seen(gw: Gateway) -> None:
    before = gw.balance()
    body = orjson.dumps({"model": "anthropic/think-endless", "stream": True, "max_tokens": 40_000, "messages": MSG})
    row = settled_at(gw, leave_after(gw, "/v1/messages", body, b'"text_delta"', 3), before)
    assert row["estimated"] is True and row["reasoning_tokens"] == 0
    # " tN" per delta read before or after the client left, and the one thinking delta.
    assert 3 <= row["completion_tokens"] < 1_000


# --- reading on after a disconnect: bounded memory, bounded bytes -------------------------------


class Body:
    """An upstream response whose body is made on demand from `parts`, counting what is read."""

    status = 200
    headers: list[tuple[str, str]] = []

    def __init__(self, parts: Iterator[bytes]) -> None:
        self.parts = parts
        self.read_bytes = 0
        self.closed = False

    async def read(self, limit: int) -> bytes:
        raise AssertionError("a stream is read in chunks")

    async def chunk(self) -> bytes:
        await asyncio.sleep(0)
        part = next(self.parts, b"")
        self.read_bytes += len(part)
        return part

    def at_end(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        pass


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


FIRST = event({"model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]})
USAGE = event({"model": "m", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 90_000}})


async def relay_left_after_first_event(parts: Iterator[bytes], limits: RelayLimits) -> tuple[Body, StreamEnd]:
    """Run a Relay whose client hangs up once it got the first event."""
    body, ended, got_body = Body(parts), [], asyncio.Event()

    async def on_end(end: StreamEnd) -> None:
        ended.append(end)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            got_body.set()

    async def receive() -> dict[str, Any]:
        await got_body.wait()
        return {"type": "http.disconnect"}

    meter = OpenAIStream("acme/x", strip_usage=False)
    relay = Relay(body, meter, [], render_sse, (), on_end, asyncio.get_running_loop().time() + 60, limits)
    await relay({"type": "http"}, receive, send)  # type: ignore[arg-type]
    assert len(ended) == 1 and ended[0].client_gone
    return body, ended[0]


async def test_reading_on_keeps_only_the_event_being_read() -> None:
    def parts() -> Iterator[bytes]:
        yield FIRST
        yield b'data: {"choices":[{"delta":{"content":"'
        for _ in range(192):  # one 12 MiB event: never held whole
            yield b"x" * 65_536
        yield b'"}}]}\n\n' + USAGE + b"data: [DONE]\n\n"

    tracemalloc.start()
    try:
        body, end = await relay_left_after_first_event(parts(), RelayLimits(30, 64 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert body.read_bytes > 12 << 20 and peak < 2 << 20
    usage = end.meter.usage()
    assert usage is not None and usage.completion_tokens == 90_000 and not usage.estimated


async def test_reading_on_stops_at_the_byte_cap() -> None:
    def endless() -> Iterator[bytes]:
        yield FIRST
        while True:
            yield event({"model": "m", "choices": [{"index": 0, "delta": {"content": "y" * 1000}}]})

    body, end = await relay_left_after_first_event(endless(), RelayLimits(30, 1 << 20))
    assert (1 << 20) < body.read_bytes < (1 << 20) + 2_000 and body.closed
    assert end.meter.usage() is None and end.meter.text_bytes > 900_000  # what the rule bills from
