"""Request slots a worker takes from Redis in advance, so that a busy key far from its
limits costs one Redis round trip per several requests instead of one per request.

Map:
  Lease       slots of one key this worker holds: `take` admits one request locally while
              the lease is fresh (LEASE_SECONDS), holds slots, has the key's limits of the
              grant, and the tokens counted since leave the token bucket under its limit
  LeaseBook   this worker's leases and each key's recent demand: `wanted` (how many slots
              to ask for with the next Redis call, one such call per key at a time),
              `grant`, `refunds` (unused slots of leases that ended or were replaced, given
              back with the token counts)

Why: a Redis round trip costs ~100-150 us of CPU per request at one connection on these
VMs (two wake-ups of an idle process), ~12% of a scaled-out request (docs/performance-
history.md). A lease never lets the workers together exceed a key's limit: its slots are
taken from the shared bucket in the script call that admits a request, counted as
arriving when the lease ends (their latest use, so the bucket's drain meanwhile cannot
make room for them twice), only while the bucket stays at least a quarter empty after
them (ratelimit.py, _ADMIT); what goes back is the unused slots less the drain since the
lease ended. A lease is sized by the key's demand on this worker in the last second (at
most LEASE_MAX) and only for keys allowed at least LEASE_MIN_RPM and LEASE_MIN_TPM: a key
with small limits is checked in Redis on every request, exactly. The cost: while a
worker holds a lease, other workers see the key's bucket fuller by up to LEASE_SECONDS of
its rate plus the unused slots. Times are milliseconds of the limiter's clock, except
`until` (the event loop's monotonic seconds).
"""

from __future__ import annotations

import time
from typing import Protocol


class Limits(Protocol):
    """A key's limits (ratelimit.Limits); 0 = none. Read here, defined there."""

    @property
    def rpm(self) -> int: ...

    @property
    def tpm(self) -> int: ...

LEASE_MAX = 16  # slots at most per lease: a worker's share stays small beside the limit
LEASE_MIN_RPM = 600  # below 10 requests a second a key gains little; it stays exact
# A lease admits for up to LEASE_SECONDS on the tokens this worker has seen: a small token
# limit stays checked in Redis on every request, where every worker's counts meet.
LEASE_MIN_TPM = 100_000
LEASE_SECONDS = 1.0  # a lease not used up by then goes back
WINDOW_MS = 60_000.0


def leasable(limits: Limits) -> bool:
    return (not limits.rpm or limits.rpm >= LEASE_MIN_RPM) and (not limits.tpm or limits.tpm >= LEASE_MIN_TPM)


class Lease:
    __slots__ = ("ends_at", "left", "limits", "request_at", "token_at", "until")

    def __init__(self, limits: Limits, left: int, request_at: float, token_at: float, ends_at: float) -> None:
        self.limits = limits
        self.left = left  # slots not used yet
        self.request_at = request_at  # the request TAT after the grant, all slots counted
        self.token_at = token_at  # the token TAT: at the grant, plus what this worker counted since
        self.ends_at = ends_at  # when the slots were counted as arriving (the limiter's clock)
        self.until = time.monotonic() + LEASE_SECONDS

    def take(self, limits: Limits, now: float) -> tuple[float, float] | None:
        """One request admitted from the lease: how far the request and token TATs are
        ahead of `now`, for its headers. None: spent, stale, other limits, or the tokens
        used up; Redis decides then."""
        if not self.left or limits != self.limits or time.monotonic() >= self.until:
            return None
        if limits.tpm and self.token_at - now >= WINDOW_MS:
            return None
        self.left -= 1
        ri = WINDOW_MS / limits.rpm if limits.rpm else 0.0
        # Slots still leased are the key's to use: they count as remaining.
        return max(0.0, self.request_at - self.left * ri - now), max(0.0, self.token_at - now)

    def unused_ms(self, now: float) -> float:
        """What to give back: its unused slots, less the drain since they were counted as
        arriving, which may already have made room for others (never more than was taken)."""
        if not self.left or not self.limits.rpm:
            return 0.0
        return max(0.0, self.left * WINDOW_MS / self.limits.rpm - max(0.0, now - self.ends_at))


class LeaseBook:
    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self._demand: dict[str, list[float]] = {}  # key id -> [window start, this window's count, last one's]
        self._asking: set[str] = set()  # keys with a lease-asking Redis call in flight
        self._refunds: dict[str, float] = {}  # key id -> request milliseconds to give back
        self._next_sweep = 0.0

    def take(self, key_id: str, limits: Limits, now: float) -> tuple[float, float] | None:
        if not leasable(limits):
            return None  # never leased: not counted either
        mono = time.monotonic()
        if mono >= self._next_sweep:
            self._sweep(mono)
        demand = self._demand.get(key_id)
        if demand is None:
            self._demand[key_id] = [mono, 1.0, 0.0]
        elif mono - demand[0] >= LEASE_SECONDS:
            demand[:] = [mono, 1.0, demand[1] if mono - demand[0] < 2 * LEASE_SECONDS else 0.0]
        else:
            demand[1] += 1
        lease = self.leases.get(key_id)
        return None if lease is None else lease.take(limits, now)

    def wanted(self, key_id: str, limits: Limits) -> int:
        """Slots to ask for: the key's requests on this worker in the last second, within
        LEASE_MAX; 1 (no lease) for a key with small limits, or while another call of this
        worker is already asking for the key (one lease at a time: `answered` ends it)."""
        if not leasable(limits) or key_id in self._asking:
            return 1
        demand = self._demand.get(key_id)
        n = 1 if demand is None else max(1, min(LEASE_MAX, int(max(demand[1], demand[2]))))
        if n > 1:
            self._asking.add(key_id)
        return n

    def answered(self, key_id: str) -> None:
        self._asking.discard(key_id)

    def grant(self, key_id: str, limits: Limits, granted: int, request_at: float, token_at: float,
              now: float) -> None:
        """Keep the slots a Redis call granted beyond the request it admitted (TATs absolute)."""
        if granted > 1:
            self._retire(key_id, now)
            self.leases[key_id] = Lease(limits, granted - 1, request_at, token_at, now + LEASE_SECONDS * 1000)

    def counted(self, key_id: str, token_ms: float) -> None:
        """Tokens this worker counted for the key: its lease sees them at once."""
        lease = self.leases.get(key_id)
        if lease is not None:
            lease.token_at += token_ms

    def refunds(self, now: float) -> dict[str, float]:
        """The unused slots of leases past their time, and of the ones replaced, to give back."""
        mono = time.monotonic()
        for key_id in [k for k, lease in self.leases.items() if lease.until <= mono]:
            self._retire(key_id, now)
        out, self._refunds = self._refunds, {}
        return out

    def retire_all(self, now: float) -> None:
        """At shutdown: every lease ends; `refunds` gives their unused slots back."""
        for key_id in list(self.leases):
            self._retire(key_id, now)

    def owed(self) -> bool:
        return bool(self._refunds)

    def _retire(self, key_id: str, now: float) -> None:
        lease = self.leases.pop(key_id, None)
        back = lease.unused_ms(now) if lease is not None else 0.0
        if back:
            self._refunds[key_id] = self._refunds.get(key_id, 0.0) + back

    def _sweep(self, mono: float) -> None:
        """The book holds only keys used in the last few seconds."""
        self._next_sweep = mono + 10 * LEASE_SECONDS
        for key_id in [k for k, d in self._demand.items() if d[0] < mono - 3 * LEASE_SECONDS]:
            del self._demand[key_id]
