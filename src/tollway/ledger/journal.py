"""The charge journal: how the embedded default makes a request's charge durable with one
append to a file instead of a write transaction of its own.

Why. With holds in memory (ledger/holds.py) the settle was the one write transaction left per
request, and at one connection a lone SQLite transaction (BEGIN IMMEDIATE, its
statements, COMMIT, ~5 pages of WAL, a turn of the event loop) was ~30% of a request's
CPU (bench/README.md, eighth pass). A charge only has to be durable before the answer
leaves; it does not have to be in the ledger tables yet. So the sole serving process
appends the charge, as one line, to `<database>-charges.<n>`, and applies the lines it
has gathered to the ledger every FLUSH_SECONDS in one transaction, whose pages are shared
by all of them: the rows are those each settle would have written, but a tenant's charges
take one wallet update and one insert per table (`Ledger._charges`).

Durability is the database's own: an `os.write` is in the kernel's page cache when it
returns, where it survives the process (SIGKILL, a crash), just as a COMMIT does with
SQLite's synchronous=NORMAL; neither survives a power loss unflushed. A line half
written by a power loss is skipped (its JSON does not parse).

Until it is applied a charge stays in memory as a charged hold (ledger/holds.py): it is
deducted from every balance read, reservation check and key-limit check, so nothing
can spend the money twice, and nothing is counted twice once it is applied, because the
hold leaves memory in the same step of the loop as the transaction that applies it
(and comes back if that transaction's COMMIT fails).

Recovery: whoever next serves from the database (a restart, or the workers of
`serve --workers N`) applies every journal file left behind before serving, each charge
at most once: a request whose `:debit` entry or usage row exists is skipped, in the
same write transaction that would insert them. Then the files are deleted.

Files: a flush closes the current file and the next charge opens a new one, so a file
is deleted once every line in it has been applied, without rewriting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection

from tollway.ledger.holds import Hold, MemoryHolds
from tollway.store.db import Store
from tollway.telemetry import log

FLUSH_SECONDS = 0.01  # how long a charge may wait to be applied; the CLI's reads lag by as much
RETRY_SECONDS = 1.0   # after a failed flush (the database is down): the charges stay held and journaled


@dataclass(slots=True)
class Charge:
    """One request's settled charge, as the journal records it."""

    request_id: str
    tenant_id: str
    amount_micros: int
    key: tuple[str, str] | None  # (key id, spend-limit period) when the key has a limit
    usage: dict[str, Any] | None  # the usage row's columns (ids and counts only: privacy.py)
    at_ms: int

    def line(self) -> bytes:
        return orjson.dumps([self.request_id, self.tenant_id, self.amount_micros, self.key, self.usage,
                             self.at_ms]) + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> Charge | None:
        try:
            rid, tenant, amount, key, usage, at = orjson.loads(line)
            return cls(str(rid), str(tenant), int(amount), (str(key[0]), str(key[1])) if key else None,
                       dict(usage) if usage is not None else None, int(at))
        except (orjson.JSONDecodeError, TypeError, ValueError, IndexError):
            return None


