"""The service objects one process uses, built from config: the CLI, the admin API and
the /v1 path all call these same objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tollway.auth.key_secret import load_key_secret, load_previous_secret
from tollway.auth.keys import Keys
from tollway.auth.workers import WorkerRegistry
from tollway.config import Config, LimitsConfig, resolve_secret
from tollway.ledger.holds import MemoryHolds
from tollway.ledger.transactions import Ledger
from tollway.proxy.ratelimit import Limiter
from tollway.store.cache import Cache, MemoryCache, make_cache
from tollway.store.db import Store, sqlite_path
from tollway.store.redis_wire import RedisWire
from tollway.tenants import Tenants

if TYPE_CHECKING:
    from tollway.webhooks.stripe import Payments


@dataclass
class Services:
    config: Config
    store: Store
    cache: Cache
    keys: Keys
    ledger: Ledger
    tenants: Tenants
    workers: WorkerRegistry
    notices: list[str]
    payments: Payments | None = None  # Stripe top-ups; None without a [stripe] table
    limiter: Limiter = field(default_factory=lambda: Limiter(LimitsConfig()))  # per-key rate limits

    async def close(self) -> None:
        await self.limiter.close()  # its last batch of token counts, while Redis is open
        await self.ledger.close()  # the journaled charges first, while the store is open
        if self.payments is not None:
            await self.payments.close()
        await self.keys.close()
        await self.cache.close()
        await self.store.close()


def config_dir(cfg: Config) -> Path | None:
    return Path(cfg.source).resolve().parent if cfg.source and not cfg.source.startswith("<") else None


def _password(cfg: Config, env: str, section: str) -> str | None:
    if not env:
        return None
    return resolve_secret(env, path=f"{section}.password_env", source=cfg.source).reveal()


def build(cfg: Config, *, worker_id: str | None = None, sole_server: bool = False) -> Services:
    """worker_id None: a client process (CLI) that serves no requests. `sole_server`: this
    process will be the only one serving from its database; on SQLite it then keeps its
    holds in memory (ledger/holds.py), and the app's lifespan takes the lock that makes it so."""
    base = config_dir(cfg)
    store = Store(cfg.database.url, base_dir=base, password=_password(cfg, cfg.database.password_env, "database"),
                  pool_size=cfg.database.pool_size, pool_timeout=cfg.database.pool_timeout_seconds)
    cache_password = _password(cfg, cfg.cache.password_env, "cache")
    cache = make_cache(cfg.cache.url, password=cache_password)
    secret, notice = load_key_secret(cfg.server.key_secret_env, sqlite_path(cfg.database.url, base))
    previous, rotation = load_previous_secret(cfg.server.key_secret_previous_env, secret)
    # Each worker keeps verified keys in memory; with Redis that is a layer in front of it,
    # which saves a Redis round trip per request (auth/keys.py). The revocation bus evicts from it.
    registry = WorkerRegistry(store, MemoryCache() if cache.shared else cache, worker_id,
                              release_after=cfg.server.worker_release_after_seconds)
    key_options: dict[str, Any] = {"ttl": cfg.cache.key_ttl_seconds, "negative_ttl": cfg.cache.negative_ttl_seconds,
                                   "bus": registry, "previous": previous}
    keys: Keys
    if cfg.auth.clerk:  # keys issued and verified by Clerk (auth/clerk.py)
        from tollway.auth.clerk import ClerkKeys
        from tollway.auth.clerk_api import ClerkAPI

        keys = ClerkKeys(store, cache, secret, api=ClerkAPI(cfg.auth, cfg.source), **key_options)
    else:
        keys = Keys(store, cache, secret, **key_options)
    in_memory = sole_server and store.sqlite_file is not None
    ledger = Ledger(store, MemoryHolds() if in_memory else None, journaled=in_memory)
    payments = None
    if cfg.stripe is not None:
        from tollway.webhooks.stripe import Payments  # imports stripe-python only when used

        payments = Payments(cfg.stripe, store, ledger, cfg.source)
    tenants = Tenants(store, ledger, keys)
    if cfg.auth.clerk:
        from tollway.auth.clerk import ClerkKeys

        assert isinstance(keys, ClerkKeys)
        keys.tenants = tenants
    return Services(cfg, store, cache, keys, ledger, tenants, registry,
                    [n for n in (notice, rotation) if n], payments,
                    Limiter(cfg.limits, RedisWire(cfg.cache.url, cache_password) if cache.shared else None))
