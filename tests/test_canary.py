"""The privacy canary (acceptance test for metadata-only logging).

A unique string goes through every /v1 endpoint as prompt, system message, tool
arguments, tool description, embedding input, an unknown body field and a request header,
and comes back from the fake upstream as completion text, streamed deltas and tool-call
arguments. Error paths included: malformed JSON, a non-object body, an oversized body,
an unknown model, an empty wallet, an endpoint the model is not served on, an upstream
error that quotes the prompt, and a client that hangs up mid-stream.

The gateway is the real `tollway serve` process (uvicorn, uvloop, its own logging
setup), so everything it writes is captured. Afterwards the canary is searched for in:
its stdout and stderr, this test process's output, the database (SQLite file bytes with
-wal and -shm; every PostgreSQL table dumped as text), every Redis key and value, and
/metrics. It must be nowhere. The test also proves the search is not vacuous: the canary
reached the upstream, came back to the client, and requests were logged and recorded.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from tests.conftest import REDIS_URL, ServerThread, free_port
from tests.fakes.canary_upstream import CanaryUpstream
from tollway.config import Config
from tollway.services import Services, build
from tollway.store.schema import access_log, metadata, usage_events

# Identifier characters only (as Groq's gsk_ keys are), short of the 32 characters that
# scrub() removes on shape alone: only the configured-secret check can catch it.
PROVIDER_KEY = "gsk_canaryprovider" + secrets.token_hex(5)
ADMIN_TOKEN = "admin-token-for-canary-0123456789"
MAX_BODY = 100_000


def models() -> list[dict[str, Any]]:
    prices = {"input_usd_per_mtok": "1.00", "output_usd_per_mtok": "2.00"}
    return [{"id": "acme/chat", "provider": "fake", "upstream": "canary-chat", **prices},
            {"id": "acme/error", "provider": "fake", "upstream": "canary-error", **prices},
            {"id": "acme/slow", "provider": "fake", "upstream": "canary-slow", **prices},
            {"id": "acme/keyecho", "provider": "fake", "upstream": "canary-keyecho", **prices},
            {"id": "anth/keyecho", "provider": "claude", "upstream": "canary-keyecho", **prices},
            {"id": "acme/embed", "provider": "fake", "upstream": "canary-embed", "kind": "embedding", **prices},
            {"id": "anth/chat", "provider": "claude", "upstream": "canary-chat", **prices},
            {"id": "anth/error", "provider": "claude", "upstream": "canary-error", **prices},
            {"id": "anth/slow", "provider": "claude", "upstream": "canary-slow", **prices}]


def anthropic_body(canary: str, model: str = "anth/chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "system": f"You keep {canary}",
            "messages": [{"role": "user", "content": f"Please repeat {canary}"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0", "name": "lookup",
                                                            "input": {"q": canary}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0",
                                                       "content": f"tool says {canary}"}]}],
            "tools": [{"name": "lookup", "description": f"looks up {canary}",
                       "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
            "metadata": {"user_id": canary}, **extra}


async def in_services(cfg: Config, fn: Callable[[Services], Any]) -> Any:
    svc = build(cfg)
    try:
        return await fn(svc)
    finally:
        await svc.close()


async def setup_tenants(svc: Services) -> tuple[str, str]:
    await svc.store.migrate()
    rich = await svc.tenants.create("Canary Customer", "canary.customer@example.org")
    poor = await svc.tenants.create("Broke Customer", "broke@example.org")
    key = await svc.keys.create(rich["tenant_id"], name="canary")
    broke = await svc.keys.create(poor["tenant_id"], name="broke")
    await svc.ledger.credit_manual(rich["tenant_id"], 20_000_000, "canary-fund")
    return key["key"], broke["key"]


def chat_body(canary: str, model: str = "acme/chat", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": f"You are a canary keeper: {canary}"},
            {"role": "user", "content": f"Please repeat {canary}"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_0", "type": "function",
                "function": {"name": "lookup", "arguments": orjson.dumps({"q": canary}).decode()}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": f"tool says {canary}"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "lookup", "description": f"looks up {canary}",
            "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": canary}}}}}],
        "user": canary,
        "metadata": {"note": canary},
        **extra,
    }


def responses_body(canary: str, **extra: Any) -> dict[str, Any]:
    return {"model": "acme/chat", "instructions": f"You keep {canary}",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": f"Please repeat {canary}"}]},
                      {"type": "function_call", "call_id": "call_0", "name": "lookup",
                       "arguments": orjson.dumps({"q": canary}).decode()},
                      {"type": "function_call_output", "call_id": "call_0", "output": f"tool says {canary}"}],
            "tools": [{"type": "function", "name": "lookup", "description": f"looks up {canary}",
                       "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}],
            "prompt_cache_key": canary, "metadata": {"note": canary}, **extra}


def exercise(url: str, key: str, broke_key: str, canary: str) -> dict[str, Any]:
    """Every endpoint and error path; returns what the client saw (for the non-vacuity checks)."""
    auth = {"authorization": f"Bearer {key}", "x-canary-note": canary, "user-agent": f"canary-agent {canary}"}
    seen: dict[str, Any] = {}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=chat_body(canary))
        assert r.status_code == 200, r.text
        seen["chat"] = r.text
        with c.stream("POST", "/v1/chat/completions",
                      json=chat_body(canary, stream=True, stream_options={"include_usage": True})) as s:
            assert s.status_code == 200
            seen["stream"] = "".join(s.iter_text())
        r = c.post("/v1/completions", json={"model": "acme/chat", "prompt": f"Complete {canary}", "suffix": canary})
        assert r.status_code == 200, r.text
        seen["completion"] = r.text
        with c.stream("POST", "/v1/completions", json={"model": "acme/chat", "prompt": canary, "stream": True}) as s:
            assert s.status_code == 200
            seen["completion_stream"] = "".join(s.iter_text())
        r = c.post("/v1/embeddings", json={"model": "acme/embed", "input": [canary, f"and {canary}"]})
        assert r.status_code == 200, r.text
        r = c.post("/v1/embeddings", json={"model": "acme/embed", "input": canary, "encoding_format": "float"})
        assert r.status_code == 200, r.text
        anthropic = {"anthropic-version": "2023-06-01"}
        r = c.post("/v1/messages", json=anthropic_body(canary), headers=anthropic)
        assert r.status_code == 200, r.text
        seen["messages"] = r.text
        with c.stream("POST", "/v1/messages", json=anthropic_body(canary, stream=True), headers=anthropic) as s:
            assert s.status_code == 200
            seen["messages_stream"] = "".join(s.iter_text())
        r = c.post("/v1/messages/count_tokens", json={k: v for k, v in anthropic_body(canary).items()
                                                       if k in ("model", "system", "messages", "tools")})
        assert r.status_code == 200 and r.json() == {"input_tokens": 21}, r.text
        r = c.post("/v1/responses", json=responses_body(canary))
        assert r.status_code == 200, r.text
        seen["responses"] = r.text
        with c.stream("POST", "/v1/responses", json=responses_body(canary, stream=True)) as s:
            assert s.status_code == 200
            seen["responses_stream"] = "".join(s.iter_text())
        # Error paths.
        statuses = {
            # Translated both ways (providers/translate): the canary crosses formats and back.
            "messages_translated": c.post("/v1/messages", json={
                "model": "acme/chat", "max_tokens": 10, "system": canary,
                "messages": [{"role": "user", "content": canary}]}).status_code,
            "chat_translated": c.post("/v1/chat/completions", json={
                k: v for k, v in chat_body(canary, "anth/chat").items() if k != "metadata"}).status_code,
            "untranslatable": c.post("/v1/chat/completions", json=chat_body(canary, "anth/chat")).status_code,
            "completions_not_served": c.post("/v1/completions", json={
                "model": "anth/chat", "prompt": canary}).status_code,
            "malformed_json": c.post("/v1/chat/completions", content=b'{"model": "acme/chat", "messages": [{"'
                                     + canary.encode() + b'": ').status_code,
            "not_an_object": c.post("/v1/chat/completions", json=[canary]).status_code,
            "wrong_types": c.post("/v1/chat/completions", json={"model": "acme/chat", "messages": canary,
                                                                "max_tokens": canary}).status_code,
            "too_large": c.post("/v1/chat/completions", json=chat_body(canary * (MAX_BODY // len(canary)))
                                ).status_code,
            "unknown_model": c.post("/v1/chat/completions", json=chat_body(canary, model=f"acme/{canary}")
                                    ).status_code,
            "empty_wallet": c.post("/v1/chat/completions", json=chat_body(canary),
                                   headers={"authorization": f"Bearer {broke_key}"}).status_code,
            "bad_key": c.post("/v1/chat/completions", json=chat_body(canary),
                              headers={"authorization": f"Bearer ak_{canary}"}).status_code,
            "stored_state": c.post("/v1/responses", json=responses_body(
                canary, previous_response_id=f"resp_{canary}")).status_code,
        }
        r = c.post("/v1/chat/completions", json=chat_body(canary, model="acme/error"))
        statuses["upstream_echo"] = r.status_code
        seen["upstream_error"] = r.text
        r = c.post("/v1/completions", json={"model": "acme/error", "prompt": canary})
        statuses["upstream_echo_completions"] = r.status_code
        r = c.post("/v1/messages", json=anthropic_body(canary, model="anth/error"), headers=anthropic)
        statuses["upstream_echo_messages"] = r.status_code
        r = c.post("/v1/chat/completions", json=chat_body(canary, model="acme/keyecho"))
        statuses["upstream_key_echo"], seen["key_echo"] = r.status_code, r.text
        r = c.post("/v1/messages", json=anthropic_body(canary, model="anth/keyecho"), headers=anthropic)
        statuses["upstream_key_echo_messages"], seen["key_echo_messages"] = r.status_code, r.text
        seen["statuses"] = statuses
    # Clients that hang up mid-stream, in both wire formats.
    for path, body in (("/v1/chat/completions", chat_body(canary, model="acme/slow", stream=True)),
                       ("/v1/messages", anthropic_body(canary, model="anth/slow", stream=True))):
        with httpx.Client(base_url=url, headers=auth, timeout=30) as c, c.stream("POST", path, json=body) as s:
            assert s.status_code == 200
            for part in s.iter_raw():
                if canary.encode() in part:
                    break
    return seen


def redis_dump() -> str:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    out = []
    try:
        for k in r.scan_iter(count=1000):
            kind = r.type(k).decode()
            if kind == "string":
                v: Any = r.get(k)
            elif kind == "hash":
                v = r.hgetall(k)
            elif kind == "list":
                v = r.lrange(k, 0, -1)
            elif kind == "set":
                v = r.smembers(k)
            elif kind == "zset":
                v = r.zrange(k, 0, -1, withscores=True)
            elif kind == "stream":
                v = r.xrange(k)
            else:
                v = kind
            out.append(f"{k!r} {v!r}")
    finally:
        r.close()
    return "\n".join(out)


async def table_dump(svc: Services) -> str:
    lines = []
    async with svc.store.read() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(sa.select(table))).all():
                lines.append(f"{table.name} {tuple(row)!r}")
    return "\n".join(lines)


@pytest.mark.slow
def test_canary_appears_nowhere(backend: dict[str, Any], make_config: Callable[..., Config],
                                serve_app: Callable[[Any], ServerThread], tmp_path: Path,
                                capfd: pytest.CaptureFixture[str]) -> None:
    canary = "CANARY" + secrets.token_hex(10)
    needles = [canary, canary[6:], canary.lower()]  # the random part alone catches a truncated copy
    upstream = CanaryUpstream(canary)
    fake = serve_app(upstream.app)
    port = free_port()
    cfg = make_config(**backend, server={"port": port, "max_body_bytes": MAX_BODY},
                      providers={"fake": {"type": "openai", "base_url": fake.url + "/v1",
                                          "api_key_env": "CANARY_PROVIDER_KEY", "responses_api": "on"},
                                 "claude": {"type": "anthropic", "base_url": fake.url,
                                            "api_key_env": "CANARY_ANTHROPIC_KEY"}},
                      models=models(), attribution={"header": "cf-aig-metadata"})
    key, broke_key = asyncio.run(in_services(cfg, setup_tenants))

    env = {**os.environ, "CANARY_PROVIDER_KEY": PROVIDER_KEY, "CANARY_ANTHROPIC_KEY": PROVIDER_KEY + "anthropic",
           "TOLLWAY_ADMIN_TOKEN": ADMIN_TOKEN,
           "PYTHONUNBUFFERED": "1"}
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tollway", "serve", "--config", cfg.source],
                                stdout=out, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.1)
        seen = exercise(url, key, broke_key, canary)
        # The disconnected streams are read on to their end, then settled and logged (499).
        settle_by = time.monotonic() + 15
        while b'"status":499' not in out_path.read_bytes() and time.monotonic() < settle_by:
            time.sleep(0.1)
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        assert httpx.get(url + "/admin/ledger/verify", headers=admin).json()["ok"] is True
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, err_path.read_text()  # drained, then exits 0 (serving.py)

    statuses = seen["statuses"]
    assert statuses == {"messages_translated": 200, "chat_translated": 200, "untranslatable": 400,
                        "completions_not_served": 400, "malformed_json": 400, "not_an_object": 400,
                        "wrong_types": 400, "too_large": 413, "unknown_model": 404, "empty_wallet": 402,
                        "bad_key": 401, "stored_state": 400, "upstream_echo": 400, "upstream_echo_completions": 400,
                        "upstream_echo_messages": 400, "upstream_key_echo": 400,
                        "upstream_key_echo_messages": 400}, statuses
    # Not vacuous: the canary went upstream and came back, through every kind of field.
    assert sum(canary.encode() in raw for raw in upstream.raw_requests) >= 9
    for what in ("chat", "stream", "completion", "completion_stream", "messages", "messages_stream", "responses",
                 "responses_stream"):
        assert canary in seen[what], what
    assert '\\"q\\":\\"' + canary in seen["chat"]  # tool-call arguments in the answer
    assert canary in seen["upstream_error"]  # the client may see its own prompt quoted back
    # The hang-ups (499s, below) were read on to the end for the provider's usage (docs/proxy.md).
    assert upstream.cancelled == 0

    logs = out_path.read_text() + err_path.read_text()
    captured = capfd.readouterr()
    here = captured.out + captured.err
    lines = [orjson.loads(line) for line in out_path.read_text().splitlines() if line.strip()]
    requests = [line for line in lines if line.get("event") == "request"]
    assert len(requests) >= 12, len(requests)  # every /v1 call was logged, with metadata
    assert {r.get("status") for r in requests} >= {200, 400, 402, 404, 413, 499}

    async def stored(svc: Services) -> tuple[str, int, int]:
        async with svc.store.read() as conn:
            n_access = (await conn.execute(sa.select(sa.func.count()).select_from(access_log))).scalar_one()
            n_usage = (await conn.execute(sa.select(sa.func.count()).select_from(usage_events))).scalar_one()
        return await table_dump(svc), int(n_access), int(n_usage)

    dump, n_access, n_usage = asyncio.run(in_services(cfg, stored))
    assert n_access >= 20 and n_usage >= 6
    places: dict[str, str | bytes] = {"serve stdout/stderr": logs, "test process output": here,
                                      "database tables": dump, "/metrics": metrics}
    if cfg.database.url.startswith("sqlite"):
        db = Path(cfg.database.url.removeprefix("sqlite:///"))
        places["database file bytes"] = b"".join(
            p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())
    else:
        places["redis keyspace"] = keyspace = redis_dump()
        assert "tollway:ks:" in keyspace  # the gateway did use Redis (cached keys)
    # The provider key must not come back either: not to a client (message, code or
    # param of a provider's error), not into a log line's error_code.
    assert PROVIDER_KEY in upstream.keys_echoed  # it did reach the upstream and was echoed
    keys = [PROVIDER_KEY, PROVIDER_KEY[4:]]
    assert not [k for k in keys if k in orjson.dumps(seen).decode()], "the provider key reached a client"
    needles += keys
    for where, text in places.items():
        for needle in needles:
            hit = (needle.encode() in text) if isinstance(text, bytes) else (needle in text)
            assert not hit, f"the canary leaked into {where}"
