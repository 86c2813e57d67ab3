"""The shared key cache against someone who can write to Redis, a worker that pauses,
and a Redis that loses its data: a cached verification is believed only when it is
signed for that key hash and still within its lifetime, never for a key this worker
knows was revoked, and a forged key costs no Redis command at all. PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from tests.conftest import REDIS_URL
from tests.test_workers import pg_redis_config, stop, tenant_key, worker
from tollway import telemetry
from tollway.auth import keys as keys_mod
from tollway.auth import workers as workers_mod
from tollway.auth.key_secret import KeySecret
from tollway.auth.keys import Principal
from tollway.auth.workers import RecentRevocations
from tollway.config import Config
from tollway.errors import ServiceUnavailable, Unauthorized
from tollway.services import Services, build

PREFIX = "tollway:"  # RedisCache's default namespace
ENTRY = PREFIX + "ks:"  # a key's signed entry (before: "k:", unsigned)
# A Redis database of its own for the test that empties one: db 9 is shared by parallel runs.
FLUSHED_DB_URL = REDIS_URL.rsplit("/", 1)[0] + "/13"


@contextlib.asynccontextmanager
async def raw_redis(url: str = REDIS_URL) -> AsyncIterator[aioredis.Redis]:
    """What an attacker with write access to Redis holds: a plain client."""
    r = aioredis.Redis.from_url(url)
    try:
        yield r
    finally:
        await r.aclose()


@contextlib.asynccontextmanager
async def polling(*ws: Services) -> AsyncIterator[None]:
    """The workers' revocation-bus loops (heartbeat, read, evict, acknowledge)."""

    async def loop(w: Services) -> None:
        while True:
            await w.workers.poll()
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(loop(w)) for w in ws]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def key_hash(w: Services, key: str) -> str:
    return w.keys.secret.hash(key)


@pytest.fixture
def stack(make_config: Callable[..., Config]) -> Iterator[Config]:
    with pg_redis_config(make_config) as cfg:
        yield cfg


# --- hole: Redis was trusted blindly ------------------------------------------------------------


async def test_an_entry_copied_onto_another_key_does_not_move_it_to_the_victims_tenant(stack: Config) -> None:
    w1 = await worker(stack)
    try:
        victim, attacker = await tenant_key(w1), await tenant_key(w1)
        for k in (victim, attacker):
            await w1.keys.authenticate(k["key"])  # both now cached in Redis
        async with raw_redis() as r:
            copied = await r.get(ENTRY + key_hash(w1, victim["key"]))
            assert copied is not None
            await r.set(ENTRY + key_hash(w1, attacker["key"]), copied, px=60_000)
        w2 = await worker(stack)  # nothing in its memory: it reads Redis
        try:
            p = await w2.keys.authenticate(attacker["key"])
            assert (p.tenant_id, p.key_id) == (attacker["tenant_id"], attacker["key_id"])
        finally:
            await stop(w2)
    finally:
        await stop(w1)


async def test_a_spend_limit_or_expiry_stripped_in_redis_still_applies(stack: Config) -> None:
    w1 = await worker(stack)
    try:
        tid = (await w1.tenants.create("Ada"))["tenant_id"]
        expires = int(time.time() * 1000) + 3_600_000
        made = await w1.keys.create(tid, expires_at=expires, spend_limit_micros=1_000_000,
                                    spend_limit_period="month")
        await w1.keys.authenticate(made["key"])
        slot = ENTRY + key_hash(w1, made["key"])
        async with raw_redis() as r:
            value = (await r.get(slot)).decode()
            stripped = value.replace("|1000000|month", "||").replace(f"|{expires}|", "||")
            assert stripped != value
            await r.set(slot, stripped, px=60_000)
        w2 = await worker(stack)
        try:
            p = await w2.keys.authenticate(made["key"])
            assert (p.expires_at, p.spend_limit_micros, p.spend_limit_period) == (expires, 1_000_000, "month")
        finally:
            await stop(w2)
    finally:
        await stop(w1)


