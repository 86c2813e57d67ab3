"""Customer API keys: issue, hash at rest, verify with a cache, revoke at once.

The key format, the secret and its rotation are in key_secret.py. A key is checked in
this order:
  1. length and ASCII                             -> no lookup
  2. this worker's memory ("k:<hash>")            -> no I/O; only this process writes it,
     with what it verified, so a hit is believed as read (one HMAC per cached request)
  3. shape (alphabet, canonical base64) and tag (constant-time HMAC compare) under the
     current secret, then under the previous one during a rotation
                                                  -> no I/O at all: random or forged keys
     cost no database read and no Redis command (a guess passes with probability 2^-48)
  4. with Redis, the shared entry ("ks:<hash>", signed; a name of its own, so workers of
     earlier versions, which read "k:" unsigned, never see it): believed only when it is signed for this key hash and
     still within its lifetime, and never for a hash this worker has seen revoked; a bad
     entry is a miss (logged), so a Redis that someone else can write to can make a
     worker read the database, never admit a key the database would not
  5. one indexed read by HMAC-SHA256 hash         -> then cached, or cached as unknown
So the bound for a flood of bad keys is: zero database reads and zero Redis commands for
keys not minted with our secret, and one read per distinct well-tagged unknown key per
negative_ttl_seconds (only someone holding the secret can mint those). Every failure,
whatever the step, answers the same 401, so the answer is no oracle for which step failed.

At rest only the keyed hash and a display prefix are stored, so a copy of the database
does not let anyone use (or even test) a key without the secret.

Revocation reaches every worker before `revoke` returns. Each worker keeps verified keys
in memory: with memory:// that is the cache; with Redis it is a layer in front of it, so
a request costs no Redis round trip (that lookup was ~20% of the gateway's CPU per
request on PostgreSQL + Redis, docs/performance-history.md, fifth pass). A per-worker entry is
trusted only while the worker's heartbeat is fresh, and the revocation bus (auth/workers.py)
waits until every live worker has evicted the key; in Redis the entry is deleted and a
tombstone blocks re-caching, so a worker that misses in memory cannot pick it up again.
The tombstone is not the only guard, since Redis can lose it: a worker refuses a Redis
hit for any hash it has seen revoked, and never caches a lookup older than
_LOOKUP_BOUND (a paused worker could otherwise write it after the tombstone expired).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from tollway.auth.key_secret import KEY_LEN, KeySecret, tag_secret
from tollway.auth.workers import WorkerRegistry
from tollway.config import MAX_PER_MINUTE
from tollway.errors import BadRequest, NotFound, ServiceUnavailable, Unauthorized
from tollway.ledger.transactions import spend_period
from tollway.store.cache import Cache
from tollway.store.db import Store, now_ms
from tollway.store.schema import api_keys, tenants

_NEGATIVE = "-"
_MISSING = "Missing API key. Send it as Authorization: Bearer ak_... (or x-api-key: ak_...)."
# Seconds: far beyond the database's command timeout. A lookup that took longer is not
# cached (nor believed): the row it read may predate a revocation whose tombstone, which
# lives key_ttl_seconds + twice this, is gone by the time it would write.
_LOOKUP_BOUND = 60
PERIODS = ("day", "month")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from: the only identity the rest of the request sees."""

    tenant_id: str
    key_id: str
    expires_at: int | None = None
    spend_limit_micros: int | None = None
    spend_limit_period: str | None = None
    requests_per_minute: int | None = None  # the key's own rate limits; None: [limits], 0: none
    tokens_per_minute: int | None = None

    def encode(self) -> str:
        fields = [self.tenant_id, self.key_id, str(self.expires_at or ""), str(self.spend_limit_micros or ""),
                  self.spend_limit_period or ""]
        if self.requests_per_minute is not None or self.tokens_per_minute is not None:
            # Only then: a key without its own rate limits keeps the five fields that workers
            # of earlier versions read, for the length of a rolling upgrade.
            fields += [_opt(self.requests_per_minute), _opt(self.tokens_per_minute)]
        return "|".join(fields)

    @classmethod
    def decode(cls, s: str) -> Principal:
        t, k, exp, lim, per, *rate = s.split("|")
        rpm, tpm = rate or ("", "")
        return cls(t, k, int(exp) if exp else None, int(lim) if lim else None, per or None,
                   int(rpm) if rpm else None, int(tpm) if tpm else None)

    def spend_period(self, at: float | None = None) -> str | None:
        if self.spend_limit_micros is None:
            return None
        return spend_period(self.spend_limit_period, None if at is None else datetime.fromtimestamp(at, UTC))


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Keys:
    def __init__(self, store: Store, cache: Cache, secret: KeySecret, *, ttl: float = 60,
                 negative_ttl: float = 5, bus: WorkerRegistry | None = None,
                 previous: KeySecret | None = None) -> None:
        self.store = store
        self.cache = cache
        self.secret = secret
        # Tried in this order; `previous` only during a rotation (key_secret.py).
        self._secrets = (secret,) if previous is None else (secret, previous)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.bus = bus  # evicts revoked keys from this worker's own cache
        # With a shared cache, this worker's layer in front of it: the very cache the bus
        # evicts from, so the two can never disagree.
        self.local = bus.cache if cache.shared and bus is not None else None
        if bus is not None:
            # Remember a revoked hash until no entry signed before the revocation is valid.
            bus.revoked.keep = max(bus.revoked.keep, ttl + 2 * _LOOKUP_BOUND + 60)
        self._last_used: dict[str, int] = {}

    # --- issuing --------------------------------------------------------------------------

    def mint(self) -> str:
        return self.secret.mint()

    async def create(self, tenant_id: str, *, name: str | None = None, expires_at: int | None = None,
                     spend_limit_micros: int | None = None, spend_limit_period: str | None = None,
                     requests_per_minute: int | None = None, tokens_per_minute: int | None = None
                     ) -> dict[str, Any]:
        _check_rate_limits(requests_per_minute, tokens_per_minute)
        if (spend_limit_micros is None) != (spend_limit_period is None):
            raise BadRequest("spend limit needs both an amount and a period (day or month)")
        if spend_limit_period is not None and spend_limit_period not in PERIODS:
            raise BadRequest("spend limit period must be 'day' or 'month'")
        if spend_limit_micros is not None and spend_limit_micros <= 0:
            raise BadRequest("spend limit must be positive")
        if expires_at is not None and expires_at <= now_ms():
            raise BadRequest("expires_at must be in the future (unix epoch milliseconds)")
        key = self.mint()
        key_id = new_id("key")
        async with self.store.write() as conn:
            t = (await conn.execute(sa.select(tenants.c.deleted_at).where(tenants.c.id == tenant_id))).first()
            if t is None or t.deleted_at is not None:
                raise NotFound(f"no tenant {tenant_id}")
            await conn.execute(api_keys.insert().values(
                id=key_id, tenant_id=tenant_id, name=name, prefix=key[:7], key_hash=self.secret.hash(key),
                created_at=now_ms(), expires_at=expires_at, spend_limit_micros=spend_limit_micros,
                spend_limit_period=spend_limit_period, requests_per_minute=requests_per_minute,
                tokens_per_minute=tokens_per_minute))
        return {"key_id": key_id, "key": key, "tenant_id": tenant_id, "prefix": key[:7]}

    async def list(self, tenant_id: str) -> list[dict[str, Any]]:
        cols = [c for c in api_keys.c if c.name != "key_hash"]
        async with self.store.read() as conn:
            rows = (await conn.execute(
                sa.select(*cols).where(api_keys.c.tenant_id == tenant_id).order_by(api_keys.c.created_at)
            )).mappings().all()
        return [dict(r) for r in rows]

    async def get(self, tenant_id: str, key_id: str) -> dict[str, Any]:
        """One key of this tenant (NotFound for another tenant's: the dashboard's ownership check)."""
        cols = [c for c in api_keys.c if c.name != "key_hash"]
        async with self.store.read() as conn:
            row = (await conn.execute(sa.select(*cols).where(api_keys.c.id == key_id,
                                                             api_keys.c.tenant_id == tenant_id))).mappings().first()
        if row is None:
            raise NotFound("no such key")
        return dict(row)

    async def close(self) -> None:
        """Nothing to release here; an issuer that holds a client (auth/clerk.py) closes it."""

    async def set_rate_limits(self, key_id: str, **limits: int | None) -> dict[str, Any]:
        """Set a key's own `requests_per_minute` / `tokens_per_minute` (None: back to the
        [limits] default; 0: unlimited); a limit not named is left as it is. Workers see it
        within cache.key_ttl_seconds: this process at once, Redis's shared entry is dropped,
        other workers' memory keeps the old value until its entry expires (docs/keys.md)."""
        if not limits or set(limits) - {"requests_per_minute", "tokens_per_minute"}:
            raise BadRequest("name requests_per_minute and/or tokens_per_minute")
        _check_rate_limits(limits.get("requests_per_minute"), limits.get("tokens_per_minute"))
        async with self.store.write() as conn:
            row = (await conn.execute(sa.select(api_keys.c.key_hash).where(api_keys.c.id == key_id))).first()
            if row is None:
                raise NotFound(f"no key {key_id}")
            await conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(**limits))
            out = (await conn.execute(sa.select(api_keys.c.id, api_keys.c.requests_per_minute,
                                                api_keys.c.tokens_per_minute).where(api_keys.c.id == key_id))).one()
        if self.local is not None:
            await self.local.delete(f"k:{row.key_hash}")
        await self.cache.delete(f"ks:{row.key_hash}" if self.cache.shared else f"k:{row.key_hash}")
        return {"key_id": out.id, "requests_per_minute": out.requests_per_minute,
                "tokens_per_minute": out.tokens_per_minute}

    async def revoke(self, key_id: str) -> dict[str, Any]:
        """Returns only when no worker will admit the key any more."""
        return (await self._revoke([key_id]))[0]

    async def revoke_tenant(self, tenant_id: str) -> int:
        async with self.store.read() as conn:
            ids = (await conn.execute(
                sa.select(api_keys.c.id).where(api_keys.c.tenant_id == tenant_id, api_keys.c.revoked_at.is_(None))
            )).scalars().all()
        await self._revoke(ids)
        return len(ids)

    async def _revoke(self, key_ids: Sequence[str]) -> Sequence[dict[str, Any]]:
        """Record every revocation in one transaction, evict them all, then wait once for
        the workers' acknowledgement of the last (they acknowledge in sequence order)."""
        revoked: builtins.list[dict[str, Any]] = []  # (`list` here is Keys.list)
        hashes: builtins.list[str] = []
        seq: int | None = None
        async with self.store.write() as conn:
            for key_id in key_ids:
                row = (await conn.execute(
                    sa.select(api_keys.c.key_hash, api_keys.c.revoked_at).where(api_keys.c.id == key_id)
                )).first()
                if row is None:
                    raise NotFound(f"no key {key_id}")
                revoked_at = row.revoked_at or now_ms()
                if row.revoked_at is None:
                    await conn.execute(
                        api_keys.update().where(api_keys.c.id == key_id).values(revoked_at=revoked_at))
                if self.bus is not None:
                    seq = await self.bus.publish(conn, row.key_hash)
                hashes.append(row.key_hash)
                revoked.append({"key_id": key_id, "revoked_at": revoked_at})
        for key_hash in hashes:
            await self.evict(key_hash)
        if self.bus is not None and seq is not None:
            await self.bus.wait_for(seq)
        return revoked

    async def evict(self, key_hash: str) -> None:
        if self.local is not None:
            await self.local.delete(f"k:{key_hash}")
        if self.cache.shared:
            # set_unless refuses positive entries while the tombstone lives, so it must
            # outlast the slowest lookup that may still write (_LOOKUP_BOUND), with room
            # for the write itself to arrive.
            await self.cache.set(f"r:{key_hash}", "1", self.ttl + 2 * _LOOKUP_BOUND)
            # (k: in Redis: the unsigned entry workers of earlier versions write, for the
            # length of a rolling upgrade.)
            await self.cache.delete(f"ks:{key_hash}", f"k:{key_hash}")
        else:
            await self.cache.delete(f"k:{key_hash}")

    # --- verifying (the /v1 hot path) ---------------------------------------------------------

    async def authenticate(self, key: str | None) -> Principal:
        """The principal behind `key`, or 401. The 401 is the same for malformed, unknown,
        revoked and expired keys: it must not tell a guesser which check failed."""
        if not key:
            raise Unauthorized(_MISSING)
        if len(key) != KEY_LEN or not key.isascii():
            raise Unauthorized()
        key_hash = self.secret.hash(key)
        bus = self.bus
        generation = bus.generation if bus is not None else 0
        rotated = False
        while True:  # twice at most: a key made before a rotation is remembered by its old hash
            cached = await self._cached(key_hash)
            if cached is not None or rotated:
                break
            # Before any I/O: only keys that passed this check are ever cached, so a hit
            # above needed none.
            secret = tag_secret(key, self._secrets)
            if secret is None:
                raise Unauthorized()
            if secret is self.secret:
                break
            rotated, key_hash = True, secret.hash(key)
        if cached is None:
            principal = await self._verify(key_hash, generation, rotated)
        else:
            principal = None if cached == _NEGATIVE else Principal.decode(cached)
        return self._admit(principal)

    async def _cached(self, key_hash: str) -> str | None:
        """This worker's own copy, trusted only while a revoke would wait for this worker
        (memory://: an unknown key's entry stays good, no revocation makes a key valid)."""
        bus = self.bus
        if self.local is not None:
            return await self.local.get(f"k:{key_hash}") if bus is not None and bus.fresh() else None
        if self.cache.shared:
            return None
        cached = await self.cache.get(f"k:{key_hash}")
        if cached not in (None, _NEGATIVE) and bus is not None and not bus.fresh():
            return None  # this worker may have missed a revocation: ask the database
        return cached

    def _admit(self, principal: Principal | None) -> Principal:
        if principal is None:
            raise Unauthorized()
        if principal.expires_at is not None and principal.expires_at <= now_ms():
            raise Unauthorized()
        self._last_used[principal.key_id] = now_ms()
        return principal

    async def _verify(self, key_hash: str, generation: int, rotated: bool) -> Principal | None:
        """A key this worker does not remember: the shared cache, then the database."""
        bus = self.bus
        if self.cache.shared:
            if bus is not None and key_hash in bus.revoked:
                return None  # revocation is final: whatever Redis holds now is not believed
            value, revoked, left = await self.cache.get_guarded(f"ks:{key_hash}", f"r:{key_hash}")
            if revoked:  # revoked moments ago: no lookup needed
                return None
            opened = self._unseal(key_hash, value) if value is not None else None
            if opened is not None:
                payload, until = opened
                await self._remember_locally(key_hash, payload, generation,
                                             min(left, (until - now_ms()) / 1000, self.ttl))
                return None if payload == _NEGATIVE else Principal.decode(payload)
        return await self._look_up_and_cache(key_hash, generation, rotated)

    def _unseal(self, key_hash: str, value: str) -> tuple[str, int] | None:
        """The payload of a shared entry and its end (epoch ms), or None: then it is a miss."""
        for secret in self._secrets:  # an entry written just before a rotation still verifies
            opened = secret.unseal(key_hash, value)
            if opened is not None:
                if opened[1] > now_ms():
                    return opened
                outcome = "expired"
                break
        else:
            outcome = "bad_signature" if value.count("|") >= 2 else "unparsable"
        from tollway.telemetry import log  # (imported here: the CLI never gets this far)

        # Metadata only: neither the value nor the key hash is logged.
        log.warning("key_cache_entry_rejected", outcome=outcome)
        return None

    async def _look_up_and_cache(self, key_hash: str, generation: int, rotated: bool) -> Principal | None:
        started, started_ms = time.monotonic(), now_ms()
        principal = await self._lookup(key_hash)
        elapsed = time.monotonic() - started
        if elapsed > _LOOKUP_BOUND:
            # What was read may predate a revocation whose tombstone expired meanwhile (a
            # paused worker): neither cached nor believed.
            raise ServiceUnavailable("The gateway's database is unavailable; retry shortly.",
                                     code="database_unavailable")
        if principal is not None and rotated:
            from tollway.telemetry import log

            log.info("key_verified_with_previous_secret", key_id=principal.key_id)
        bus = self.bus
        payload, ttl = (principal.encode(), self.ttl) if principal else (_NEGATIVE, self.negative_ttl)
        if self.cache.shared:
            if bus is not None and key_hash in bus.revoked:
                return None  # revoked since the read: Redis may have lost the tombstone
            # Valid until `ttl` after the read started, so an entry written late lives less.
            sealed = self.secret.seal(key_hash, payload, started_ms + int(ttl * 1000))
            if principal is not None:
                # One atomic step: a revocation whose tombstone landed after our read wins.
                if not await self.cache.set_unless(f"ks:{key_hash}", sealed, ttl - elapsed, guard=f"r:{key_hash}"):
                    return None
                await self._remember_locally(key_hash, payload, generation, ttl - elapsed)
            elif bus is None or bus.generation == generation:
                await self.cache.set(f"ks:{key_hash}", sealed, ttl - elapsed)
                await self._remember_locally(key_hash, payload, generation, ttl - elapsed)
        elif bus is None or bus.generation == generation:
            # (A per-worker cache is not refilled by a lookup that raced an eviction: the
            # row it read may predate the revocation the eviction was for.)
            await self.cache.set(f"k:{key_hash}", payload, ttl)
        return principal

    async def _remember_locally(self, key_hash: str, payload: str, generation: int, ttl: float) -> None:
        """Copy what the shared cache holds (or was just given), unsigned, into this
        worker's layer for as long as the shared entry lives (`ttl`), so a verification is
        kept no longer than key_ttl_seconds in all; unless an eviction ran since the caller
        started reading: what it read may predate the revocation that eviction was for."""
        if self.local is None or self.bus is None or self.bus.generation != generation or ttl <= 0:
            return
        await self.local.set(f"k:{key_hash}", payload, ttl)

    async def _lookup(self, key_hash: str) -> Principal | None:
        async with self.store.read() as conn:
            row = (await conn.execute(
                sa.select(api_keys.c.id, api_keys.c.tenant_id, api_keys.c.key_hash, api_keys.c.revoked_at,
                          api_keys.c.expires_at, api_keys.c.spend_limit_micros, api_keys.c.spend_limit_period,
                          api_keys.c.requests_per_minute, api_keys.c.tokens_per_minute)
                .where(api_keys.c.key_hash == key_hash)
            )).first()
        if row is None or not hmac.compare_digest(row.key_hash, key_hash) or row.revoked_at is not None:
            return None
        return Principal(row.tenant_id, row.id, row.expires_at, row.spend_limit_micros, row.spend_limit_period,
                         row.requests_per_minute, row.tokens_per_minute)

    # --- last_used_at without a write per request ----------------------------------------------

    async def flush_last_used(self) -> int:
        pending, self._last_used = self._last_used, {}
        if not pending:
            return 0
        try:
            async with self.store.write() as conn:
                await conn.execute(
                    api_keys.update().where(api_keys.c.id == sa.bindparam("kid"))
                    .values(last_used_at=sa.bindparam("ts")),
                    [{"kid": k, "ts": v} for k, v in pending.items()],
                )
        except Exception:
            for k, v in pending.items():  # kept for the next flush (newer uses win)
                self._last_used[k] = max(v, self._last_used.get(k, 0))
            raise
        return len(pending)

    async def run_last_used_flusher(self, every: float = 15.0) -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):  # retried on the next tick; never fatal
                await self.flush_last_used()


def _check_rate_limits(*values: int | None) -> None:
    for value in values:
        if value is not None and not 0 <= value <= MAX_PER_MINUTE:
            raise BadRequest(f"a rate limit is a whole number from 0 (unlimited) to {MAX_PER_MINUTE} per minute")


def bearer_key(headers: Any) -> str | None:
    """The customer key from Authorization: Bearer or x-api-key (Anthropic clients)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    value = headers.get("x-api-key")
    return value.strip() if value else None
