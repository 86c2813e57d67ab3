"""Clerk-issued keys (`[auth] issuer = "clerk"`) against a fake Clerk Backend API on loopback:
verification and its cache, the failure policy, single-flight, the Svix-signed webhook,
keys made and revoked through Tollway, and a deleted user's data deletion.

On both stacks (SQLite + memory, PostgreSQL + Redis) in one process; the 4-worker proof is
tests/test_clerk_scaleout.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from svix.webhooks import Webhook

from tests.conftest import ServerThread
from tests.fakes.clerk_api import FakeClerk, subject
from tollway.app import create_app
from tollway.auth import clerk as clerk_mod
from tollway.config import Config
from tollway.services import Services, build
from tollway.store.schema import api_keys, clerk_webhook_deliveries, deletion_requests, revocations, tenants

CLERK_SK = "sk_test_clerkfake_" + "c" * 24
WHSEC = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ADMIN = "admin-token-for-clerk-tests-01234567"
EVICT_EVENT = "apiKey.revoked"
VERIFY_AGE_MS = 3_600_000
CHAT = {"model": "demo/echo", "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]}


def signed(payload: bytes, *, msg_id: str | None = None, secret: str = WHSEC, at: datetime | None = None
           ) -> dict[str, str]:
    """Headers of a delivery signed with Svix's own scheme."""
    msg_id = msg_id or "msg_" + secrets.token_hex(12)
    at = at or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, at, payload.decode())
    return {"svix-id": msg_id, "svix-timestamp": str(int(at.timestamp())), "svix-signature": signature,
            "content-type": "application/json"}


def event(etype: str, object_id: str) -> bytes:
    return json.dumps({"data": {"id": object_id, "object": "api_key", "deleted": True}, "object": "event",
                       "type": etype, "timestamp": int(time.time() * 1000), "instance_id": "ins_test"}).encode()


@dataclass
class Gateway:
    http: httpx.AsyncClient
    svc: Services           # a second set of services on the same database, for inspection
    fake: FakeClerk
    cfg: Config

    async def models(self, key: str) -> httpx.Response:
        return await self.http.get("/v1/models", headers={"authorization": f"Bearer {key}".encode()})

    async def deliver(self, payload: bytes, headers: dict[str, str]) -> httpx.Response:
        return await self.http.post("/webhooks/clerk", content=payload, headers=headers)

    async def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.request(method, "/admin" + path, headers={"authorization": f"Bearer {ADMIN}"}, **kw)

    async def rows(self, table: sa.Table, *where: Any) -> list[dict[str, Any]]:
        async with self.svc.store.read() as conn:
            return [dict(r) for r in (await conn.execute(sa.select(table).where(*where))).mappings().all()]


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLERK_SECRET_KEY", CLERK_SK)
    monkeypatch.setenv("CLERK_WEBHOOK_SIGNING_SECRET", WHSEC)
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", ADMIN)


@pytest.fixture
def fake_clerk(serve_app: Callable[[Any], ServerThread]) -> tuple[FakeClerk, str]:
    fake = FakeClerk(CLERK_SK)
    return fake, serve_app(fake.app()).url


def auth_table(url: str, **kw: Any) -> dict[str, Any]:
    return {"issuer": "clerk", "clerk_api_url": url, "clerk_evict_events": [EVICT_EVENT], **kw}


async def start(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
                fake_clerk: tuple[FakeClerk, str], stack: dict[str, Any], **auth: Any) -> AsyncIterator[Gateway]:
    fake, url = fake_clerk
    cfg = make_config(**stack, auth=auth_table(url, **auth))
    server = serve_app(create_app(cfg, provider_keys={}, migrate=True))
    svc = build(cfg)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield Gateway(http, svc, fake, cfg)
    finally:
        await svc.close()


@pytest.fixture
async def gw(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
             fake_clerk: tuple[FakeClerk, str], backend: dict[str, Any]) -> AsyncIterator[Gateway]:
    """On both stacks: SQLite + memory, PostgreSQL + Redis."""
    async for g in start(make_config, serve_app, fake_clerk, backend):
        yield g


