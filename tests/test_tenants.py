"""Tenants: export of everything held, and deletion that erases the person and keeps the books."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import ServerThread
from tollway.app import create_app
from tollway.config import Config
from tollway.services import Services, build
from tollway.store.db import now_ms
from tollway.store.schema import (
    access_log,
    deletion_requests,
    ledger_entries,
    metadata,
    stripe_events,
    topups,
    usage_events,
    wallets,
)
from tollway.tenants import TENANT_TABLES

TOKEN = "admin-token-for-tests-0123456789"
NAME = "Ada Lovelace-Byron-5c1e"
EMAIL = "ada.5c1e@example.org"
EXTERNAL = "user_2xhFjEI5X2qWRvtV13BzSj8H6Dk"
IP = "203.0.113.77"
OTHER_IP = "198.51.100.23"
UNAUTH_IP = "192.0.2.5"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def with_svc(cfg: Config, fn: Callable[[Services], Any]) -> Any:
    svc = build(cfg)
    try:
        return await fn(svc)
    finally:
        await svc.close()


def usage(key_id: str) -> dict[str, Any]:
    return {"key_id": key_id, "model": "demo/echo", "provider": "echo", "prompt_tokens": 10, "completion_tokens": 5,
            "cached_tokens": 0, "reasoning_tokens": 0, "estimated": False, "status": 200, "error_type": None,
            "latency_ms": 12}


def log_row(request_id: str, tenant_id: str | None, ip: str) -> dict[str, Any]:
    return {"created_at": now_ms(), "request_id": request_id, "method": "POST", "path": "/v1/chat/completions",
            "status": 200, "client_ip": ip, "latency_ms": 12, "tenant_id": tenant_id}


async def populate(svc: Services) -> dict[str, Any]:
    """Ada: profile, two keys, a top-up, two settled requests, one still in flight, access-log
    rows (and an unauthenticated one). Bob: a bystander."""
    ada = (await svc.tenants.create(NAME, EMAIL, EXTERNAL))["tenant_id"]
    bob = (await svc.tenants.create("Bob Bystander", "bob@example.org"))["tenant_id"]
    k1 = await svc.keys.create(ada, name="Ada's laptop")
    k2 = await svc.keys.create(ada, name="ci")
    kb = await svc.keys.create(bob, name="bob")
    await svc.ledger.credit_manual(ada, 5_000_000, "inv-001")
    await svc.ledger.credit_manual(bob, 1_000_000, "inv-002")
    rids = []
    for i, key in enumerate((k1, k2)):
        rid = f"req_{i:024x}"
        await svc.ledger.reserve(ada, rid, 200_000, key_id=key["key_id"])
        await svc.ledger.settle(rid, 1_234 * (i + 1), usage(key["key_id"]))
        rids.append(rid)
    in_flight = "req_" + "f" * 24
    await svc.ledger.reserve(ada, in_flight, 300_000, key_id=k1["key_id"])
    async with svc.store.write() as conn:
        await conn.execute(access_log.insert(), [log_row(rids[0], ada, IP), log_row(rids[1], ada, IP),
                                                 log_row("req_unauth", None, UNAUTH_IP),
                                                 log_row("req_bob", bob, OTHER_IP)])
        await conn.execute(topups.insert().values(session_id="cs_test_ada", tenant_id=ada, amount_micros=5_000_000,
                                                  currency="usd", status="paid", payment_intent="pi_ada",
                                                  created_at=now_ms()))
        await conn.execute(stripe_events.insert().values(id="evt_ada", type="checkout.session.completed",
                                                         outcome=f"credited 5.000000 to {ada}",
                                                         received_at=now_ms()))
    return {"ada": ada, "bob": bob, "keys": [k1, k2], "bob_key": kb, "rids": rids, "in_flight": in_flight}


async def dump(svc: Services) -> str:
    """Every row of every table, as text (what a PostgreSQL dump would show)."""
    parts = []
    async with svc.store.read() as conn:
        for table in metadata.sorted_tables:
            for r in (await conn.execute(sa.select(table))).all():
                parts.append(f"{table.name}: {tuple(r)!r}")
    return "\n".join(parts)


@pytest.fixture
def gateway(backend: dict[str, Any], make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ServerThread, Config]]:
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
    cfg = make_config(**backend)
    yield serve_app(create_app(cfg, provider_keys={}, migrate=True)), cfg


def admin(server: ServerThread, method: str, path: str) -> httpx.Response:
    return httpx.request(method, server.url + "/admin" + path, headers={"authorization": f"Bearer {TOKEN}"},
                         timeout=30)


def models(server: ServerThread, key: str) -> int:
    return httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code


def test_every_table_holding_tenant_ids_has_a_deletion_rule() -> None:
    holding = {t.name for t in metadata.sorted_tables if "tenant_id" in t.c or t.name == "tenants"}
    assert holding == set(TENANT_TABLES)


def test_export_holds_profile_keys_ledger_usage(gateway: tuple[ServerThread, Config]) -> None:
    server, cfg = gateway
    seeded = run(with_svc(cfg, populate))
    r = admin(server, "GET", f"/tenants/{seeded['ada']}/export")
    assert r.status_code == 200
    assert r.headers["content-disposition"] == f'attachment; filename="tollway-export-{seeded["ada"]}.json"'
    data = r.json()
    assert data["format"] == "tollway-tenant-export/1"
    assert data["profile"]["email"] == EMAIL and data["profile"]["name"] == NAME
    assert data["profile"]["external_id"] == EXTERNAL and data["profile"]["created_at"].endswith("+00:00")
    assert {k["id"] for k in data["keys"]} == {k["key_id"] for k in seeded["keys"]}
    text = json.dumps(data)
    assert "key_hash" not in text and all(k["key"] not in text for k in seeded["keys"])
    assert [k["prefix"] for k in data["keys"]] == [k["prefix"] for k in seeded["keys"]]
    assert data["wallet"] == {"balance_micros": 5_000_000 - 1_234 - 2_468 - 300_000,
                              "balance_usd": "4.696298"}
    kinds = [e["kind"] for e in data["ledger"]]
    assert kinds.count("credit") == 1 and kinds.count("reserve") == 3 and kinds.count("debit") == 2
    assert {e["amount_usd"] for e in data["ledger"] if e["kind"] == "credit"} == {"5.000000"}
    assert sorted(u["request_id"] for u in data["usage"]) == seeded["rids"]
    assert {u["cost_usd"] for u in data["usage"]} == {"0.001234", "0.002468"}
    assert [p["session_id"] for p in data["payments"]] == ["cs_test_ada"]
    assert {a["client_ip"] for a in data["access_log"]} == {IP}
    assert seeded["bob"] not in text and "Bob" not in text  # nobody else's data


def test_export_cli_prints_the_same_object(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    run(with_svc(cfg, lambda s: s.store.migrate()))
    seeded = run(with_svc(cfg, populate))
    out = subprocess.run([sys.executable, "-m", "tollway", "tenants", "export", seeded["ada"], "--config", cfg.source,
                          "--json"], capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert "\n" not in out.stdout.strip()
    data = json.loads(out.stdout)
    assert data["profile"]["email"] == EMAIL and len(data["usage"]) == 2


def secret_strings(seeded: dict[str, Any]) -> list[str]:
    return [NAME, EMAIL, EXTERNAL, IP, seeded["ada"], *seeded["rids"], seeded["in_flight"],
            *(k["key_id"] for k in seeded["keys"]), "Ada's laptop"]


def test_delete_erases_the_person_and_keeps_the_books(gateway: tuple[ServerThread, Config]) -> None:
    server, cfg = gateway
    seeded = run(with_svc(cfg, populate))
    ada = seeded["ada"]
    assert all(models(server, k["key"]) == 200 for k in seeded["keys"])
    before = run(with_svc(cfg, lambda s: s.ledger.entries(ada)))

    r = admin(server, "DELETE", f"/tenants/{ada}")
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["keys_revoked"] == 2 and result["reservations_released"] == 1
    assert result["requested_at"] <= result["completed_at"] and result["already_deleted"] is False
    assert result["balance_usd"] == "4.996298"  # the in-flight hold came back uncharged
    assert result["files_scrubbed"] is True

    # Keys fail at once, the bystander's still works.
    assert [models(server, k["key"]) for k in seeded["keys"]] == [401, 401]
    assert models(server, seeded["bob_key"]["key"]) == 200
    assert admin(server, "GET", "/ledger/verify").json() == {"ok": True, "problems": []}

    # No name, email, IP, tenant id, key id or request id of hers remains in any table...
    text = run(with_svc(cfg, dump))
    for s in secret_strings(seeded):
        occurrences = [line for line in text.splitlines() if s in line]
        assert not occurrences, (s, occurrences)  # the deletion record holds a hash of the id
    assert "Bob Bystander" in text and OTHER_IP in text
    if cfg.cache.url.startswith("redis"):  # the keys were used: their cached identities named her
        import redis

        r = redis.Redis.from_url(cfg.cache.url)
        try:
            cached = [(k, r.dump(k)) for k in r.scan_iter(count=1000)]
        finally:
            r.close()
        assert not [k for k, v in cached if ada.encode() in k or ada.encode() in (v or b"")]
    if cfg.database.url.startswith("sqlite"):  # with the gateway running: the files are clean too
        raw = file_bytes(Path(cfg.database.url.removeprefix("sqlite:///")))
        assert not any(s.encode() in raw for s in (NAME, EMAIL, EXTERNAL, IP, "Ada's laptop"))

    async def books(svc: Services) -> dict[str, Any]:
        async with svc.store.read() as conn:
            entries = [dict(x) for x in (await conn.execute(
                sa.select(ledger_entries).where(ledger_entries.c.tenant_id.like("tn_anon_%")))).mappings()]
            used = [dict(x) for x in (await conn.execute(sa.select(usage_events))).mappings()]
            wallet = dict((await conn.execute(sa.select(wallets.c.tenant_id, wallets.c.balance_micros))).all())
            logs = [dict(x) for x in (await conn.execute(sa.select(access_log))).mappings()]
            paid = (await conn.execute(sa.select(topups.c.tenant_id))).scalars().all()
            req = (await conn.execute(sa.select(deletion_requests))).mappings().one()
        return {"entries": entries, "usage": used, "wallet": wallet, "logs": logs, "topups": paid, "req": req}

    b = run(with_svc(cfg, books))
    anon = {e["tenant_id"] for e in b["entries"]}
    assert len(anon) == 1
    (pseudonym,) = anon
    # The books still add up: same amounts, one extra release for the in-flight request.
    assert sorted(e["amount_micros"] for e in b["entries"]) == sorted(
        [e["amount_micros"] for e in before] + [300_000])
    assert b["wallet"][pseudonym] == sum(e["amount_micros"] for e in b["entries"]) == 4_996_298
    # Per-request structure survives: usage rows match their reserve/debit entries.
    assert {u["tenant_id"] for u in b["usage"]} == {pseudonym}
    for u in b["usage"]:
        mine = {e["kind"] for e in b["entries"] if e["reference"] == u["request_id"]}
        assert mine == {"reserve", "release", "debit"} and u["request_id"].startswith("req_anon_")
        assert u["key_id"].startswith("key_anon_")
    assert len({u["key_id"] for u in b["usage"]}) == 2  # two keys stay two, unnamed
    assert b["topups"] == [pseudonym]
    unauth = next(x for x in b["logs"] if x["request_id"] == "req_unauth")
    assert unauth["client_ip"] == UNAUTH_IP  # not hers to erase (test_erasure: not even from the same address)
    assert all(x["client_ip"] is None for x in b["logs"] if x["tenant_id"] == pseudonym)
    assert b["req"]["requested_at"] <= b["req"]["completed_at"]

    # Idempotent; the tenant is gone for every read.
    again = admin(server, "DELETE", f"/tenants/{ada}").json()
    assert again["already_deleted"] is True and again["completed_at"] == result["completed_at"]
    gone = admin(server, "GET", f"/tenants/{ada}")
    assert gone.status_code == 404 and "was deleted" in gone.json()["error"]["message"]
    assert admin(server, "GET", f"/tenants/{ada}/export").status_code == 404
    assert admin(server, "DELETE", f"/tenants/{pseudonym}").status_code == 404
    assert pseudonym not in {t["id"] for t in run(with_svc(cfg, lambda s: s.tenants.list()))}


def file_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