class JournalFiles:
    """The append-only files `<database>-charges.<n>`, created 0600 next to the database."""

    def __init__(self, database: Path) -> None:
        self.directory = database.parent
        self.prefix = database.name + "-charges."
        self._fd: int | None = None
        self._path: Path | None = None
        self._next = 0

    def append(self, data: bytes) -> None:
        """One write; raises OSError (disk full, ...) with nothing recorded but perhaps a torn line."""
        if self._fd is None:
            self._open()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _open(self) -> None:
        if self._next == 0:
            # Once: afterwards this process is the only one numbering files here (the lock).
            self._next = max((_number(p) for p in self.leftovers()), default=-1) + 1
        path = self.directory / f"{self.prefix}{self._next}"
        self._next += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._path = path

    def rotate(self) -> list[Path]:
        """Close the current file (the next append opens a new one); returns it, if any."""
        path = self._path
        self.close()
        return [path] if path is not None else []

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._path = None

    def leftovers(self) -> list[Path]:
        found = [p for p in self.directory.glob(f"{self.prefix}*") if _number(p) >= 0]
        return sorted(found, key=_number)

    @staticmethod
    def read(path: Path) -> tuple[list[Charge], int]:
        """The charges in a file and how many lines could not be read (a torn last line)."""
        charges, bad = [], 0
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            charge = Charge.parse(line)
            if charge is None:
                bad += 1
            else:
                charges.append(charge)
        return charges, bad

    @staticmethod
    def discard(paths: list[Path]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _number(path: Path) -> int:
    suffix = path.name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


# (the transaction's connection, charges of one tenant, what its other requests hold) -> None
Apply = Callable[[Connection, list[Charge], int], None]


class Journal:
    """The charges this process has journaled and not yet applied, and their flush."""

    def __init__(self, files: JournalFiles, store: Store, holds: MemoryHolds, apply: Apply) -> None:
        self.files = files
        self.store = store
        self.holds = holds
        self.apply = apply
        self._pending: list[tuple[Charge, Hold]] = []
        self._carried: list[Path] = []  # closed files whose charges are all in _pending
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def unapplied(self, tenant_id: str | None = None) -> int:
        return sum(1 for c, _ in self._pending if tenant_id is None or c.tenant_id == tenant_id)

    def record(self, charge: Charge, hold: Hold) -> None:
        """Make `charge` durable and keep it held until it is applied. `hold` is the request's
        claimed hold; on OSError nothing changed in memory (the caller settles the old way)."""
        self.files.append(charge.line())
        self.holds.drop(charge.request_id)
        charged = Hold(hold.tenant_id, charge.amount_micros, hold.key, settling=True, charged=True)
        self.holds.add(charge.request_id, charged)
        self._pending.append((charge, charged))
        self._schedule(FLUSH_SECONDS)

    def _schedule(self, delay: float) -> None:
        if self._timer is None and self._task is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        delay = FLUSH_SECONDS
        try:
            await self.flush()
        except Exception as exc:
            log.warning("charge_flush_failed", exc_type=type(exc).__name__, count=len(self._pending))
            delay = RETRY_SECONDS
        finally:
            self._task = None
        if self._pending:
            self._schedule(delay)

    async def flush(self) -> None:
        """Apply every charge journaled so far; raises if the transaction failed (they stay
        pending and held, their files kept, and the next flush tries again)."""
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            files = self._carried + self.files.rotate()
            self._carried = []
            state = {"ran": False, "undone": False}

            def apply_all(conn: Connection) -> None:
                by_tenant: dict[str, list[Charge]] = {}
                in_batch: dict[str, int] = {}  # what the batch's own charged holds hold
                for charge, hold in batch:
                    by_tenant.setdefault(charge.tenant_id, []).append(charge)
                    in_batch[charge.tenant_id] = in_batch.get(charge.tenant_id, 0) + hold.amount_micros
                for tenant_id, charges in by_tenant.items():
                    self.apply(conn, charges, self.holds.held(tenant_id) - in_batch[tenant_id])
                for charge, _ in batch:  # in the COMMIT's step of the loop (journal's docstring)
                    self.holds.drop(charge.request_id)
                state["ran"] = True

            def undo() -> None:
                state["undone"] = True
                for charge, hold in batch:
                    self.holds.add(charge.request_id, hold)

            try:
                await self.store.transact_undoable(apply_all, undo)
            except BaseException:
                if state["ran"] and not state["undone"]:
                    self.files.discard(files)  # committed; only the result was lost to us
                else:
                    self._pending[:0] = batch
                    self._carried = files
                raise
            self.files.discard(files)

    async def close(self) -> None:
        """Apply what is pending (after the last request); what cannot be applied now stays
        in its files for the next start-up."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        try:
            await self.flush()
        except Exception as exc:
            log.warning("charge_flush_failed", exc_type=type(exc).__name__, count=len(self._pending))
        self.files.close()


async def recover(store: Store, files: JournalFiles, apply_once: Callable[[Connection, Charge], bool]) -> int:
    """Apply the journal files a previous process left (module docstring), then delete them.
    Returns how many charges were applied now (not before)."""
    paths = files.leftovers()
    if not paths:
        return 0
    charges: list[Charge] = []
    for path in paths:
        found, bad = files.read(path)
        charges += found
        if bad:
            log.warning("charge_journal_unreadable_lines", count=bad)
    applied = await store.transact(lambda conn: sum(1 for c in charges if apply_once(conn, c)))
    files.discard(paths)
    return applied