@pytest.fixture
async def gw1(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
              fake_clerk: tuple[FakeClerk, str], embedded: dict[str, Any]) -> AsyncIterator[Gateway]:
    """Embedded only, Clerk's timeout short: for behaviour that does not depend on the stack."""
    async for g in start(make_config, serve_app, fake_clerk, embedded, clerk_timeout_seconds=1):
        yield g


# --- verification and the cache ---------------------------------------------------------------------


async def test_valid_key_is_verified_once_then_served_from_the_cache(gw: Gateway) -> None:
    user = subject()
    key, key_id = gw.fake.add_key(user)
    for _ in range(5):
        r = await gw.models(key)
        assert r.status_code == 200, r.text
    calls = gw.fake.verify_calls
    assert len(calls) == 1, "one verification, then the cache"
    assert calls[0].authorization == f"Bearer {CLERK_SK}" and calls[0].body == {"secret": key}
    # The subject became a tenant with an empty wallet; the key is stored only as a keyed hash.
    [tenant] = await gw.rows(tenants, tenants.c.external_id == f"clerk:{user}")
    assert await gw.svc.ledger.balance(tenant["id"]) == 0
    [row] = await gw.rows(api_keys, api_keys.c.id == key_id)
    assert row["tenant_id"] == tenant["id"] and row["key_hash"] != key and key not in json.dumps(row, default=str)
    # Empty wallet: the request is authenticated, then refused for money, not for the key.
    r = await gw.http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 402, r.text
    assert len(gw.fake.verify_calls) == 1


async def test_unknown_revoked_and_expired_keys_are_401_like_any_unknown_key(gw: Gateway) -> None:
    revoked, _ = gw.fake.add_key(subject(), revoked=True)
    expired, _ = gw.fake.add_key(subject(), expired=True)
    past, _ = gw.fake.add_key(subject(), expiration=int(time.time() * 1000) - 1000)
    unknown = "ak_" + secrets.token_hex(24)
    garbage = await gw.models("not-a-key")
    assert garbage.status_code == 401
    for key in (revoked, expired, past, unknown):
        r = await gw.models(key)
        assert r.status_code == 401, r.text
        assert r.json() == garbage.json()
    assert len(gw.fake.verify_calls) == 4
    # Cached as unknown for negative_ttl_seconds: a burst of them costs no further call.
    for _ in range(3):
        for key in (revoked, expired, past, unknown):
            assert (await gw.models(key)).status_code == 401
    assert len(gw.fake.verify_calls) == 4
    # Malformed keys never reach Clerk.
    for bad in ("ak_", "ak_short", "sk_" + "x" * 40, "ak_" + "x" * 300, "ak_é" + "x" * 20):
        assert (await gw.models(bad)).status_code == 401
    assert len(gw.fake.verify_calls) == 4
    assert not await gw.rows(tenants, tenants.c.external_id.like("clerk:%")), "no tenant for refused keys"


async def test_negative_entries_expire_after_negative_ttl(gw1: Gateway) -> None:
    unknown = "ak_" + secrets.token_hex(24)
    assert (await gw1.models(unknown)).status_code == 401
    gw1.fake.keys[unknown] = {**gw1.fake.keys[gw1.fake.add_key(subject())[0]], "id": "ak_" + secrets.token_hex(16)}
    assert (await gw1.models(unknown)).status_code == 401  # still the negative entry
    await asyncio.sleep(gw1.cfg.cache.negative_ttl_seconds + 0.2)
    assert (await gw1.models(unknown)).status_code == 200
    assert len(gw1.fake.verify_calls) == 2


# --- Clerk down: the failure policy -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["401", "429", "500", "timeout", "garbage"])
async def test_clerk_down_is_503_for_uncached_keys_and_200_for_cached_ones(gw1: Gateway, mode: str) -> None:
    cached, _ = gw1.fake.add_key(subject())
    assert (await gw1.models(cached)).status_code == 200
    uncached, _ = gw1.fake.add_key(subject())
    gw1.fake.mode = mode
    r = await gw1.models(uncached)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "key_issuer_unavailable" and "retry" in err["message"]
    assert uncached not in r.text and CLERK_SK not in r.text
    assert (await gw1.models(cached)).status_code == 200, "a cached key keeps working"
    # Nothing was cached from the failure: once Clerk is back the key is admitted.
    gw1.fake.mode = "ok"
    assert (await gw1.models(uncached)).status_code == 200


