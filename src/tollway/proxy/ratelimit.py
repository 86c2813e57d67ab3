"""Per-key rate limits: requests per minute and tokens per minute.

Map:
  Limits         one key's limits: its own setting (api_keys.requests_per_minute /
                 tokens_per_minute, on the Principal) or the [limits] default; 0 = unlimited
  Decision       what admission found, as OpenAI's x-ratelimit-* headers and Retry-After
  MemoryState    the GCRA state of one process: key id -> (request TAT, token TAT), entries
                 of idle keys dropped, so it holds at most the keys seen in the last minute
  RedisState     the same state in Redis ("rl:<key id>"): admission is one Lua script (one
                 round trip, on store/redis_wire.py's lean connection); token charges are
                 batched, one script call per worker per 0.1 s at most; a busy key far from
                 its limits takes a few slots ahead in its admission call (a lease,
                 ratelimit_leases.py), so it needs Redis once per several requests
  Limiter        what the pipeline calls: `admit` right after authentication (429 or the
                 headers every response of a limited key carries), `used` after the settle;
                 with Redis, a failing Redis sends it to a per-worker MemoryState (fail-open)

The algorithm is GCRA (a token bucket kept as one "theoretical arrival time" per key and
dimension, docs/design.md): requests are admitted while the bucket holds a request's
share of the minute; tokens are charged at the settle, as billed (prompt + completion),
and a request is refused while the tokens used in the last minute reach the limit. A
refusal changes no state, forwards nothing and reserves nothing. Times are milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tollway.auth.keys import Principal
from tollway.config import LimitsConfig
from tollway.errors import RateLimited
from tollway.proxy import ratelimit_leases
from tollway.proxy.ratelimit_leases import LeaseBook
from tollway.store.redis_wire import RedisWire, sha1
from tollway.telemetry import log

WINDOW_MS = 60_000.0
_SWEEP_EVERY_MS = 10_000.0
OUTAGE_RETRY_SECONDS = 5.0  # after a Redis failure, this worker limits in memory this long
_FLUSH_SECONDS = 0.1  # token counts reach Redis this late at most; one call per worker per 0.1 s
_EPSILON = 1e-6  # floating-point slack: 3 requests of 20 000 ms fill 60 000 ms exactly

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int  # 0: no limit on requests
    tpm: int  # 0: no limit on tokens
    rpm_text: bytes = field(init=False, repr=False, compare=False)  # the limit headers' values, made once
    tpm_text: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rpm_text", b"%d" % self.rpm)
        object.__setattr__(self, "tpm_text", b"%d" % self.tpm)


class Decision:
    """What admission found. A plain slotted class: one is made per request of a limited
    key, and a frozen dataclass's __init__ costs four object.__setattr__ calls."""

    __slots__ = ("limits", "request_ms", "token_ms", "wait_ms")

    def __init__(self, limits: Limits, request_ms: float, token_ms: float, wait_ms: float) -> None:
        self.limits = limits
        self.request_ms = request_ms  # how far the request TAT is ahead of now (after this request, if admitted)
        self.token_ms = token_ms      # the same for tokens
        self.wait_ms = wait_ms        # 0: admitted; else how long until it would be

    def remaining_requests(self) -> int:
        return max(0, math.floor((WINDOW_MS - self.request_ms) * self.limits.rpm / WINDOW_MS + _EPSILON))

    def remaining_tokens(self) -> int:
        return max(0, math.floor((WINDOW_MS - self.token_ms) * self.limits.tpm / WINDOW_MS + _EPSILON))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's headers, for the dimensions this key is limited in. `reset` is the time
        until the bucket is full again ("resets to its initial state")."""
        lim = self.limits
        out = [(b"x-ratelimit-limit-requests", lim.rpm_text),
               (b"x-ratelimit-remaining-requests", b"%d" % self.remaining_requests()),
               (b"x-ratelimit-reset-requests", duration(self.request_ms).encode())] if lim.rpm else []
        if lim.tpm:
            out += [(b"x-ratelimit-limit-tokens", lim.tpm_text),
                    (b"x-ratelimit-remaining-tokens", b"%d" % self.remaining_tokens()),
                    (b"x-ratelimit-reset-tokens", duration(self.token_ms).encode())]
        return out

    def refusal(self) -> RateLimited:
        seconds = max(1, math.ceil(self.wait_ms / 1000))
        lim = self.limits
        if lim.tpm and self.token_ms >= WINDOW_MS:
            used = math.ceil(self.token_ms * lim.tpm / WINDOW_MS - _EPSILON)
            what = f"tokens per min (TPM): Limit {lim.tpm}, Used {used}"
        else:
            what = f"requests per min (RPM): Limit {lim.rpm}, Used {lim.rpm - self.remaining_requests()}, Requested 1"
        return RateLimited(f"Rate limit reached for this API key on {what}. Please try again in "
                           f"{duration(self.wait_ms)}.", headers={"retry-after": str(seconds)})


def duration(ms: float) -> str:
    """A duration as OpenAI writes it (Go's time.Duration): 0s, 120ms, 8.64s, 6m0s, 1h0m0s."""
    ms = max(0, math.ceil(ms))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


def _intervals(lim: Limits) -> tuple[float, float]:
    """Milliseconds of the minute one request and one token take."""
    return (WINDOW_MS / lim.rpm if lim.rpm else 0.0, WINDOW_MS / lim.tpm if lim.tpm else 0.0)


def gcra(tat_r: float, tat_t: float, now: float, lim: Limits) -> tuple[Decision, float]:
    """The decision for one request and the request TAT to store if it is admitted."""
    ri, _ = _intervals(lim)
    tat_r, tat_t = max(tat_r, now), max(tat_t, now)
    wait = tat_t - now - WINDOW_MS + 1 if lim.tpm and tat_t - now >= WINDOW_MS - _EPSILON else 0.0
    new_r = tat_r + ri
    if lim.rpm and new_r - now > WINDOW_MS + _EPSILON:
        wait = max(wait, new_r - now - WINDOW_MS)
    if wait > 0:
        return Decision(lim, tat_r - now, tat_t - now, wait), tat_r
    return Decision(lim, new_r - now, tat_t - now, 0.0), new_r


class MemoryState:
    """GCRA state of one process. Only authenticated keys reach it, and an entry whose
    buckets are full again is dropped by the next sweep: it holds at most the keys used
    within the last minute (or still paying off tokens), never one per guessed key."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or (lambda: time.monotonic() * 1000)
        self._tats: dict[str, list[float]] = {}
        self._next_sweep = 0.0

    def admit(self, key_id: str, lim: Limits) -> Decision:
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        tats = self._tats.get(key_id)
        decision, new_r = gcra(tats[0], tats[1], now, lim) if tats else gcra(0.0, 0.0, now, lim)
        if not decision.wait_ms:
            if tats is None:
                self._tats[key_id] = [new_r, now]
            else:
                tats[0] = new_r
        return decision

    def charge(self, key_id: str, token_ms: float) -> None:
        now = self.clock()
        tats = self._tats.setdefault(key_id, [now, now])
        tats[1] = max(tats[1], now) + token_ms

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_EVERY_MS
        for key_id in [k for k, (r, t) in self._tats.items() if r <= now and t <= now]:
            del self._tats[key_id]

    def __len__(self) -> int:
        return len(self._tats)


# KEYS[1] = "rl:<key id>" (hash: r = request TAT, t = token TAT); ARGV = now, request and
# token interval (0: that dimension is unlimited), window, slots wanted (1 + a lease,
# ratelimit_leases.py), the lease's length; all milliseconds. A lease's slots are counted
# as arriving when it ends (their latest use), so the bucket's drain meanwhile cannot make
# room for them twice; they are granted only while the bucket stays at least a quarter
# empty after them and the token bucket at least half. Returns the request TAT after this
# request and after the lease, the token TAT (all ahead of now), the wait, the slots
# granted. What is not a number (written by someone else) reads as 0. Numbers go back as
# strings: Redis would truncate a Lua number to an integer.
_ADMIT = """
local now, ri, ti, w = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n, len = math.floor(tonumber(ARGV[5]) or 1), tonumber(ARGV[6]) or 0
local s = redis.call('HMGET', KEYS[1], 'r', 't')
local r, t = math.max(tonumber(s[1]) or 0, now), math.max(tonumber(s[2]) or 0, now)
local wait = 0
if ti > 0 and t - now >= w - 1e-6 then wait = t - now - w + 1 end
local nr = r + ri
if ri > 0 and nr - now > w + 1e-6 then wait = math.max(wait, nr - now - w) end
if wait > 0 then return {tostring(r - now), tostring(r - now), tostring(t - now), tostring(wait), '0'} end
local g, lr = 1, nr
if n > 1 and (ti == 0 or t - now <= w / 2) then
  if ri > 0 then
    local from = math.max(nr, now + len)
    g = 1 + math.max(0, math.min(n - 1, math.floor((w * 0.75 - (from - now)) / ri)))
    if g > 1 then lr = from + (g - 1) * ri end
  else
    g = n
  end
end
if ri > 0 then
  redis.call('HSET', KEYS[1], 'r', tostring(lr))
  redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(lr, t) - now) + 1000)
