"""Caches behind one small protocol: memory (one process) and Redis (shared by workers).

Values are short strings. Redis errors become ServiceUnavailable here and nowhere else,
so a Redis restart gives clients clean 503s and the client reconnects by itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from tollway.errors import ServiceUnavailable


class Cache(Protocol):
    shared: bool  # True when every worker sees the same entries

    async def get(self, key: str) -> str | None: ...
    async def get_many(self, *keys: str) -> list[str | None]: ...
    async def set(self, key: str, value: str, ttl: float) -> None: ...
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

    async def get_many(self, *keys: str) -> list[str | None]:
        return [await self.get(k) for k in keys]

    async def set(self, key: str, value: str, ttl: float) -> None:
        self._data.pop(key, None)
        self._data[key] = (time.monotonic() + ttl, value)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def delete(self, *keys: str) -> None:
        for k in keys:
            self._data.pop(k, None)

    async def close(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class RedisCache:
    shared = True

    def __init__(self, url: str, prefix: str = "tollway:") -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=10,
            retry_on_timeout=False, decode_responses=True,
        )

    def _k(self, key: str) -> str:
        return self.prefix + key

    async def get(self, key: str) -> str | None:
        try:
            value = await self.client.get(self._k(key))
        except Exception as exc:
            raise _unavailable(exc) from exc
        return str(value) if value is not None else None

    async def get_many(self, *keys: str) -> list[str | None]:
        try:
            values = await self.client.mget([self._k(k) for k in keys])
        except Exception as exc:
            raise _unavailable(exc) from exc
        return [str(v) if v is not None else None for v in values]

    async def set(self, key: str, value: str, ttl: float) -> None:
        try:
            await self.client.set(self._k(key), value, px=max(1, int(ttl * 1000)))
        except Exception as exc:
            raise _unavailable(exc) from exc

    async def delete(self, *keys: str) -> None:
        if not keys:
            return
        try:
            await self.client.delete(*[self._k(k) for k in keys])
        except Exception as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        await self.client.aclose()


def _unavailable(exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable("The gateway's cache is unavailable; retry shortly.", code="cache_unavailable")


def make_cache(url: str) -> Cache:
    if url == "memory://":
        return MemoryCache()
    return RedisCache(url)
