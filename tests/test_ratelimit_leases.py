"""Rate-limit leases (proxy/ratelimit_leases.py) against the real Redis: a busy key far
from its limits needs Redis once per several requests, two workers sharing a key never
admit past its limit, unused slots go back, and small limits are never leased."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import REDIS_URL, need_redis
from tollway.auth.keys import Principal
from tollway.config import LimitsConfig
from tollway.errors import RateLimited
from tollway.proxy import ratelimit_leases
from tollway.proxy.ratelimit import Limiter
from tollway.store.redis_wire import RedisWire

pytestmark = pytest.mark.redis


@pytest.fixture
def prefix() -> Iterator[str]:
    need_redis()
    yield f"tollway-test:{secrets.token_hex(4)}:"


class Worker:
    """A Limiter as one worker has it, counting the admission scripts it sends."""

    def __init__(self, prefix: str, rpm: int, tpm: int = 0, clock: Callable[[], float] | None = None) -> None:
        self.wire = RedisWire(REDIS_URL)
        self.limiter = Limiter(LimitsConfig(requests_per_minute=rpm, tokens_per_minute=tpm), self.wire, prefix=prefix,
                               clock=clock)
        self.calls = 0
        script = self.wire.script

        async def counted(sha: str, body: str, keys: list[str], args: list[str]) -> object:
            self.calls += "redis.call('HMGET', KEYS[1]" in body  # the admission script, not the batches
            return await script(sha, body, keys, args)

        self.wire.script = counted  # type: ignore[method-assign]

    async def admit(self, key_id: str) -> tuple[bool, dict[bytes, bytes]]:
        state: dict[str, Any] = {}
        try:
            await self.limiter.admit(Principal("tn_t", key_id), state)
        except RateLimited:
            return False, dict(state["response_headers"])
        return True, dict(state["response_headers"])

    async def close(self) -> None:
        await self.limiter.close()


async def _request_tat(prefix: str, key_id: str) -> float:
    wire = RedisWire(REDIS_URL)
    try:
        r = await wire.call("HGET", f"{prefix}rl:{key_id}", "r")
        return float(r) if isinstance(r, str) else 0.0
    finally:
        await wire.close()


async def test_a_busy_key_far_from_its_limit_needs_redis_once_per_several_requests(prefix: str) -> None:
    w = Worker(prefix, rpm=60_000, tpm=10_000_000)
    try:
        started = time.monotonic()
        results = [await w.admit("key_busy") for _ in range(400)]
        refill = (time.monotonic() - started) * 1000  # one slot a millisecond
        assert all(ok for ok, _ in results)
        assert w.calls <= 400 / 8, f"{w.calls} admission calls for 400 requests"
        remaining = [int(h[b"x-ratelimit-remaining-requests"]) for _, h in results]
        assert remaining[-1] <= 60_000 - 400 + refill + 1, "every request is counted, leased or not"
        assert all(b"x-ratelimit-remaining-tokens" in h for _, h in results)
    finally:
        await w.close()


async def test_small_limits_are_never_leased(prefix: str) -> None:
    small_rpm = Worker(prefix, rpm=ratelimit_leases.LEASE_MIN_RPM - 1)
    small_tpm = Worker(prefix, rpm=60_000, tpm=ratelimit_leases.LEASE_MIN_TPM - 1)
    try:
        for w in (small_rpm, small_tpm):
            assert all([(await w.admit("key_small"))[0] for _ in range(40)])
            assert w.calls == 40, "one admission call per request: exact across workers"
            assert not w.limiter.leases.leases
    finally:
        await small_rpm.close()
        await small_tpm.close()


@pytest.mark.parametrize("concurrent", [False, True], ids=["in-turn", "32-at-once"])
async def test_two_workers_sharing_a_key_never_admit_past_its_limit(prefix: str, concurrent: bool) -> None:
    """In turns of 7 (both build leases), or 32 at a time per worker (calls in flight
    together each bring a lease, which are pooled): never more than the limit."""
    rpm = 1_000
    a, b = Worker(prefix, rpm=rpm), Worker(prefix, rpm=rpm)
    started = time.monotonic()
    try:
        if concurrent:
            waves = [await asyncio.gather(*(w.admit("key_wave") for w in (a, b) for _ in range(32)))
                     for _ in range(25)]
            admitted = sum(ok for wave in waves for ok, _ in wave)
        else:
            admitted = sum([(await (a if (i // 7) % 2 else b).admit("key_turns"))[0] for i in range(1_600)])
        refill = (time.monotonic() - started) * rpm / 60 + 1
        assert a.calls + b.calls < 1_600, "leases were used"
        assert admitted <= rpm + refill, admitted
        assert admitted >= rpm - 2 * ratelimit_leases.LEASE_MAX, "leased slots are used, not lost"
    finally:
        await a.close()
        await b.close()


class Clock:
    """The limiter's wall clock (ms), moved by the test; a lease's 1 s stays real time."""

    def __init__(self) -> None:
        self.ms = time.time() * 1000

    def __call__(self) -> float:
        return self.ms


@pytest.mark.parametrize("late_ms", [0, 50, 10_000])
async def test_unused_leased_slots_go_back_less_the_drain_since_the_lease_ended(
        prefix: str, monkeypatch: pytest.MonkeyPatch, late_ms: int) -> None:
    monkeypatch.setattr(ratelimit_leases, "LEASE_SECONDS", 0.3)
    clock = Clock()
    w = Worker(prefix, rpm=6_000, clock=clock)  # 10 ms a slot
    try:
        for _ in range(200):  # 2 s of slots: the request TAT stays ahead of the clock meanwhile
            assert (await w.admit("key_idle"))[0]
        lease = w.limiter.leases.leases.get("key_idle")
        assert lease is not None and lease.left > 0, "a lease holds slots not used yet"
        held, ended = lease.left, lease.ends_at
        assert ended == pytest.approx(clock.ms + 300), "its slots count as arriving when it ends"
        before = await _request_tat(prefix, "key_idle")
        clock.ms = ended + late_ms  # the refund is sent this long after the lease's end
        await asyncio.sleep(0.6)  # the lease ends (0.3 s real time); the flusher gives its slots back
        after = await _request_tat(prefix, "key_idle")
        assert not w.limiter.leases.leases
        expected = max(0.0, held * 10 - late_ms)  # the bucket drained meanwhile: that room is not given twice
        assert before - after == pytest.approx(expected, abs=0.01)
    finally:
        await w.close()


async def test_slots_used_late_are_not_counted_twice(prefix: str) -> None:
    """A, busy in the last second, sends 1 request and leases 15 slots at 0; B fills the
    bucket at 990 ms; A spends its slots then. Had the slots counted as arriving at 0,
    the drain in between would have made room for them again: 609 at 990 ms, where the
    limit allows 601 in all (1 at 0, a full bucket of 600 at 990 ms)."""
    rpm, clock = 600, Clock()  # 100 ms a slot
    a, b = Worker(prefix, rpm=rpm, clock=clock), Worker(prefix, rpm=rpm, clock=clock)
    try:
        a.limiter.leases._demand["key_late"] = [time.monotonic(), 16.0, 16.0]  # 16 requests in the last second
        admitted = (await a.admit("key_late"))[0]
        lease = a.limiter.leases.leases["key_late"]
        assert lease.left == 15
        clock.ms += 990
        admitted += sum([(await b.admit("key_late"))[0] for _ in range(rpm)])
        admitted += sum([(await a.admit("key_late"))[0] for _ in range(15)])
        assert admitted <= 1 + rpm, admitted
    finally:
        await a.close()
        await b.close()


async def test_one_worker_asks_for_one_lease_at_a_time(prefix: str) -> None:
    """200 requests of one key at once on one worker: only one of them asks for a lease,
    so the worker never parks more than LEASE_MAX slots and refuses none of its own."""
    w = Worker(prefix, rpm=600)
    try:
        w.limiter.leases._demand["key_burst"] = [time.monotonic(), 16.0, 16.0]
        results = await asyncio.gather(*(w.admit("key_burst") for _ in range(200)))
        assert all(ok for ok, _ in results), "200 of 600 a minute: every one admitted"
        held = sum(lease.left for lease in w.limiter.leases.leases.values())
        assert held <= ratelimit_leases.LEASE_MAX
    finally:
        await w.close()


async def test_close_gives_back_every_lease(prefix: str) -> None:
    w = Worker(prefix, rpm=6_000)
    for _ in range(200):
        await w.admit("key_closing")
    lease = w.limiter.leases.leases["key_closing"]
    held, before = lease.left, await _request_tat(prefix, "key_closing")
    assert held > 0
    await w.close()
    after = await _request_tat(prefix, "key_closing")
    assert after > time.time() * 1000
    assert before - after == pytest.approx(held * 10, abs=0.01)

