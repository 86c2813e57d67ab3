"""SIGTERM to a real `tollway serve` (one process, and --workers 2) during 20 running
streams and a few JSON calls (serving.py, relay.py, pipeline.py): new connections are
refused at once; what finishes within server.drain_timeout_seconds is delivered and
charged the provider's usage; a stream still running at the deadline ends with a
`server_shutting_down` error event and is charged the conservative rule on what it
delivered, to the micro-dollar; a JSON call still waiting gets a 503 and is charged
nothing; nothing stays reserved, `ledger verify` passes, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from tests.conftest import ServerThread, free_port
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.harness import ANTHROPIC_KEY, PRICES, PROVIDER_KEY, fake_models, launcher
from tests.fakes.openai_upstream import CACHED_TOKENS, PROMPT_TOKENS, REASONING_TOKENS, FakeOpenAI
from tests.test_ledger import _run, _serve
from tollway.config import Config
from tollway.money import Prices, Usage, cost
from tollway.proxy.relay import SHUTDOWN_MESSAGE
from tollway.services import Services
from tollway.store.schema import ledger_entries, reservations, usage_events

DRAIN_SECONDS = 4
SLOW_CHUNKS = 10  # 0.1 s apart: these finish within the drain
CREDIT = 50_000_000
PRICED = Prices(*(Decimal(PRICES[k]) for k in ("input_usd_per_mtok", "output_usd_per_mtok",
                                               "cached_input_usd_per_mtok", "reasoning_usd_per_mtok")))


@dataclass
class Seen:
    """What one client saw."""

    request_id: str = ""
    raw_body: bytes = b""
    status: int = 0
    text_bytes: int = 0
    done: bool = False  # the stream's [DONE]
    error: dict[str, Any] | None = None  # the error event, or the JSON error body
    broken: str = ""  # a transport error: the stream neither completed nor ended with an error


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


async def _stream(client: httpx.AsyncClient, url: str, model: str, seen: Seen) -> None:
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "tell me a long story"}]}
    seen.raw_body = orjson.dumps(body)
    try:
        async with client.stream("POST", url, content=seen.raw_body) as r:
            seen.status, seen.request_id = r.status_code, r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    seen.done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    seen.error = event["error"]
                for choice in event.get("choices") or []:
                    seen.text_bytes += len((choice.get("delta") or {}).get("content", "").encode())
    except httpx.TransportError as exc:
        seen.broken = type(exc).__name__


async def _json_call(client: httpx.AsyncClient, url: str, seen: Seen) -> None:
    r = await client.post(url, json={"model": "acme/sleep", "messages": [{"role": "user", "content": "hi"}]})
    seen.status, seen.request_id, seen.error = r.status_code, r.headers["x-request-id"], r.json().get("error")


def _books(cfg: Config, tenant: str) -> tuple[int, dict[str, int], dict[str, tuple[int, int, bool]], int]:
    async def read(s: Services) -> tuple[int, dict[str, int], dict[str, tuple[int, int, bool]], int]:
        async with s.store.read() as conn:
            held = (await conn.execute(sa.select(sa.func.count()).select_from(reservations))).scalar_one()
            debits: dict[str, int] = {}
            for ref, amount in (await conn.execute(sa.select(ledger_entries.c.reference, ledger_entries.c.amount_micros)
                                                   .where(ledger_entries.c.kind == "debit"))).all():
                assert ref not in debits, f"{ref} charged twice"
                debits[ref] = -amount
            rows = {r.request_id: (r.prompt_tokens, r.completion_tokens, r.estimated)
                    for r in (await conn.execute(sa.select(usage_events))).all()}
        return held, debits, rows, await s.ledger.balance(tenant)

    return _run(cfg, read)  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sigterm_during_20_streams_drains_settles_and_exits_0(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread], workers: int) -> None:
    fake = FakeOpenAI(PROVIDER_KEY, slow_chunks=SLOW_CHUNKS, slow_interval=0.1, think_interval=0.05,
                      stall_seconds=60)
    upstream = serve_app(fake.app)
    port = free_port()
    cfg = make_config(server={"port": port, "drain_timeout_seconds": DRAIN_SECONDS}, models=fake_models(),
                      providers={"fake": {"type": "openai", "base_url": upstream.url + "/v1",
                                          "api_key_env": "FAKE_PROVIDER_KEY"}, "echo": {"type": "echo"}})

    async def setup(s: Services) -> tuple[str, str]:
        await s.store.migrate()
        tid = str((await s.tenants.create("Ada"))["tenant_id"])
        await s.ledger.credit(tid, CREDIT, "fund")
        return tid, str((await s.keys.create(tid))["key"])

    tenant, key = _run(cfg, setup)
    proc = _serve(cfg, port, workers)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    finishing, endless, waiting = [Seen() for _ in range(10)], [Seen() for _ in range(10)], [Seen() for _ in range(2)]
    refused_at: list[float] = []

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers={"authorization": f"Bearer {key}"}) as c:
            tasks = [asyncio.create_task(_stream(c, url, "acme/slow", s)) for s in finishing]
            tasks += [asyncio.create_task(_stream(c, url, "acme/think-endless", s)) for s in endless]
            tasks += [asyncio.create_task(_json_call(c, url, s)) for s in waiting]
            deadline = time.monotonic() + 30
            while (fake.chunks_sent < 40 or len(fake.requests) < 22) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert len(fake.requests) == 22, "not every call reached the provider before the SIGTERM"
            os.killpg(proc.pid, signal.SIGTERM)
            sent = time.monotonic()
            while time.monotonic() - sent < DRAIN_SECONDS - 1:
                if await asyncio.to_thread(_refused, port):
                    refused_at.append(time.monotonic() - sent)
                    break
                await asyncio.sleep(0.1)
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert proc.wait(timeout=60) == 0
    log = Path(cfg.source).with_suffix(f".{port}.log").read_text()
    assert log.count('"event":"drain_finished"') == workers, log
    assert refused_at and refused_at[0] < 1.5, "new connections were not refused during the drain"

    held, debits, rows, balance = _books(cfg, tenant)
    assert held == 0
    for s in finishing:  # completed within the drain: the provider's own usage
        assert s.status == 200 and s.done and s.error is None and not s.broken, s
        usage = Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=SLOW_CHUNKS, cached_tokens=CACHED_TOKENS,
                      reasoning_tokens=REASONING_TOKENS)
        assert debits[s.request_id] == cost(usage, PRICED)
    for s in endless:  # cut at the deadline: an error event, and the conservative rule on what was delivered
        assert s.status == 200 and not s.done and not s.broken, s
        assert s.error is not None and s.error["code"] == "server_shutting_down", s
        assert s.text_bytes > 0
        delivered = Usage(prompt_tokens=len(s.raw_body), completion_tokens=math.ceil(s.text_bytes / 4),
                          estimated=True)
        assert rows[s.request_id] == (len(s.raw_body), math.ceil(s.text_bytes / 4), True)
        assert debits[s.request_id] == cost(delivered, PRICED)
    for s in waiting:  # no answer by the deadline: a 503, nothing charged
        assert s.status == 503 and s.error is not None and s.error["code"] == "server_shutting_down", s
        assert s.request_id not in debits
    assert balance == CREDIT - sum(debits.values())
    verify = subprocess.run([sys.executable, "-m", "tollway", "ledger", "verify", "--config", cfg.source],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_an_anthropic_stream_cancelled_at_the_drain_deadline_ends_with_its_error_event(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> None:
    """What uvicorn does at the drain's deadline, in process: it cancels the request's task.
    The stream ends with Anthropic's `event: error`, and the settle bills the conservative
    rule on what was delivered (the prompt as the provider counted it in message_start)."""
    fake = FakeAnthropic(ANTHROPIC_KEY, interval=0.05)
    models = [{"id": "anthropic/endless", "provider": "claude", "upstream": "fake-claude-think-endless",
               "input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00"}]
    for launch in launcher(make_config, serve_app):
        gw = launch(serve_app(FakeOpenAI("unused").app).url, models=models, anthropic_url=serve_app(fake.app).url)
        events: list[tuple[str, dict[str, Any]]] = []
        text = 0
        with httpx.stream("POST", gw.url + "/v1/messages", timeout=30, headers={"x-api-key": gw.key}, json={
                "model": "anthropic/endless", "max_tokens": 1000, "stream": True,
                "messages": [{"role": "user", "content": "Salut"}]}) as r:
            request_id = r.headers["x-request-id"]
            name = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    events.append((name, data))
                    delta = data.get("delta") or {}
                    text += len((delta.get("text") or delta.get("thinking") or "").encode())
                    if len(events) == 12:
                        async def deadline() -> None:  # uvicorn's shutdown, past timeout_graceful_shutdown
                            for task in gw.server.server.server_state.tasks:
                                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")

                        gw.server.call(deadline())
        assert events[-1][0] == "error" and events[-1][1]["type"] == "error", events[-3:]
        assert events[-1][1]["error"] == {"type": "api_error", "message": SHUTDOWN_MESSAGE,
                                      "code": "server_shutting_down", "param": None}
        row = gw.usage_row(request_id)
        assert row["estimated"] and row["error_type"] == "ShuttingDown" and row["status"] == 200
        assert row["completion_tokens"] == math.ceil(text / 4)
        assert gw.open_reservations() == 0 and gw.verify() == []
        assert gw.balance() == 10_000_000 - row["cost_micros"] and row["cost_micros"] > 0
