"""Customer keys: format, hashing at rest, the cache, the bad-key bound, expiry, spend
limits and revocation that holds before the revoke call returns, on both stacks."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from tests.conftest import ServerThread
from tollway.app import create_app
from tollway.auth.key_secret import KeySecret, load_key_secret
from tollway.auth.keys import Keys
from tollway.config import Config
from tollway.errors import BadRequest, SpendLimitExceeded, Unauthorized
from tollway.services import Services, build
from tollway.store.schema import api_keys

T = TypeVar("T")
TOKEN = "admin-token-for-key-tests-0123456789"
KEY_TEXT = re.compile(r"ak_[A-Za-z0-9_-]{8,}")


def run(cfg: Config, fn: Callable[[Services], Awaitable[T]]) -> T:
    """Like another process (the CLI): its own Services, its own memory cache."""

    async def go() -> T:
        svc = build(cfg)
        try:
            return await fn(svc)
        finally:
            await svc.close()

    return asyncio.run(go())


async def tenant_and_key(svc: Services, **kw: Any) -> tuple[str, dict[str, Any]]:
    tid = str((await svc.tenants.create("Ada"))["tenant_id"])
    return tid, await svc.keys.create(tid, **kw)


class KeyLookups:
    """Counts statements that read api_keys on one engine (background loops excluded)."""

    def __init__(self, svc: Services) -> None:
        self.n = 0

        def on_execute(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
            if "FROM api_keys" in statement:
                self.n += 1

        event.listen(svc.store.engine.sync_engine, "before_cursor_execute", on_execute)


Gw = tuple[ServerThread, Config, Services]


def _gateway(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
             sections: dict[str, Any]) -> Gw:
    cfg = make_config(**sections)
    app = create_app(cfg, provider_keys={}, migrate=True)
    return serve_app(app), cfg, app.state.services


@pytest.fixture
def gateway(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
            backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Gw:
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
    return _gateway(make_config, serve_app, backend)


@pytest.fixture
def embedded_gateway(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
                     embedded: dict[str, Any]) -> Gw:
    """SQLite + per-worker memory cache: the stack where a separate process must wait."""
    return _gateway(make_config, serve_app, embedded)


@pytest.fixture
async def svc(make_config: Callable[..., Config], backend: dict[str, Any]) -> AsyncIterator[Services]:
    s = build(make_config(**backend), worker_id="wk_" + secrets.token_hex(4))
    if s.store.is_sqlite:
        await s.store.migrate()
    await s.workers.register()
    yield s
    await s.workers.unregister()
    await s.close()


def get_models(url: str, key: str | None, header: str = "authorization") -> httpx.Response:
    headers = {} if key is None else {header: f"Bearer {key}" if header == "authorization" else key}
    return httpx.get(url + "/v1/models", headers=headers, timeout=30)


# --- format and storage -----------------------------------------------------------------------


async def test_key_format_and_what_is_stored(svc: Services) -> None:
    tid, created = await tenant_and_key(svc, name="laptop")
    key = created["key"]
    assert re.fullmatch(r"ak_[A-Za-z0-9_-]+", key)
    raw = base64.urlsafe_b64decode(key[3:] + "=")
    assert len(raw) >= 32 + 6  # 32 random bytes from `secrets`, plus the tag
    listed = await svc.keys.list(tid)
    assert listed[0]["prefix"] == key[:7] and "key_hash" not in listed[0] and "key" not in listed[0]
    async with svc.store.read() as conn:
        stored = (await conn.execute(sa.select(api_keys))).mappings().one()
    assert key not in json.dumps({k: str(v) for k, v in stored.items()})
    assert stored["key_hash"] == svc.keys.secret.hash(key) != key


def test_sqlite_file_never_contains_the_key_text(embedded_gateway: Gw) -> None:
    server, cfg, _ = embedded_gateway
    made = run(cfg, lambda s: asyncio.gather(*(tenant_and_key(s, name=f"k{i}") for i in range(5))))
    keys = [k["key"] for _, k in made]
    for key in keys:
        assert get_models(server.url, key).status_code == 200
    run(cfg, lambda s: s.keys.revoke(made[0][1]["key_id"]))
    path = Path(cfg.database.url.removeprefix("sqlite:///"))
    blobs = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    secret = KeySecret(os.environ["TOLLWAY_KEY_SECRET"].encode())
    assert secret.hash(keys[1]).encode() in blobs  # we are reading the right files
    for key in keys:
        for needle in (key, key[3:], key[7:], key[3:40]):
            assert needle.encode() not in blobs


async def test_non_canonical_and_forged_keys_are_refused_without_lookup(svc: Services) -> None:
    _, created = await tenant_and_key(svc)
    key = created["key"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # Same decoded bytes, different spelling (the last character's 2 spare bits).
    twin = key[:-1] + alphabet[alphabet.index(key[-1]) ^ 1]
    forged = key[:20] + ("A" if key[20] != "A" else "B") + key[21:]
    before = svc.store.queries
    for bad in (twin, forged, key + "A", key[:-1], "ak_" + "A" * 51, key.upper(), " " + key, "sk-" + key[3:]):
        with pytest.raises(Unauthorized):
            await svc.keys.authenticate(bad)
    assert svc.store.queries == before
    assert (await svc.keys.authenticate(key)).key_id == created["key_id"]


def test_key_secret_file_is_generated_once_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLLWAY_TEST_UNSET_SECRET", raising=False)
    db = tmp_path / "data" / "tollway.db"
    first, notice = load_key_secret("TOLLWAY_TEST_UNSET_SECRET", db)
    path = db.parent / ".tollway-key-secret"
    assert notice is not None and str(path) in notice and "TOLLWAY_TEST_UNSET_SECRET" in notice
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, notice2 = load_key_secret("TOLLWAY_TEST_UNSET_SECRET", db)
    assert notice2 is None and again.hash("ak_x") == first.hash("ak_x")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    path.chmod(0o644)
    assert "chmod 600" in (load_key_secret("TOLLWAY_TEST_UNSET_SECRET", db)[1] or "")
    with pytest.raises(ValueError, match="TOLLWAY_TEST_UNSET_SECRET"):
        load_key_secret("TOLLWAY_TEST_UNSET_SECRET", None)  # PostgreSQL: every worker needs the same secret
    assert "***" in repr(first)


# --- the cache and the bad-key bound --------------------------------------------------------------


async def test_a_cache_hit_makes_zero_database_queries(svc: Services) -> None:
    _, created = await tenant_and_key(svc)
    lookups = KeyLookups(svc)
    before = svc.store.queries
    await svc.keys.authenticate(created["key"])
    assert lookups.n == 1  # a miss: one indexed read by hash...
    assert svc.store.queries - before <= 2  # ...(plus BEGIN on SQLite)
    before = svc.store.queries
    for _ in range(200):
        assert (await svc.keys.authenticate(created["key"])).key_id == created["key_id"]
    assert svc.store.queries == before


async def test_ten_thousand_random_bad_keys_cost_zero_database_lookups(svc: Services) -> None:
    """The bound: keys not minted with our secret cost 0 reads; a well-tagged unknown key
    (only the secret's holder can make one) costs 1 read per negative_ttl_seconds."""
    rnd = secrets.SystemRandom()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bad = ["ak_" + "".join(rnd.choice(alphabet) for _ in range(51)) for _ in range(9_000)]
    bad += ["ak_" + secrets.token_urlsafe(rnd.randint(0, 60)) for _ in range(500)]
    bad += [secrets.token_hex(rnd.randint(1, 40)) for _ in range(500)]
    before = svc.store.queries
    for key in bad:
        with pytest.raises(Unauthorized):
            await svc.keys.authenticate(key)
    assert svc.store.queries == before
    lookups = KeyLookups(svc)
    unknown = svc.keys.mint()  # right tag, never issued
    for _ in range(100):
        with pytest.raises(Unauthorized):
            await svc.keys.authenticate(unknown)
    assert lookups.n == 1


def test_bad_keys_over_http_do_not_reach_the_database(gateway: Gw) -> None:
    server, cfg, served = gateway
    lookups = KeyLookups(served)
    _, created = run(cfg, tenant_and_key)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(500):
            r = client.get("/v1/models", headers={"authorization": f"Bearer ak_{secrets.token_urlsafe(38)}"})
            assert r.status_code == 401
        assert lookups.n == 0
        good = {"authorization": f"Bearer {created['key']}"}
        for _ in range(100):
            assert client.get("/v1/models", headers=good).status_code == 200
        assert lookups.n == 1  # then every request is a cache hit


# --- errors ---------------------------------------------------------------------------------------


def test_401_is_the_same_for_unknown_malformed_revoked_and_expired_keys(
        gateway: Gw) -> None:
    server, cfg, _ = gateway
    _, revoked = run(cfg, tenant_and_key)
    _, expiring = run(cfg, lambda s: tenant_and_key(s, expires_at=int(time.time() * 1000) + 1_000))
    assert get_models(server.url, expiring["key"]).status_code == 200  # cached while valid
    run(cfg, lambda s: s.keys.revoke(revoked["key_id"]))
    time.sleep(1.1)
    unknown = run(cfg, lambda s: asyncio.sleep(0, s.keys.mint()))
    answers = [get_models(server.url, k) for k in (unknown, "ak_malformed", revoked["key"], expiring["key"],
                                                    "ak_" + secrets.token_urlsafe(38))]
    answers.append(get_models(server.url, revoked["key"], header="x-api-key"))
    for r in answers:
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["content-type"] == "application/json"
    bodies = {r.content for r in answers}
    assert len(bodies) == 1
    error = json.loads(bodies.pop())["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert "ak_" not in error["message"].replace("ak_...", "")
    missing = get_models(server.url, None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert "Missing API key" in missing.json()["error"]["message"]


async def test_expired_key_is_refused_even_from_the_cache(svc: Services) -> None:
    with pytest.raises(BadRequest):
        await tenant_and_key(svc, expires_at=int(time.time() * 1000) - 1)
    _, created = await tenant_and_key(svc, expires_at=int(time.time() * 1000) + 400)
    await svc.keys.authenticate(created["key"])  # cached now
    await asyncio.sleep(0.5)
    before = svc.store.queries
    with pytest.raises(Unauthorized):
        await svc.keys.authenticate(created["key"])
    assert svc.store.queries == before


async def test_per_key_spend_limit_is_enforced(svc: Services) -> None:
    tid, created = await tenant_and_key(svc, spend_limit_micros=1_000_000, spend_limit_period="month")
    await svc.ledger.credit(tid, 50_000_000, "fund")
    p = await svc.keys.authenticate(created["key"])
    assert (p.spend_limit_micros, p.spend_limit_period) == (1_000_000, "month")
    assert p.spend_period() == time.strftime("%Y-%m", time.gmtime())
    limit: dict[str, Any] = {"key_id": p.key_id, "key_limit_micros": p.spend_limit_micros,
                             "key_period": p.spend_period()}
    await svc.ledger.reserve(tid, "req_a", 700_000, **limit)
    with pytest.raises(SpendLimitExceeded) as exc:
        await svc.ledger.reserve(tid, "req_b", 400_000, **limit)
    assert exc.value.status == 429 and exc.value.headers["x-should-retry"] == "false"
    assert "spend limit of 1.000000 USD" in exc.value.message
    await svc.ledger.settle("req_a", 500_000)
    await svc.ledger.reserve(tid, "req_b", 400_000, **limit)
    with pytest.raises(BadRequest):
        await svc.keys.create(tid, spend_limit_micros=1, spend_limit_period="week")
    with pytest.raises(BadRequest):
        await svc.keys.create(tid, spend_limit_micros=1)


def test_per_key_spend_limit_over_http_is_a_429(gateway: Gw) -> None:
    server, cfg, _ = gateway

    async def setup(s: Services) -> tuple[str, str]:
        tid, limited = await tenant_and_key(s, spend_limit_micros=1, spend_limit_period="day")
        free = await s.keys.create(tid)
        await s.ledger.credit(tid, 10_000_000, "fund")
        return limited["key"], free["key"]

    limited, free = run(cfg, setup)
    body = {"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30,
                   headers={"authorization": f"Bearer {limited}"})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "spend_limit_exceeded" and "spend limit" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30,
                    headers={"authorization": f"Bearer {free}"})
    assert ok.status_code == 200, ok.text


# --- revocation -------------------------------------------------------------------------------------


def test_revoke_returns_only_once_the_next_request_is_refused(
        gateway: Gw) -> None:
    """From another process's Services (the CLI's shape): create -> use (cached) -> revoke ->
    the very next request, sent the moment revoke returns, is a 401."""
    server, cfg, served = gateway
    lookups = KeyLookups(served)
    made = run(cfg, lambda s: asyncio.gather(*(tenant_and_key(s) for _ in range(8))))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _, created in made:
            auth = {"authorization": f"Bearer {created['key']}"}
            assert client.get("/v1/models", headers=auth).status_code == 200
            seen = lookups.n
            assert client.get("/v1/models", headers=auth).status_code == 200
            assert lookups.n == seen  # served from the cache: only the revocation can stop it
            started = time.monotonic()
            key_id = str(created["key_id"])
            run(cfg, lambda s: s.keys.revoke(key_id))
            assert client.get("/v1/models", headers=auth).status_code == 401
            assert time.monotonic() - started < 5


def test_revoke_through_the_admin_api(gateway: Gw) -> None:
    server, cfg, _ = gateway
    _, created = run(cfg, tenant_and_key)
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert get_models(server.url, created["key"]).status_code == 200
    r = httpx.post(f"{server.url}/admin/keys/{created['key_id']}/revoke", headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["key_id"] == created["key_id"]
    assert get_models(server.url, created["key"]).status_code == 401
    again = httpx.post(f"{server.url}/admin/keys/{created['key_id']}/revoke", headers=auth, timeout=30)
    assert again.json()["revoked_at"] == r.json()["revoked_at"]  # idempotent


def test_cli_revoke_waits_for_the_serving_worker(embedded_gateway: Gw) -> None:
    """`tollway keys revoke` in a separate process, while a gateway with a per-worker memory
    cache serves the same SQLite file: the CLI returns only after the worker evicted."""
    server, cfg, _ = embedded_gateway
    for _ in range(3):
        _, created = run(cfg, tenant_and_key)
        for _ in range(2):
            assert get_models(server.url, created["key"]).status_code == 200
        out = subprocess.run([sys.executable, "-m", "tollway", "keys", "revoke", created["key_id"],
                              "--config", cfg.source, "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert get_models(server.url, created["key"]).status_code == 401
        assert json.loads(out.stdout)["key_id"] == created["key_id"]
        assert not KEY_TEXT.search(out.stdout + out.stderr)


async def test_last_used_at_is_batched_not_written_per_request(svc: Services) -> None:
    _, created = await tenant_and_key(svc)
    await svc.keys.authenticate(created["key"])
    before = svc.store.queries
    for _ in range(50):
        await svc.keys.authenticate(created["key"])
    assert svc.store.queries == before
    assert await svc.keys.flush_last_used() == 1
    assert await svc.keys.flush_last_used() == 0
    listed = (await svc.keys.list(created["tenant_id"]))[0]
    assert listed["last_used_at"] is not None and abs(listed["last_used_at"] - time.time() * 1000) < 60_000


# --- nothing leaks ------------------------------------------------------------------------------


def test_logs_never_contain_a_customer_key(gateway: Gw,
                                           caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
                                           ) -> None:
    server, cfg, _ = gateway
    caplog.set_level(logging.DEBUG)
    _, created = run(cfg, tenant_and_key)
    key = created["key"]
    body = {"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    for k in (key, key[:-2], "ak_" + secrets.token_urlsafe(38), key + "x"):
        get_models(server.url, k)
        httpx.post(server.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {k}"},
                   timeout=30)
        httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": k}, timeout=30)
    run(cfg, lambda s: s.keys.revoke(created["key_id"]))
    get_models(server.url, key)
    out, err = capfd.readouterr()
    logged = out + err + caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert not KEY_TEXT.search(logged), KEY_TEXT.search(logged)
    exc = Unauthorized()
    assert "ak_" not in str(exc).replace("ak_...", "")


def test_keys_repr_does_not_expose_the_secret() -> None:
    secret = KeySecret(b"s" * 32)
    assert "sss" not in repr(secret)
    assert isinstance(Keys.__init__, object)


# --- rotating the secret ---------------------------------------------------------------------------


def test_keys_of_the_previous_secret_work_during_a_rotation_and_stop_after_it(
        make_config: Callable[..., Config], backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(**backend)
    old, new = "old-key-secret-" + secrets.token_hex(16), "new-key-secret-" + secrets.token_hex(16)

    async def phase(current: str, previous: str | None, fn: Callable[[Services], Awaitable[T]]) -> T:
        monkeypatch.setenv("TOLLWAY_KEY_SECRET", current)
        if previous is None:
            monkeypatch.delenv("TOLLWAY_KEY_SECRET_PREVIOUS", raising=False)
        else:
            monkeypatch.setenv("TOLLWAY_KEY_SECRET_PREVIOUS", previous)
        s = build(cfg, worker_id="wk_" + secrets.token_hex(4))
        try:
            if s.store.is_sqlite:
                await s.store.migrate()
            await s.workers.register()
            return await fn(s)
        finally:
            await s.workers.unregister()
            await s.close()

    async def before(s: Services) -> tuple[dict[str, Any], dict[str, Any]]:
        made = await tenant_and_key(s)
        return made[1], await s.keys.create(made[0])

    async def during(s: Services) -> dict[str, Any]:
        for k in (issued, to_revoke):
            assert (await s.keys.authenticate(k["key"])).key_id == k["key_id"]
            assert (await s.keys.authenticate(k["key"])).key_id == k["key_id"]  # and from the cache
        made = await s.keys.create(issued["tenant_id"])
        assert (await s.keys.authenticate(made["key"])).key_id == made["key_id"]
        await s.keys.revoke(to_revoke["key_id"])
        with pytest.raises(Unauthorized):
            await s.keys.authenticate(to_revoke["key"])
        before = s.store.queries
        for _ in range(100):  # forged keys still cost nothing, with two secrets to try
            with pytest.raises(Unauthorized):
                await s.keys.authenticate("ak_" + secrets.token_urlsafe(38))
        assert s.store.queries == before
        return made

    async def after(s: Services) -> None:
        with pytest.raises(Unauthorized):
            await s.keys.authenticate(issued["key"])
        assert (await s.keys.authenticate(reissued["key"])).key_id == reissued["key_id"]

    issued, to_revoke = asyncio.run(phase(old, None, before))
    reissued = asyncio.run(phase(new, old, during))
    asyncio.run(phase(new, None, after))