async def test_100_concurrent_requests_with_one_uncached_key_make_one_verify_call(gw: Gateway) -> None:
    key, _ = gw.fake.add_key(subject())
    gw.fake.delay = 0.5
    results = await asyncio.gather(*[gw.models(key) for _ in range(100)])
    assert [r.status_code for r in results] == [200] * 100
    assert len(gw.fake.verify_calls) == 1
    # The same for a bad key: one call, 100 refusals.
    bogus = "ak_" + secrets.token_hex(24)
    results = await asyncio.gather(*[gw.models(bogus) for _ in range(100)])
    assert [r.status_code for r in results] == [401] * 100
    assert len(gw.fake.verify_calls) == 2


# --- the webhook ------------------------------------------------------------------------------------


async def test_signed_webhook_evicts_a_cached_key_at_once(gw: Gateway) -> None:
    key, key_id = gw.fake.add_key(subject())
    assert (await gw.models(key)).status_code == 200
    # Revoked in Clerk's own UI: the cache still admits it (the bound without a webhook)...
    gw.fake.keys[key]["revoked"] = True
    assert (await gw.models(key)).status_code == 200
    # ...until the signed event arrives; its 2xx means every worker has evicted it.
    payload = event(EVICT_EVENT, key_id)
    started = time.monotonic()
    r = await gw.deliver(payload, signed(payload))
    assert r.status_code == 200 and r.json()["outcome"] == "evicted the key", r.text
    assert (await gw.models(key)).status_code == 401
    assert time.monotonic() - started < gw.cfg.cache.key_ttl_seconds / 4, "well inside the cache window"
    assert len(gw.fake.verify_calls) == 2


async def test_forged_stale_unsigned_and_replayed_webhooks_change_nothing(gw: Gateway) -> None:
    key, key_id = gw.fake.add_key(subject())
    assert (await gw.models(key)).status_code == 200
    payload = event(EVICT_EVENT, key_id)
    forged = signed(payload, secret="whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=")
    tampered = signed(payload)
    stale = signed(payload, at=datetime.now(UTC) - timedelta(minutes=6))
    future = signed(payload, at=datetime.now(UTC) + timedelta(minutes=6))
    unsigned = {"content-type": "application/json"}
    no_signature = {k: v for k, v in signed(payload).items() if k != "svix-signature"}
    for headers, body in ((forged, payload), (tampered, payload.replace(b"event", b"evenT")), (stale, payload),
                          (future, payload), (unsigned, payload), (no_signature, payload)):
        r = await gw.deliver(body, headers)
        assert r.status_code == 400, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_signature"
    assert (await gw.models(key)).status_code == 200
    assert len(gw.fake.verify_calls) == 1, "the key was never evicted"
    assert not await gw.rows(clerk_webhook_deliveries) and not await gw.rows(revocations)
    # A delivery acts once; the same svix-id again (Svix retries, or a replay) is 2xx and ignored.
    headers = signed(payload)
    assert (await gw.deliver(payload, headers)).json()["outcome"] == "evicted the key"
    assert (await gw.models(key)).status_code == 200  # Clerk still accepts it: cached again
    assert len(gw.fake.verify_calls) == 2
    evictions = len(await gw.rows(revocations))
    assert evictions == 1
    replay = signed(payload, msg_id=headers["svix-id"])  # re-signed now: within the tolerance
    r = await gw.deliver(payload, replay)
    assert r.status_code == 200 and r.json()["outcome"] == "duplicate", r.text
    assert (await gw.models(key)).status_code == 200
    assert len(await gw.rows(revocations)) == evictions, "the replay evicted nothing"
    assert len(await gw.rows(clerk_webhook_deliveries)) == 1


async def test_oversized_and_unknown_events(gw1: Gateway) -> None:
    big = b'{"type": "user.updated", "data": {"id": "user_x"}, "pad": "' + b"x" * 300_000 + b'"}'
    r = await gw1.deliver(big, signed(big))
    assert r.status_code == 413
    payload = event("session.created", "sess_123")
    r = await gw1.deliver(payload, signed(payload))
    assert r.status_code == 200 and r.json()["outcome"] == "ignored: event type not used"
    not_json = b"not json"
    assert (await gw1.deliver(not_json, signed(not_json))).status_code == 400


