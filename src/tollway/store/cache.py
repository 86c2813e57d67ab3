"""Caches behind one small protocol: memory (one process) and Redis (shared by workers).

Values are short strings. Redis errors become ServiceUnavailable here and nowhere else,
so a Redis outage gives clients clean 503s. A Redis restart costs at most the commands
in flight: a pooled connection found dead is reconnected once and the command retried
(every command here is idempotent), so the service recovers without a gateway restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Protocol

from tollway.errors import ServiceUnavailable


class Cache(Protocol):
    shared: bool  # True when every worker sees the same entries

    async def get(self, key: str) -> str | None: ...
    async def set(self, key: str, value: str, ttl: float) -> None: ...

    async def set_unless(self, key: str, value: str, ttl: float, guard: str) -> bool:
        """Set `key` unless `guard` exists, atomically; True when it was set. Lets a worker
        cache what it read from the database unless a revocation tombstone appeared
        meanwhile, with no window between the check and the write."""
        ...

    async def get_guarded(self, key: str, guard: str) -> tuple[str | None, bool, float]:
        """`key`'s value, whether `guard` exists, and the seconds `key` has left, read
        atomically: lets a worker keep a copy no longer than the shared entry lives."""
        ...

    async def delete(self, *keys: str) -> None: ...
    async def close(self) -> None: ...


class MemoryCache:
    """A bounded TTL map for one process (least recently written entries go first)."""

    shared = False

    def __init__(self, max_entries: int = 100_000) -> None:
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._max = max_entries

    async def get(self, key: str) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            self._data.pop(key, None)
            return None
        return item[1]

    async def set(self, key: str, value: str, ttl: float) -> None:
        self._data.pop(key, None)
        self._data[key] = (time.monotonic() + ttl, value)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def get_guarded(self, key: str, guard: str) -> tuple[str | None, bool, float]:
        value = await self.get(key)  # drops an expired entry
        left = self._data[key][0] - time.monotonic() if value is not None else 0.0
        return value, await self.get(guard) is not None, left

    async def set_unless(self, key: str, value: str, ttl: float, guard: str) -> bool:
        # No await between the check and the write: atomic within the event loop.
        if await self.get(guard) is not None:
            return False
        await self.set(key, value, ttl)
        return True

    async def delete(self, *keys: str) -> None:
        for k in keys:
            self._data.pop(k, None)

    async def close(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# KEYS[1] = key, KEYS[2] = guard. One round trip, atomic in Redis (GET gives false, not
# nil, for a missing key, so the reply keeps its three places). Whoever can write to Redis
# can put anything at `key`: another type (GET would fail), bytes that are not text (the
# client would fail to decode them) or a huge value. Each of those reads as '', a value
# that never verifies, so the caller treats it as a miss instead of failing every request.
_GET_GUARDED = """
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' or (v and (#v > 512 or string.find(v, '[^\\32-\\126]'))) then v = '' end
return {v, redis.call('EXISTS', KEYS[2]), redis.call('PTTL', KEYS[1])}
"""

# KEYS[1] = key, KEYS[2] = guard, ARGV = value, ttl in ms. One round trip, atomic in Redis.
_SET_UNLESS = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class RedisCache:
    """Shared by every worker. Keys are namespaced by `prefix`, so one Redis database
    can hold other data too."""

    shared = True

    def __init__(self, url: str, prefix: str = "tollway:", *, max_connections: int = 64,
                 timeout: float = 3.0, password: str | None = None) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.prefix = prefix
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            password=password,
            max_connections=max_connections,  # per worker; a burst waits for a free one...
            timeout=timeout,                  # ...this long, then 503
            # Commands answer in well under a millisecond, but the timer runs on this
            # worker's event loop, which a burst can keep busy for a second or more; only
            # a Redis that is unreachable without refusing (a dead host) waits this long.
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # After a Redis restart every pooled connection is dead: reconnect once and
            # retry, so clients see no error once Redis is back. Refused connections
            # (Redis still down) fail at once, without backoff, into a 503.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=30,
            decode_responses=True,
        )
        self.client = aioredis.Redis.from_pool(pool)
        self._set_unless = self.client.register_script(_SET_UNLESS)
        self._get_guarded = self.client.register_script(_GET_GUARDED)

    def _k(self, key: str) -> str:
        return self.prefix + key

    async def get(self, key: str) -> str | None:
        return _str(await self._call(self.client.get(self._k(key))))

    async def set(self, key: str, value: str, ttl: float) -> None:
        await self._call(self.client.set(self._k(key), value, px=_ms(ttl)))

    async def get_guarded(self, key: str, guard: str) -> tuple[str | None, bool, float]:
        value, guarded, left_ms = await self._call(self._get_guarded(keys=[self._k(key), self._k(guard)]))
        return _str(value), bool(guarded), max(0, int(left_ms)) / 1000 if value is not None else 0.0

    async def set_unless(self, key: str, value: str, ttl: float, guard: str) -> bool:
        # EVALSHA, falling back to EVAL after a restart flushed the script cache.
        done = await self._call(self._set_unless(keys=[self._k(key), self._k(guard)], args=[value, _ms(ttl)]))
        return bool(done)

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._call(self.client.delete(*[self._k(k) for k in keys]))

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, pending: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await pending
        except (RedisError, OSError) as exc:
            # RedisError covers connection loss, timeouts, a full pool, and refusals such
            # as OOM or a read-only replica: none is the client's fault, all are 503s.
            raise ServiceUnavailable("The gateway's cache is unavailable; retry shortly.",
                                     code="cache_unavailable") from exc


def _str(value: Any) -> str | None:
    return str(value) if value is not None else None


def _ms(ttl: float) -> int:
    return max(1, int(ttl * 1000))


def make_cache(url: str, *, password: str | None = None) -> Cache:
    if url == "memory://":
        return MemoryCache()
    return RedisCache(url, password=password)
