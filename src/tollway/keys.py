"""Customer API keys: issue, hash at rest, verify with a cache, revoke at once.

Key format: "ak_" + base64url(32 random bytes || 6-byte tag), where the tag is an HMAC
of the random part under a server secret. A key is checked in this order:
  1. length and ASCII                             -> no lookup
  2. cache ("k:<hash>", key_ttl_seconds)          -> no database read on a hit; only keys
     that passed step 3 are ever cached, so a hit skips it (one HMAC per cached request)
  3. shape (alphabet, canonical base64) and tag (constant-time HMAC compare)
                                                  -> no lookup: random or forged keys
     cost zero database reads (a guess passes with probability 2^-48)
  4. one indexed read by HMAC-SHA256 hash         -> then cached, or cached as unknown
So the bound for a flood of bad keys is: zero database reads for keys not minted with
our secret, and one read per distinct well-tagged unknown key per negative_ttl_seconds
(only someone holding the secret can mint those). Every failure, whatever the step,
answers the same 401, so the answer is no oracle for which step failed.

At rest only the keyed hash and a display prefix are stored, so a copy of the database
does not let anyone use (or even test) a key without the secret.

Revocation reaches every worker before `revoke` returns. Each worker keeps verified keys
in memory: with memory:// that is the cache; with Redis it is a layer in front of it, so
a request costs no Redis round trip (that lookup was ~20% of the gateway's CPU per
request on PostgreSQL + Redis, bench/README.md, fifth pass). A per-worker entry is
trusted only while the worker's heartbeat is fresh, and the revocation bus (workers.py)
waits until every live worker has evicted the key; in Redis the entry is deleted and a
tombstone blocks re-caching, so a worker that misses in memory cannot pick it up again.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tollway.errors import BadRequest, NotFound, Unauthorized
from tollway.store.cache import Cache
from tollway.store.db import Store, now_ms
from tollway.store.schema import api_keys, tenants
from tollway.workers import WorkerRegistry

PREFIX = "ak_"
_RANDOM_BYTES = 32
_TAG_BYTES = 6
_ENCODED_LEN = 51  # base64url of 38 bytes, unpadded
_SHAPE = re.compile(rf"ak_[A-Za-z0-9_-]{{{_ENCODED_LEN}}}")
_KEY_LEN = len(PREFIX) + _ENCODED_LEN
_NEGATIVE = "-"
_MISSING = "Missing API key. Send it as Authorization: Bearer ak_... (or x-api-key: ak_...)."
_LOOKUP_BOUND = 60  # seconds: far beyond the database's command timeout
PERIODS = ("day", "month")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from: the only identity the rest of the request sees."""

    tenant_id: str
    key_id: str
    expires_at: int | None = None
    spend_limit_micros: int | None = None
    spend_limit_period: str | None = None

    def encode(self) -> str:
        return "|".join(
            [self.tenant_id, self.key_id, str(self.expires_at or ""), str(self.spend_limit_micros or ""),
             self.spend_limit_period or ""]
        )

    @classmethod
    def decode(cls, s: str) -> Principal:
        t, k, exp, lim, per = s.split("|")
        return cls(t, k, int(exp) if exp else None, int(lim) if lim else None, per or None)

    def spend_period(self, at: float | None = None) -> str | None:
        if self.spend_limit_micros is None:
            return None
        d = datetime.fromtimestamp(at if at is not None else time.time(), UTC)
        return d.strftime("%Y-%m-%d") if self.spend_limit_period == "day" else d.strftime("%Y-%m")