async def test_a_revoked_key_put_back_into_redis_stays_revoked(stack: Config) -> None:
    """Delete the tombstone after the revoke returned and restore the entry as it was
    (a genuine, signed value): no worker admits the key, not even one started since."""
    w1, w2 = await worker(stack), await worker(stack)
    admin = build(stack)
    try:
        made = await tenant_key(admin)
        await w1.keys.authenticate(made["key"])
        h = key_hash(w1, made["key"])
        async with raw_redis() as r:
            saved = await r.get(ENTRY + h)
            assert saved is not None
            async with polling(w1, w2):
                await admin.keys.revoke(made["key_id"])
                assert await r.exists(PREFIX + "r:" + h)
                await r.delete(PREFIX + "r:" + h)
                await r.set(ENTRY + h, saved, px=60_000)
                for w in (w1, w2):
                    with pytest.raises(Unauthorized):
                        await w.keys.authenticate(made["key"])
                w3 = await worker(stack)  # registered after the revoke
                try:
                    with pytest.raises(Unauthorized):
                        await w3.keys.authenticate(made["key"])
                finally:
                    await stop(w3)
    finally:
        await stop(w1, w2, admin)


async def test_a_cache_entry_that_does_not_parse_is_a_miss_not_an_error(stack: Config,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    w1 = await worker(stack)
    try:
        made = await tenant_key(w1)
        slot = ENTRY + key_hash(w1, made["key"])
        junk: list[Callable[[aioredis.Redis], Any]] = [
            lambda r: r.set(slot, "garbage", px=60_000),
            lambda r: r.set(slot, "tn_x|key_x|soon|lots|month", px=60_000),
            lambda r: r.set(slot, b"\xff\xfe|\x00", px=60_000),  # not UTF-8
            lambda r: r.hset(slot, "a", "b"),                    # not even a string
        ]
        async with raw_redis() as r:
            for write in junk:
                await r.delete(slot)
                await write(r)
                fresh = await worker(stack)  # nothing in its memory
                try:
                    with structlog.testing.capture_logs() as logged:
                        # A logger bound under capture_logs: the shared one may have been cached
                        # (cache_logger_on_first_use) by an earlier test's configure_logging.
                        monkeypatch.setattr(telemetry, "log", structlog.get_logger())
                        p = await fresh.keys.authenticate(made["key"])
                    assert p.key_id == made["key_id"]
                    rejected = [e for e in logged if e["event"] == "key_cache_entry_rejected"]
                    assert rejected and all(made["key"] not in str(e) and slot[len(ENTRY):] not in str(e)
                                            for e in rejected)
                finally:
                    await stop(fresh)
            # ...and the lookup replaced the junk with a good entry.
            assert (await r.type(slot)) == b"string"
    finally:
        await stop(w1)


# --- hole: a forged key cost a Redis round trip ---------------------------------------------------


async def test_forged_keys_cost_no_redis_command(stack: Config) -> None:
    w = await worker(stack)
    try:
        made = await tenant_key(w)
        commands: list[Any] = []
        real = w.cache.client.execute_command  # type: ignore[attr-defined]

        async def counted(*args: Any, **kwargs: Any) -> Any:
            commands.append(args[0])
            return await real(*args, **kwargs)

        w.cache.client.execute_command = counted  # type: ignore[attr-defined]
        for _ in range(200):
            # The right shape and alphabet, canonical base64: only the tag is wrong.
            forged = "ak_" + base64.urlsafe_b64encode(secrets.token_bytes(38)).rstrip(b"=").decode()
            with pytest.raises(Unauthorized):
                await w.keys.authenticate(forged)
        assert commands == []
        await w.keys.authenticate(made["key"])
        assert commands  # the counter does see the commands a real key costs
    finally:
        await stop(w)


# --- hole: a revoked key could come back ------------------------------------------------------------


def stall_lookups(w: Services, stall: Callable[[], Awaitable[Any]]) -> Callable[[], None]:
    """Make `w` stall between reading a key from the database and using what it read (a
    paused process); returns what undoes it."""
    real = w.keys._lookup

    async def lookup(h: str) -> Principal | None:
        found = await real(h)
        await stall()
        return found

    w.keys._lookup = lookup  # type: ignore[method-assign]
    return lambda: setattr(w.keys, "_lookup", real)


@dataclass
class PausedLookup:
    paused: Services  # read the key from the database, then stalled
    other: Services   # another worker, polling as usual
    made: dict[str, Any]
    in_flight: asyncio.Task[Principal]
    release: asyncio.Event  # resumes the paused worker


@contextlib.asynccontextmanager
async def paused_lookup_then_revoke(cfg: Config, *, whole_process: bool) -> AsyncIterator[PausedLookup]:
    """A worker reads a key from the database and stalls; then the key is revoked (with
    `whole_process`, the paused worker's revocation loop stalls too: the revoke returns
    without it once its heartbeat is stale, and it has not seen the revocation)."""
    paused, other = await worker(cfg), await worker(cfg)
    admin = build(cfg)
    try:
        made = await tenant_key(admin)
        release = asyncio.Event()
        stall_lookups(paused, release.wait)
        async with polling(other) if whole_process else polling(paused, other):
            in_flight = asyncio.create_task(paused.keys.authenticate(made["key"]))
            await asyncio.sleep(0.3)  # it has read the database: the key was valid then
            await admin.keys.revoke(made["key_id"])
            yield PausedLookup(paused, other, made, in_flight, release)
    finally:
        release.set()
        await stop(paused, other, admin)


async def test_a_lookup_paused_past_the_tombstone_does_not_cache_the_revoked_key(
        make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_mod, "_LOOKUP_BOUND", 0.3)  # seconds, instead of a minute
    with pg_redis_config(make_config, key_ttl_seconds=1) as cfg:
        async with paused_lookup_then_revoke(cfg, whole_process=True) as t, raw_redis() as r:
            h = key_hash(t.paused, t.made["key"])
            deadline = time.monotonic() + 10
            while await r.exists(PREFIX + "r:" + h):  # the paused worker outlives the tombstone
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            t.release.set()
            with contextlib.suppress(Unauthorized, ServiceUnavailable):
                await t.in_flight
            assert not await r.exists(ENTRY + h)
            with pytest.raises(Unauthorized):
                await t.other.keys.authenticate(t.made["key"])


async def test_a_revoked_key_stays_revoked_when_redis_loses_its_tombstone(make_config: Callable[..., Config]) -> None:
    """A lookup that read the database before the revoke writes Redis after Redis was
    emptied (a restart without persistence, a fail-over): the tombstone is gone."""
    with pg_redis_config(make_config) as cfg_shared:
        cfg = make_config(database={"url": cfg_shared.database.url}, cache={"url": FLUSHED_DB_URL})
        async with paused_lookup_then_revoke(cfg, whole_process=False) as t, raw_redis(FLUSHED_DB_URL) as r:
            await r.flushdb()
            t.release.set()
            with contextlib.suppress(Unauthorized):
                await t.in_flight  # (it started before the revoke: either answer is fine)
            for w in (t.paused, t.other):
                with pytest.raises(Unauthorized):
                    await w.keys.authenticate(t.made["key"])
            assert not await r.exists(ENTRY + key_hash(t.paused, t.made["key"]))


async def test_a_lookup_older_than_its_bound_is_neither_cached_nor_believed(
        stack: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound on its own (above, the entry's lifetime counted from the read and the
    revoked set would also have stopped the stale write)."""
    monkeypatch.setattr(keys_mod, "_LOOKUP_BOUND", 0.3)
    w = await worker(stack)
    try:
        made = await tenant_key(w)
        undo = stall_lookups(w, lambda: asyncio.sleep(0.5))
        with pytest.raises(ServiceUnavailable):
            await w.keys.authenticate(made["key"])
        async with raw_redis() as r:
            assert not await r.exists(ENTRY + key_hash(w, made["key"]))
        undo()
        assert (await w.keys.authenticate(made["key"])).key_id == made["key_id"]
    finally:
        await stop(w)


# --- the parts on their own ------------------------------------------------------------------------


def test_a_signed_entry_verifies_only_for_its_key_hash_payload_and_end() -> None:
    mine, other = KeySecret(b"a" * 32), KeySecret(b"b" * 32)
    sealed = mine.seal("hash-1", "tn_1|key_1|||", 1_700_000_000_000)
    assert mine.unseal("hash-1", sealed) == ("tn_1|key_1|||", 1_700_000_000_000)
    assert mine.unseal("hash-2", sealed) is None  # copied onto another key
    assert other.unseal("hash-1", sealed) is None  # signed under another secret
    assert mine.unseal("hash-1", sealed.replace("|1700000000000|", "|1800000000000|")) is None  # lifetime
    assert mine.unseal("hash-1", sealed.replace("tn_1", "tn_2")) is None
    for junk in ("", "|", "||", "a|b|c", "-|1|x", sealed + "é", "é" + sealed, sealed[:-1]):
        assert mine.unseal("hash-1", junk) is None


def test_revoked_hashes_are_kept_at_least_as_long_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000.0]
    monkeypatch.setattr(workers_mod.time, "monotonic", lambda: now[0])
    seen = RecentRevocations()
    seen.keep = 300
    seen.add(["old"])
    now[0] += 300 + 600  # its time plus the allowance for clocks: still kept
    seen.add(["new"])
    assert "old" in seen and "new" in seen
    now[0] += 1
    seen.add([])
    assert "old" not in seen and "new" in seen