end
return {tostring(nr - now), tostring(lr - now), tostring(t - now), '0', tostring(g)}
"""

# KEYS = state keys; ARGV[1] = now, then for KEYS[i]: ARGV[2i] = milliseconds of tokens to
# add, ARGV[2i + 1] = milliseconds of leased request slots to give back (not past now).
_CHARGE = """
local now = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  local s = redis.call('HMGET', k, 'r', 't')
  local t = math.max(tonumber(s[2]) or 0, now) + tonumber(ARGV[2 * i])
  local r = tonumber(s[1]) or 0
  local back = tonumber(ARGV[2 * i + 1])
  if back > 0 and r > now then
    r = math.max(r - back, now)
    redis.call('HSET', k, 'r', tostring(r))
  end
  redis.call('HSET', k, 't', tostring(t))
  redis.call('PEXPIRE', k, math.ceil(math.max(t, r) - now) + 1000)
end
return #KEYS
"""


_ADMIT_SHA, _CHARGE_SHA = sha1(_ADMIT), sha1(_CHARGE)


class RedisState:
    """The state shared by every worker, in the cache's Redis, under its prefix."""

    def __init__(self, wire: RedisWire, prefix: str, clock: Clock | None = None) -> None:
        self.wire = wire
        self.clock = clock or (lambda: time.time() * 1000)  # one clock for every host: the wall clock
        self.prefix = prefix + "rl:"

    async def admit(self, key_id: str, lim: Limits, wanted: int = 1) -> tuple[Decision, int, float, float]:
        """The decision, the slots granted (1 + a lease; 0 if refused), the clock it used
        and the request TAT after the lease (absolute)."""
        ri, ti = _intervals(lim)
        now = self.clock()
        reply = await self.wire.script(_ADMIT_SHA, _ADMIT, [self.prefix + key_id],
                                       [repr(now), repr(ri), repr(ti), repr(WINDOW_MS), str(wanted),
                                        repr(ratelimit_leases.LEASE_SECONDS * 1000)])
        if not isinstance(reply, list) or len(reply) != 5:
            raise TypeError("unexpected reply from the rate-limit script")  # fails open, logged
        decision = Decision(lim, float(reply[0]), float(reply[2]), float(reply[3]))
        return decision, int(reply[4]), now, now + float(reply[1])

    async def charge(self, tokens: dict[str, float], refunds: dict[str, float]) -> None:
        keys = list(tokens.keys() | refunds.keys())
        args = [repr(self.clock())]
        for k in keys:
            args += [repr(tokens.get(k, 0.0)), repr(refunds.get(k, 0.0))]
        await self.wire.script(_CHARGE_SHA, _CHARGE, [self.prefix + k for k in keys], args)


