"""Reservations held in the serving process's memory: the embedded default's holds.

Why. A hold only has to outlive the request it guards. Committed to the database (the
reservation row and its reserve entry, ledger/transactions.py) it costs a write transaction of its own
before the provider is called, the largest single cost of a request on SQLite
(docs/performance-history.md, seventh pass). Where one
process is the only one serving from the database, the same guarantee holds with the
hold kept here: the check "free balance covers the hold" and the taking of the hold run
in one synchronous step on the event loop, so no other request of the process can slip
between them, and no other process reserves from this wallet at all (`ServingLock`).
The charge is made durable before the answer leaves: appended to the charge journal
(ledger/journal.py) and applied to the ledger moments later, held here until then.

What a crash does: the holds vanish with the requests they guarded, which were not
answered in full; nothing was charged for them and nothing needs releasing, which is what
the sweep of a dead worker's committed holds achieves the slow way (auth/workers.py).
Charges of answered requests are already in the journal, which the next start applies
(ledger/embedded.py::recover_charges). What a failed settle does:
the hold stays until the sweep's backstop releases it, like a committed one, once it is
older than the longest request and its request is no longer served (Ledger.live); a
settle that comes after all still charges it (Ledger._settle_late).

One limit, on a rare path: a refund or dispute debit runs in the Stripe webhook's own
transaction, which reads what is held when its statement runs but commits a moment
later; a request reserving in between can find its hold bigger than what the debit left.
Its settle then charges what is there, never below zero (as `Ledger._take` caps any
charge), so the window can cost the operator a request, never the customer.

Where this does not apply: PostgreSQL (several hosts), and SQLite served by
`serve --workers N` with N > 1 (several processes): there holds are committed as before.
Mixing the two on one database file is refused by the lock below.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

K = TypeVar("K")
KeyPeriod = tuple[str, str]  # (key id, spend-limit period) a hold counts against


@dataclass(slots=True)
class Hold:
    tenant_id: str
    amount_micros: int
    key: KeyPeriod | None  # set when the key has a spend limit
    key_limit: int | None = None  # that limit, as it was at reserve
    settling: bool = False
    charged: bool = False  # settled and journaled, not yet applied to the ledger (ledger/journal.py)
    since_ms: int = field(default_factory=lambda: time.monotonic_ns() // 1_000_000)


class MemoryHolds:
    """The open holds of this process, with their sums per tenant and per key period,
    kept in step so a reservation check reads two dict entries, not a list."""

    def __init__(self) -> None:
        self._holds: dict[str, Hold] = {}
        self._tenant_held: dict[str, int] = {}
        self._key_held: dict[KeyPeriod, int] = {}

    def __len__(self) -> int:
        return len(self._holds)

    def held(self, tenant_id: str) -> int:
        return self._tenant_held.get(tenant_id, 0)

    def key_held(self, key: KeyPeriod) -> int:
        return self._key_held.get(key, 0)

    def add(self, request_id: str, hold: Hold) -> None:
        if request_id in self._holds:
            raise ValueError(f"request {request_id} already holds a reservation")
        self._holds[request_id] = hold
        if not hold.amount_micros:
            return
        self._tenant_held[hold.tenant_id] = self.held(hold.tenant_id) + hold.amount_micros
        if hold.key is not None:
            self._key_held[hold.key] = self.key_held(hold.key) + hold.amount_micros

    def claim(self, request_id: str) -> Hold | None:
        """The hold for its one settle: None if there is none or a settle already has it.
        It stays counted until `drop`, so a reservation checked while the charge is being
        committed still sees the money as taken."""
        hold = self._holds.get(request_id)
        if hold is None or hold.settling:
            return None
        hold.settling = True
        return hold

    def unclaim(self, request_id: str) -> None:
        """The settle failed before committing: a retry may claim the hold again."""
        hold = self._holds.get(request_id)
        if hold is not None:
            hold.settling = False

    def drop(self, request_id: str) -> None:
        hold = self._holds.pop(request_id, None)
        if hold is None:
            return
        _subtract(self._tenant_held, hold.tenant_id, hold.amount_micros)
        if hold.key is not None:
            _subtract(self._key_held, hold.key, hold.amount_micros)

    def reserved(self, tenant_id: str) -> int:
        """What the tenant's open reservations hold (held() less the charges not yet applied)."""
        return sum(h.amount_micros for h in self._holds.values() if h.tenant_id == tenant_id and not h.charged)

    def requests(self, tenant_id: str | None = None) -> list[str]:
        """The open reservations (charged holds are money already spent, not reserved)."""
        return [rid for rid, h in self._holds.items()
                if not h.charged and (tenant_id is None or h.tenant_id == tenant_id)]

    def older_than(self, ms: int) -> list[str]:
        cutoff = time.monotonic_ns() // 1_000_000 - ms
        return [rid for rid, h in self._holds.items() if h.since_ms < cutoff and not h.settling]


def _subtract(sums: dict[K, int], key: K, amount: int) -> None:
    if not amount:
        return  # a zero hold (a charge of 0 journaled) may share a sum another zero hold removed
    left = sums[key] - amount
    if left:
        sums[key] = left
    else:
        del sums[key]  # no entry for what holds nothing: the dicts stay as small as the open holds


class DatabaseInUse(RuntimeError):
    pass


class ServingLock:
    """An advisory lock on `<database>-serving`, held while a process serves requests from
    an SQLite database: exclusive for a process that keeps holds in memory (it must be the
    only one), shared for the workers of `serve --workers N` (they commit their holds and
    may run side by side). The CLI takes none: it reserves nothing. The kernel drops the
    lock when the process dies, however it dies, so a crash leaves nothing to clean up."""

    def __init__(self, database: Path, *, exclusive: bool) -> None:
        self.database = database.name  # named in the refusal (the directory is not)
        self.path = database.with_name(database.name + "-serving")
        self.exclusive = exclusive
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        f = open(self.path, "ab")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DatabaseInUse(self._conflict()) from None
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> ServingLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def _conflict(self) -> str:
        db = self.database
        if self.exclusive:
            return (f"another Tollway process is serving from {db}: a gateway that is the only process on its "
                    f"SQLite database keeps its holds in memory, so it cannot share it. Stop the other process, "
                    f"or run all of them as one `tollway serve --workers N`.")
        return (f"a single-process Tollway gateway (holds in memory) is serving from {db}; stop it before "
                f"starting workers on the same database.")
