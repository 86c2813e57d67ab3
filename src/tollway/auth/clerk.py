"""Clerk-issued customer keys (`[auth] issuer = "clerk"`): `ClerkKeys`, the `Keys` of that mode.

A key is checked in this order:
  1. shape ("ak_", 10-200 characters of [A-Za-z0-9_-])     -> no I/O
  2. this worker's memory ("k:<hash>"), as for built-in keys -> no I/O
  3. with Redis, the shared signed entry ("ks:<hash>")       -> one round trip
  4. Clerk: POST /v1/api_keys/verify (auth/clerk_api.py)     -> then cached, or cached as unknown
where <hash> is the keyed HMAC of the secret under the customer-key secret (key_secret.py),
never the secret. A valid answer is cached key_ttl_seconds, a bad key (Clerk's 400/404, or
a 200 flagged revoked or expired) negative_ttl_seconds, in the same layers as built-in keys.

Concurrent requests with one uncached key share one Clerk call (per worker: each worker
process has its own flights; with Redis, a worker that finds another's entry makes none).
At most MAX_FLIGHTS distinct keys are verified at once per worker; past that a request
gets the 503 a Clerk outage gives, so a flood of distinct bogus keys can neither grow
memory without bound nor spend Clerk's rate limit faster than it drains. The memory layer
itself is bounded (store/cache.py).

Each verified key is mirrored as an `api_keys` row (id = Clerk's key id, key_hash = the
HMAC above, the subject's tenant): the index by which a key id or a subject finds the
cache entries to evict. Eviction is the built-in revocation (Keys._revoke): the bus
reaches every worker before it returns. Unlike a built-in revocation it is not final: Clerk
decides, so an evicted key is asked about again (and only an answer obtained after the
eviction is cached, in this worker's memory; Redis keeps the tombstone for its lifetime).

Clerk's subject (user_... or org_...) is the tenant's external_id "clerk:<subject>",
created on first sight with an empty wallet (Tenants.for_external_id: one tenant even when
workers race). Create, list and revoke go to Clerk for that subject; a revoke evicts in
the same call.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import sqlalchemy.exc

from tollway.auth.clerk_api import ClerkAPI, ClerkUnavailable
from tollway.auth.keys import _LOOKUP_BOUND, _MISSING, _NEGATIVE, Keys, Principal
from tollway.errors import BadRequest, NotFound, Unauthorized
from tollway.store.db import now_ms
from tollway.store.schema import api_keys, tenants

if TYPE_CHECKING:
    from tollway.tenants import Tenants

SUBJECT_PREFIX = "clerk:"
_SHAPE = re.compile(r"ak_[A-Za-z0-9_-]{7,197}")
MAX_FLIGHTS = 256  # distinct keys verified with Clerk at once, per worker


class ClerkKeys(Keys):
    def __init__(self, *args: Any, api: ClerkAPI, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.api = api
        self.tenants: Tenants | None = None  # set by services.build (Tenants needs the keys first)
        self._flights: dict[str, asyncio.Task[Principal | None]] = {}

    async def close(self) -> None:
        await self.api.close()

    # --- verifying (the /v1 hot path) -------------------------------------------------------

    async def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthorized(_MISSING)
        if not _SHAPE.fullmatch(key):
            raise Unauthorized()
        key_hash = self.secret.hash(key)
        cached = await self._cached(key_hash)
        if cached is None:
            principal = await self._shared_flight(key_hash, key)
        else:
            principal = None if cached == _NEGATIVE else Principal.decode(cached)
        return self._admit(principal)

    async def _shared_flight(self, key_hash: str, key: str) -> Principal | None:
        flight = self._flights.get(key_hash)
        if flight is None:
            if len(self._flights) >= MAX_FLIGHTS:
                raise ClerkUnavailable("Too many API keys are being verified at once; retry shortly.")
            generation = self.bus.generation if self.bus is not None else 0
            flight = asyncio.ensure_future(self._verify_clerk(key_hash, key, generation))
            self._flights[key_hash] = flight
            flight.add_done_callback(lambda done: self._landed(key_hash, done))
        # Shielded: a client that leaves does not cancel the call the others wait for.
        return await asyncio.shield(flight)

    def _landed(self, key_hash: str, flight: asyncio.Task[Principal | None]) -> None:
        self._flights.pop(key_hash, None)
        if not flight.cancelled():
            flight.exception()  # retrieved here too: every waiter may have left (no "never retrieved" noise)

    async def _verify_clerk(self, key_hash: str, key: str, generation: int) -> Principal | None:
        bus, shared = self.bus, self.cache.shared
        # Evicted lately: Redis is not believed, and only what Clerk says now is cached.
        evicted = bus is not None and key_hash in bus.revoked
        if shared and not evicted:
            value, evicted, left = await self.cache.get_guarded(f"ks:{key_hash}", f"r:{key_hash}")
            opened = self._unseal(key_hash, value) if value is not None and not evicted else None
            if opened is not None:
                payload, until = opened
                await self._remember_locally(key_hash, payload, generation,
                                             min(left, (until - now_ms()) / 1000, self.ttl))
                return None if payload == _NEGATIVE else Principal.decode(payload)
        started = now_ms()
        principal = await self._ask_clerk(key, key_hash)
        if now_ms() - started > _LOOKUP_BOUND * 1000:
            # As for a database lookup (keys.py): an answer this old may predate an eviction
            # whose tombstone is gone by now; neither cached nor believed.
            raise ClerkUnavailable()
        payload, ttl = (principal.encode(), self.ttl) if principal else (_NEGATIVE, self.negative_ttl)
        left = ttl - (now_ms() - started) / 1000
        if not shared:
            if bus is None or bus.generation == generation:
                await self.cache.set(f"k:{key_hash}", payload, ttl)
            return principal
        sealed = self.secret.seal(key_hash, payload, started + int(ttl * 1000))
        if principal is None:
            await self.cache.set(f"ks:{key_hash}", sealed, left)
            stored = True
        elif evicted:
            stored = True  # asked after the eviction: this worker may keep it, Redis keeps the tombstone
        else:
            # One atomic step: an eviction whose tombstone landed during our call wins.
            stored = await self.cache.set_unless(f"ks:{key_hash}", sealed, left, guard=f"r:{key_hash}")
        if stored:
            await self._remember_locally(key_hash, payload, generation, left)
        return principal

    async def _ask_clerk(self, key: str, key_hash: str) -> Principal | None:
        found = await self.api.verify(key)
        if found is None or found["revoked"] or found["expired"]:
            return None
        if found["expiration"] is not None and found["expiration"] <= now_ms():
            return None
        tenant_id = await self._tenant(found["subject"])
        rpm, tpm = await self._mirror(found, tenant_id, key_hash, key[:7])
        return Principal(tenant_id, found["id"], found["expiration"], requests_per_minute=rpm, tokens_per_minute=tpm)

    async def _tenant(self, subject: str) -> str:
        assert self.tenants is not None
        return await self.tenants.for_external_id(SUBJECT_PREFIX + subject)

    async def _mirror(self, found: dict[str, Any], tenant_id: str, key_hash: str, prefix: str
                      ) -> tuple[int | None, int | None]:
        """The key's api_keys row, by which an eviction by key id or subject finds it; returns
        the key's own rate limits kept on it (`keys update --rpm/--tpm`; None: [limits])."""
        limits: tuple[int | None, int | None] = (None, None)
        for _ in range(2):
            async with self.store.read() as conn:
                row = (await conn.execute(sa.select(api_keys.c.tenant_id, api_keys.c.key_hash, api_keys.c.revoked_at,
                                                    api_keys.c.requests_per_minute, api_keys.c.tokens_per_minute)
                                          .where(api_keys.c.id == found["id"]))).first()
            if row is not None:
                limits = (row.requests_per_minute, row.tokens_per_minute)
            if row is not None and row.tenant_id == tenant_id and row.key_hash == key_hash and row.revoked_at is None:
                return limits
            try:
                async with self.store.write() as conn:
                    if row is None:
                        await conn.execute(api_keys.insert().values(
                            id=found["id"], tenant_id=tenant_id, name=found["name"], prefix=prefix,
                            key_hash=key_hash, created_at=found["created_at"] or now_ms(),
                            expires_at=found["expiration"]))
                    else:  # Clerk accepts it again after an eviction, or it moved: Clerk decides
                        await conn.execute(api_keys.update().where(api_keys.c.id == found["id"]).values(
                            tenant_id=tenant_id, key_hash=key_hash, revoked_at=None,
                            expires_at=found["expiration"]))
                return limits
            except sa.exc.IntegrityError:
                continue  # another worker mirrored it first: look again
        return limits

    # --- keys through Tollway: Clerk's Backend API for the tenant's subject -----------------

    async def subject(self, tenant_id: str) -> str:
        async with self.store.read() as conn:
            row = (await conn.execute(sa.select(tenants.c.external_id, tenants.c.deleted_at)
                                      .where(tenants.c.id == tenant_id))).first()
        if row is None or row.deleted_at is not None:
            raise NotFound(f"no tenant {tenant_id}")
        if not (row.external_id or "").startswith(SUBJECT_PREFIX):
            raise BadRequest(f"tenant {tenant_id} is not a Clerk user or organisation; with auth.issuer = "
                             "\"clerk\" keys are made for tenants that Clerk sign-in or a Clerk key created")
        return str(row.external_id)[len(SUBJECT_PREFIX):]

    async def create(self, tenant_id: str, *, name: str | None = None, expires_at: int | None = None,
                     spend_limit_micros: int | None = None, spend_limit_period: str | None = None,
                     requests_per_minute: int | None = None, tokens_per_minute: int | None = None
                     ) -> dict[str, Any]:
        if spend_limit_micros is not None or spend_limit_period is not None:
            raise BadRequest("spend limits are not available for keys issued by Clerk (auth.issuer = \"clerk\")")
        if expires_at is not None and expires_at <= now_ms():
            raise BadRequest("expires_at must be in the future (unix epoch milliseconds)")
        subject = await self.subject(tenant_id)
        made = await self.api.create(subject, name or "API key", expires_at, now_ms())
        key = made["secret"]
        # Mirrored at once: a revoke that follows finds it even before its first use.
        await self._mirror(made, tenant_id, self.secret.hash(key), key[:7])
        own = {k: v for k, v in (("requests_per_minute", requests_per_minute),
                                 ("tokens_per_minute", tokens_per_minute)) if v is not None}
        if own:  # kept on the mirrored row, read with it at each verification
            await self.set_rate_limits(made["id"], **own)
        return {"key_id": made["id"], "key": key, "tenant_id": tenant_id, "prefix": key[:7]}

    async def list(self, tenant_id: str) -> list[dict[str, Any]]:
        subject = await self.subject(tenant_id)
        mirrored = {r["id"]: r for r in await super().list(tenant_id)}
        out = []
        for k in sorted(await self.api.list(subject), key=lambda k: k["created_at"] or 0):
            seen = mirrored.get(k["id"], {})
            out.append({
                "id": k["id"], "tenant_id": tenant_id, "name": k["name"], "prefix": seen.get("prefix") or "ak_",
                "created_at": k["created_at"], "last_used_at": k["last_used_at"] or seen.get("last_used_at"),
                "revoked_at": (k["updated_at"] or now_ms()) if k["revoked"] else None,
                "expires_at": k["expiration"], "spend_limit_micros": None, "spend_limit_period": None,
                "requests_per_minute": seen.get("requests_per_minute"),
                "tokens_per_minute": seen.get("tokens_per_minute")})
        return out

    async def get(self, tenant_id: str, key_id: str) -> dict[str, Any]:
        for row in await self.list(tenant_id):
            if row["id"] == key_id:
                return row
        raise NotFound("no such key")

    async def revoke(self, key_id: str) -> dict[str, Any]:
        """Revoked at Clerk, then evicted from every worker, before it returns."""
        revoked = await self.api.revoke(key_id, "revoked through Tollway")
        evicted = await self.evict_key(key_id)
        if not revoked and evicted is None:
            raise NotFound(f"no key {key_id}")
        return evicted or {"key_id": key_id, "revoked_at": now_ms()}

    async def evict_key(self, key_id: str) -> dict[str, Any] | None:
        """Evict a Clerk key from every worker's cache; None when no worker can hold it (never seen)."""
        with contextlib.suppress(NotFound):
            return await super().revoke(key_id)
        return None

    async def revoke_tenant(self, tenant_id: str) -> int:
        """A tenant's deletion: its keys revoked at Clerk (those Clerk still has), then evicted."""
        with contextlib.suppress(BadRequest, NotFound):  # not a Clerk subject: its mirrored keys only
            subject = await self.subject(tenant_id)
            for k in await self.api.list(subject):
                if not k["revoked"]:
                    await self.api.revoke(k["id"], "account deleted")
        return await super().revoke_tenant(tenant_id)