class KeySecret:
    """The server secret, split into one subkey for hashing and one for the tag."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the key secret must be at least 16 bytes")
        self._hash_key = hmac.new(secret, b"tollway key hash v1", hashlib.sha256).digest()
        self._tag_key = hmac.new(secret, b"tollway key tag v1", hashlib.sha256).digest()

    # hmac.digest: the one-shot C function; an hmac.new object per call cost more than
    # the hashing (both run on every /v1 request).
    def tag(self, random_part: bytes) -> bytes:
        return hmac.digest(self._tag_key, random_part, "sha256")[:_TAG_BYTES]

    def hash(self, key: str) -> str:
        return hmac.digest(self._hash_key, key.encode("ascii"), "sha256").hex()

    def __repr__(self) -> str:
        return "KeySecret('***')"


def load_key_secret(env_name: str, sqlite_file: Path | None) -> tuple[KeySecret, str | None]:
    """From the environment; in embedded mode, else from a generated 0600 file next to the
    database. Returns the secret and a startup notice (or None)."""
    value, notice = load_secret(env_name, sqlite_file, ".tollway-key-secret", "customer-key secret")
    return KeySecret(value), notice


def load_secret(env_name: str, sqlite_file: Path | None, file_name: str, what: str) -> tuple[bytes, str | None]:
    """A server secret from `env_name`; in embedded mode, else from `file_name` next to the
    database, generated (mode 0600) on first use. Returns it and a startup notice (or None)."""
    value = os.environ.get(env_name)
    if value:
        return value.encode(), None
    if sqlite_file is None:
        raise ValueError(
            f"environment variable {env_name} is not set; every worker must share one {what} "
            f"(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    path = sqlite_file.parent / file_name
    notice = None
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a private name, then linked into place: a process starting at the
        # same moment either wins the link or reads the complete file, never half of it.
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_urlsafe(32).encode())
        try:
            os.link(tmp, path)
            notice = (f"generated the {what} at {path} (mode 0600); back it up with the "
                      f"database, or set {env_name} instead")
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    elif path.stat().st_mode & 0o077:
        notice = f"the {what} {path} is readable by other users; chmod 600 it"
    return path.read_bytes().strip(), notice


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Keys:
    def __init__(self, store: Store, cache: Cache, secret: KeySecret, *, ttl: float = 60,
                 negative_ttl: float = 5, bus: WorkerRegistry | None = None) -> None:
        self.store = store
        self.cache = cache
        self.secret = secret
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.bus = bus  # evicts revoked keys from this worker's own cache
        # With a shared cache, this worker's layer in front of it: the very cache the bus
        # evicts from, so the two can never disagree.
        self.local = bus.cache if cache.shared and bus is not None else None
        self._last_used: dict[str, int] = {}

    # --- issuing --------------------------------------------------------------------------

    def mint(self) -> str:
        rnd = secrets.token_bytes(_RANDOM_BYTES)
        raw = rnd + self.secret.tag(rnd)
        return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    async def create(self, tenant_id: str, *, name: str | None = None, expires_at: int | None = None,
                     spend_limit_micros: int | None = None, spend_limit_period: str | None = None
                     ) -> dict[str, Any]:
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
                spend_limit_period=spend_limit_period))
        return {"key_id": key_id, "key": key, "tenant_id": tenant_id, "prefix": key[:7]}

    async def list(self, tenant_id: str) -> list[dict[str, Any]]:
        cols = [c for c in api_keys.c if c.name != "key_hash"]
        async with self.store.read() as conn:
            rows = (await conn.execute(
                sa.select(*cols).where(api_keys.c.tenant_id == tenant_id).order_by(api_keys.c.created_at)
            )).mappings().all()
        return [dict(r) for r in rows]

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
            # outlast the slowest lookup that read the key before the revocation committed.
            await self.cache.set(f"r:{key_hash}", "1", self.ttl + _LOOKUP_BOUND)
        await self.cache.delete(f"k:{key_hash}")

    # --- verifying (the /v1 hot path) ---------------------------------------------------------

    def check_shape(self, key: str) -> bool:
        if len(key) != _KEY_LEN or not _SHAPE.fullmatch(key):
            return False
        body = key[len(PREFIX):]
        raw = base64.urlsafe_b64decode(body + "=")
        # The last character carries 2 unused bits; only the canonical spelling is a key.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != body:
            return False
        return hmac.compare_digest(raw[_RANDOM_BYTES:], self.secret.tag(raw[:_RANDOM_BYTES]))

    async def authenticate(self, key: str | None) -> Principal:
        """The principal behind `key`, or 401. The 401 is the same for malformed, unknown,
        revoked and expired keys: it must not tell a guesser which check failed."""
        if not key:
            raise Unauthorized(_MISSING)
        if len(key) != _KEY_LEN or not key.isascii():
            raise Unauthorized()
        key_hash = self.secret.hash(key)
        bus, local = self.bus, self.local
        generation = bus.generation if bus is not None else 0
        if self.cache.shared:
            cached = None
            if local is not None and bus is not None and bus.fresh():
                cached = await local.get(f"k:{key_hash}")
            if cached is None:
                cached, revoked, left = await self.cache.get_guarded(f"k:{key_hash}", f"r:{key_hash}")
                if revoked:  # revoked moments ago (revocation is final): no lookup needed
                    raise Unauthorized()
                if cached is not None:
                    await self._remember_locally(key_hash, cached, generation, left)
        else:
            cached = await self.cache.get(f"k:{key_hash}")
            if cached not in (None, _NEGATIVE) and self.bus is not None and not self.bus.fresh():
                # This worker may have missed a revocation: ask the database. (A negative
                # entry stays good: no revocation can make an unknown key valid.)
                cached = None
        # Only keys that passed the shape check are ever cached, so a cache hit needs no
        # second check; a miss must pass it before the database is asked.
        if cached is None and not self.check_shape(key):
            raise Unauthorized()
        if cached is None:
            principal = await self._lookup(key_hash)
            value, ttl = (principal.encode(), self.ttl) if principal else (_NEGATIVE, self.negative_ttl)
            if self.cache.shared and principal is not None:
                # One atomic step: a revocation whose tombstone landed after our read wins.
                if not await self.cache.set_unless(f"k:{key_hash}", value, ttl, guard=f"r:{key_hash}"):
                    principal = None
                else:
                    await self._remember_locally(key_hash, value, generation, ttl)
            elif bus is None or bus.generation == generation:
                # (A per-worker cache is not refilled by a lookup that raced an eviction: the
                # row it read may predate the revocation the eviction was for.)
                await self.cache.set(f"k:{key_hash}", value, ttl)
                await self._remember_locally(key_hash, value, generation, ttl)
        elif cached == _NEGATIVE:
            principal = None
        else:
            principal = Principal.decode(cached)
        if principal is None:
            raise Unauthorized()
        if principal.expires_at is not None and principal.expires_at <= now_ms():
            raise Unauthorized()
        self._last_used[principal.key_id] = now_ms()
        return principal

    async def _remember_locally(self, key_hash: str, value: str, generation: int, ttl: float) -> None:
        """Copy what the shared cache holds (or was just given) into this worker's layer
        for as long as the shared entry lives (`ttl`), so a verification is kept no longer
        than key_ttl_seconds in all; unless an eviction ran since the caller started
        reading: what it read may predate the revocation that eviction was for."""
        if self.local is None or self.bus is None or self.bus.generation != generation or ttl <= 0:
            return
        await self.local.set(f"k:{key_hash}", value, ttl)

    async def _lookup(self, key_hash: str) -> Principal | None:
        async with self.store.read() as conn:
            row = (await conn.execute(
                sa.select(api_keys.c.id, api_keys.c.tenant_id, api_keys.c.key_hash, api_keys.c.revoked_at,
                          api_keys.c.expires_at, api_keys.c.spend_limit_micros, api_keys.c.spend_limit_period)
                .where(api_keys.c.key_hash == key_hash)
            )).first()
        if row is None or not hmac.compare_digest(row.key_hash, key_hash) or row.revoked_at is not None:
            return None
        return Principal(row.tenant_id, row.id, row.expires_at, row.spend_limit_micros, row.spend_limit_period)

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


def bearer_key(headers: Any) -> str | None:
    """The customer key from Authorization: Bearer or x-api-key (Anthropic clients)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    value = headers.get("x-api-key")
    return value.strip() if value else None