class Limiter:
    def __init__(self, defaults: LimitsConfig, wire: RedisWire | None = None, *, prefix: str = "tollway:",
                 clock: Clock | None = None) -> None:
        """`wire`: the cache's Redis when scaled out (shared limits); None: this process's memory."""
        self.rpm, self.tpm = defaults.requests_per_minute, defaults.tokens_per_minute
        self._default = Limits(self.rpm, self.tpm) if self.rpm or self.tpm else None
        self.memory = MemoryState(clock)
        self.shared = RedisState(wire, prefix, clock) if wire is not None else None
        self._down_until = 0.0  # monotonic seconds; Redis is not tried before
        self._pending: dict[str, float] = {}
        self.leases = LeaseBook()  # with Redis: slots taken ahead for busy keys (ratelimit_leases.py)
        self._flusher: asyncio.Task[None] | None = None

    def limits(self, p: Principal) -> Limits | None:
        if p.requests_per_minute is None and p.tokens_per_minute is None:
            return self._default
        rpm = self.rpm if p.requests_per_minute is None else p.requests_per_minute
        tpm = self.tpm if p.tokens_per_minute is None else p.tokens_per_minute
        return Limits(rpm, tpm) if rpm or tpm else None

    async def admit(self, p: Principal, state: dict[str, Any]) -> None:
        """Admit one request of `p` or raise 429. A limited key's every response from here
        on carries the x-ratelimit-* headers (edge.py adds state["response_headers"])."""
        lim = self.limits(p)
        if lim is None:
            return
        decision = None
        if self.shared is not None:
            leased = self.leases.take(p.key_id, lim, self.shared.clock())
            if leased is not None:
                decision = Decision(lim, leased[0], leased[1], 0.0)
            elif time.monotonic() >= self._down_until:
                with contextlib.suppress(Exception):  # (logged once by `_outage`)
                    decision = await self._shared(p.key_id, lim)
        if decision is None:
            decision = self.memory.admit(p.key_id, lim)
        state["response_headers"] = decision.headers()
        if decision.wait_ms:
            raise decision.refusal()

    def used(self, p: Principal, tokens: int) -> None:
        """Count the tokens a settled call of `p` used (no I/O here: Redis gets them batched)."""
        tpm = self.tpm if p.tokens_per_minute is None else p.tokens_per_minute
        if not tpm or tokens <= 0:
            return
        ms = tokens * WINDOW_MS / tpm
        self.leases.counted(p.key_id, ms)  # a lease this worker admits from sees them at once
        if self.shared is None or time.monotonic() < self._down_until:
            self.memory.charge(p.key_id, ms)
            return
        self._pending[p.key_id] = self._pending.get(p.key_id, 0.0) + ms
        self._flush_soon()

    async def _shared(self, key_id: str, lim: Limits) -> Decision:
        assert self.shared is not None
        wanted = self.leases.wanted(key_id, lim)  # >1 for one call per key at a time
        try:
            decision, granted, now, leased_to = await self.shared.admit(key_id, lim, wanted)
        except Exception:
            self._outage()
            raise
        finally:
            if wanted > 1:
                self.leases.answered(key_id)
        self._recovered()
        if granted > 1:
            self.leases.grant(key_id, lim, granted, leased_to, now + decision.token_ms, now)
            self._flush_soon()  # the lease's unused slots go back when it ends
        return decision

    def _flush_soon(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self, last: bool = False) -> None:
        while self.shared is not None and (self._pending or self.leases.leases or last):
            if not last:
                await asyncio.sleep(_FLUSH_SECONDS)  # gathers the charges of the calls settling meanwhile
            pending, self._pending = self._pending, {}
            refunds = self.leases.refunds(self.shared.clock())
            if pending or refunds:
                try:
                    await self.shared.charge(pending, refunds)
                except Exception:  # the refunds are lost: those slots refill with the minute
                    self._outage()
                    for key_id, ms in pending.items():  # counted by this worker, as its admissions now are
                        self.memory.charge(key_id, ms)
                else:
                    self._recovered()
            if last:
                return

    def _outage(self) -> None:
        if not self._down_until:
            log.warning("rate_limit_store_unavailable", exc_info=True)  # once per outage
        self._down_until = time.monotonic() + OUTAGE_RETRY_SECONDS

    def _recovered(self) -> None:
        if self._down_until:
            self._down_until = 0.0
            log.info("rate_limit_store_recovered")

    async def close(self) -> None:
        """Its last token counts and every lease's unused slots go to Redis, while it is open."""
        if self.shared is not None:
            self.leases.retire_all(self.shared.clock())  # the flusher's loop ends after its next batch
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await self._flusher
        if self.shared is not None and (self._pending or self.leases.owed()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(last=True), 2.0)
        if self.shared is not None:
            await self.shared.wire.close()