@pytest.mark.parametrize("kind", ["user", "org"])
async def test_user_deleted_deletes_the_tenant_as_tenants_delete_does(gw: Gateway, kind: str) -> None:
    user = subject(kind)
    key, _ = gw.fake.add_key(user)
    other, _ = gw.fake.add_key(user)
    assert (await gw.models(key)).status_code == 200
    assert (await gw.models(other)).status_code == 200
    [tenant] = await gw.rows(tenants, tenants.c.external_id == f"clerk:{user}")
    tid = tenant["id"]
    credit = await gw.admin("POST", f"/tenants/{tid}/wallet/credit", json={"amount_usd": "1.00", "reference": "t"})
    assert credit.status_code == 200, credit.text
    r = await gw.http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    payload = event("user.deleted" if kind == "user" else "organization.deleted", user)
    headers = signed(payload)
    r = await gw.deliver(payload, headers)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"].startswith("tenant deleted, 2 keys revoked")
    # Every cached key of the subject is refused at once (Clerk revoked them too).
    assert (await gw.models(key)).status_code == 401
    assert (await gw.models(other)).status_code == 401
    assert all(k["revoked"] for k in gw.fake.keys.values() if k["subject"] == user)
    # What `tenants delete` does: the person erased, the books kept under a pseudonym.
    assert not await gw.rows(tenants, tenants.c.id == tid)
    assert not await gw.rows(tenants, tenants.c.external_id == f"clerk:{user}")
    assert not await gw.rows(api_keys, api_keys.c.tenant_id == tid)
    [record] = [r for r in await gw.rows(deletion_requests) if r["completed_at"] is not None]
    assert tid not in json.dumps(record)
    with pytest.raises(Exception, match="deleted"):
        await gw.svc.tenants.get(tid)
    assert await gw.svc.ledger.verify(VERIFY_AGE_MS) == []
    # Svix retrying the same delivery changes nothing more.
    again = await gw.deliver(payload, signed(payload, msg_id=headers["svix-id"]))
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"


# --- keys through Tollway -----------------------------------------------------------------------------


async def test_keys_made_listed_and_revoked_through_tollway_go_to_clerk(gw: Gateway) -> None:
    user = subject()
    first, _ = gw.fake.add_key(user)
    assert (await gw.models(first)).status_code == 200  # the subject's tenant, from its first key
    [tenant] = await gw.rows(tenants, tenants.c.external_id == f"clerk:{user}")
    tid = tenant["id"]
    r = await gw.admin("POST", f"/tenants/{tid}/keys", json={"name": "ci"})
    assert r.status_code == 200, r.text
    made = r.json()
    [create] = gw.fake.calls("/v1/api_keys")[:1]
    assert create.body["subject"] == user and create.body["name"] == "ci"
    assert create.authorization == f"Bearer {CLERK_SK}"
    assert (await gw.models(made["key"])).status_code == 200
    listed = (await gw.admin("GET", f"/tenants/{tid}/keys")).json()["keys"]
    assert {k["id"] for k in listed} == {made["key_id"], gw.fake.keys[first]["id"]}
    assert all(k["revoked_at"] is None for k in listed)
    # A revoke through Tollway revokes at Clerk and evicts in the same call.
    r = await gw.admin("POST", f"/keys/{made['key_id']}/revoke")
    assert r.status_code == 200, r.text
    assert gw.fake.keys[made["key"]]["revoked"]
    assert (await gw.models(made["key"])).status_code == 401
    # Spend limits are Tollway's own; Clerk keys have none. A tenant with no Clerk subject has no Clerk keys.
    r = await gw.admin("POST", f"/tenants/{tid}/keys", json={"spend_limit_usd": "5", "spend_limit_period": "day"})
    assert r.status_code == 400, r.text
    plain = (await gw.admin("POST", "/tenants", json={"name": "not from clerk"})).json()["tenant_id"]
    assert (await gw.admin("POST", f"/tenants/{plain}/keys", json={})).status_code == 400


async def test_concurrent_first_sight_of_a_subject_makes_one_tenant(gw: Gateway) -> None:
    user = subject("org")
    keys = [gw.fake.add_key(user)[0] for _ in range(8)]
    gw.fake.delay = 0.2
    results = await asyncio.gather(*[gw.models(k) for k in keys for _ in range(3)])
    assert {r.status_code for r in results} == {200}
    assert len(await gw.rows(tenants, tenants.c.external_id == f"clerk:{user}")) == 1


def cli(cfg: Config, *args: str) -> Any:
    env = {**os.environ, "CLERK_SECRET_KEY": CLERK_SK}
    out = subprocess.run([sys.executable, "-m", "tollway", *args, "--config", cfg.source, "--json"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def test_cli_key_commands_go_to_clerk_and_revoke_evicts_the_serving_gateway(gw1: Gateway) -> None:
    user = subject()
    first, _ = gw1.fake.add_key(user)
    assert (await gw1.models(first)).status_code == 200
    [tenant] = await gw1.rows(tenants, tenants.c.external_id == f"clerk:{user}")
    made = await asyncio.to_thread(cli, gw1.cfg, "keys", "create", "--tenant", tenant["id"], "--name", "cli")
    assert made["key"].startswith("ak_") and gw1.fake.keys[made["key"]]["subject"] == user
    assert (await gw1.models(made["key"])).status_code == 200
    listed = await asyncio.to_thread(cli, gw1.cfg, "keys", "list", "--tenant", tenant["id"])
    assert {k["id"] for k in listed["keys"]} == {made["key_id"], gw1.fake.keys[first]["id"]}
    # The CLI is another process: its revoke returns once the serving gateway has evicted.
    revoked = await asyncio.to_thread(cli, gw1.cfg, "keys", "revoke", made["key_id"])
    assert revoked["key_id"] == made["key_id"] and gw1.fake.keys[made["key"]]["revoked"]
    assert (await gw1.models(made["key"])).status_code == 401
    assert (await gw1.models(first)).status_code == 200


async def test_a_flood_of_distinct_keys_is_bounded_per_worker(gw1: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clerk_mod, "MAX_FLIGHTS", 4)
    gw1.fake.delay = 0.5
    keys = ["ak_" + secrets.token_hex(24) for _ in range(12)]
    results = await asyncio.gather(*[gw1.models(k) for k in keys])
    statuses = sorted(r.status_code for r in results)
    assert statuses == [401] * 4 + [503] * 8, statuses
    assert len(gw1.fake.verify_calls) == 4, "no more calls in flight than the bound"
    assert all(r.json()["error"]["code"] == "key_issuer_unavailable" for r in results if r.status_code == 503)


async def test_clerk_failures_are_logged_without_the_key_or_the_secret(gw1: Gateway,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    key, _ = gw1.fake.add_key(subject())
    gw1.fake.mode = "401"
    assert (await gw1.models(key)).status_code == 503
    gw1.fake.mode = "timeout"
    assert (await gw1.models(key)).status_code == 503
    logged = capfd.readouterr()
    lines = [json.loads(line) for line in (logged.out + logged.err).splitlines()
             if line.startswith("{") and "clerk_api_failed" in line]
    assert {(x.get("upstream_status"), x.get("exc_type")) for x in lines} >= {(401, None), (None, "ReadTimeout")}
    assert all(x["clerk_operation"] == "verify" for x in lines)
    assert key not in logged.out + logged.err and CLERK_SK not in logged.out + logged.err


@pytest.mark.parametrize("secret", [None, "whsec_%%not-base64%%"])
async def test_webhook_without_a_usable_secret_is_503_and_changes_nothing(
        gw1: Gateway, monkeypatch: pytest.MonkeyPatch, secret: str | None) -> None:
    key, key_id = gw1.fake.add_key(subject())
    assert (await gw1.models(key)).status_code == 200
    if secret is None:
        monkeypatch.delenv("CLERK_WEBHOOK_SIGNING_SECRET")
    else:
        monkeypatch.setenv("CLERK_WEBHOOK_SIGNING_SECRET", secret)
    payload = event(EVICT_EVENT, key_id)
    r = await gw1.deliver(payload, signed(payload))
    assert r.status_code == 503 and r.json()["error"]["code"] == "webhook_unconfigured", r.text
    assert WHSEC not in r.text
    assert (await gw1.models(key)).status_code == 200 and len(gw1.fake.verify_calls) == 1
