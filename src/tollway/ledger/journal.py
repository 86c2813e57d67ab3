"""The charge journal: how the embedded default makes a request's charge durable with one
append to a file instead of a write transaction of its own.

Why. With holds in memory (ledger/holds.py) the settle was the one write transaction left per
request, and at one connection a lone SQLite transaction (BEGIN IMMEDIATE, its
statements, COMMIT, ~5 pages of WAL, a turn of the event loop) was ~30% of a request's
CPU (docs/performance-history.md, eighth pass). A charge only has to be durable before the answer
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
is deleted once every line in it has been applied, without rewriting anything. An append
that fails part-way (a short write, then ENOSPC or EIO) is cut off again (ftruncate to the
size before it), or, if even that fails, its file is closed and the next charge starts a
new one: the next line never lands on a torn one, where reading it would skip both.

A charge the ledger refuses (a value no column holds, a wallet that is gone) must not
stop the others: a flush applies its charges in a SAVEPOINT; if that is refused, each
tenant's in one, then each of that tenant's charges in one; one still refused is set
aside, as its journal line, in `set_aside_charges`, in the same transaction that applies
the rest, and logged. `ledger verify` reports it until an operator resolves it
(docs/ledger.md). Recovery does the same per charge, so a start-up never fails on one.
Only a refusal is set aside; an error of the database itself (locked, disk full, gone)
fails the whole flush, which is tried again, as before.

Recovery is serialised by an advisory lock on `<database>-charges.lock` (the workers of
`serve --workers N` all start by recovering): the second finds the files gone; a file
that vanishes between listing and reading was applied by another, and skipping it is
safe because whether a charge was applied is checked in the transaction that applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import sqlite

from tollway.errors import NotFound
from tollway.ledger.holds import Hold, MemoryHolds
from tollway.store.db import Store, now_ms
from tollway.store.schema import set_aside_charges
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
            if type(amount) is not int or not 0 <= amount < 2**63:
                return None  # no charge this process writes; applied, a negative one would credit
            return cls(str(rid), str(tenant), amount, (str(key[0]), str(key[1])) if key else None,
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
        self._size = 0  # of the open file: this process is its only writer (O_APPEND)
        self._closed: list[Path] = []  # given up after a failed append, not yet handed to a flush
        self._next = 0

    def append(self, data: bytes) -> None:
        """One line, whole or not at all: raises OSError (disk full, ...) with nothing recorded."""
        if self._fd is None:
            self._open()
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            self._cut_back()
            raise
        self._size += len(data)

    def _cut_back(self) -> None:
        """Remove what a failed append wrote (module docstring)."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            assert self._path is not None
            self._closed.append(self._path)
            self.close()

    def _open(self) -> None:
        if self._next == 0:
            # Once: afterwards this process is the only one numbering files here (the lock).
            self._next = max((_number(p) for p in self.leftovers()), default=-1) + 1
        path = self.directory / f"{self.prefix}{self._next}"
        self._next += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._path = path
        self._size = 0

    def rotate(self) -> list[Path]:
        """Close the current file (the next append opens a new one); returns the files
        closed since the last rotate."""
        path = self._path
        self.close()
        closed, self._closed = self._closed, []
        return closed + ([path] if path is not None else [])

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # (close after a failed write may report it again)
                os.close(self._fd)
        self._fd = self._path = None

    @contextlib.asynccontextmanager
    async def recovery_lock(self) -> AsyncIterator[None]:
        """Held while recovering (module docstring); waited for off the event loop."""
        path = self.directory / f"{self.prefix}lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def leftovers(self) -> list[Path]:
        found = [p for p in self.directory.glob(f"{self.prefix}*") if _number(p) >= 0]
        return sorted(found, key=_number)

    @staticmethod
    def read(path: Path) -> tuple[list[Charge], int]:
        """The charges in a file and how many lines could not be read (a torn last line).
        Raises FileNotFoundError if the file is gone."""
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
_SET_ASIDE = sqlite.insert(set_aside_charges).on_conflict_do_nothing()  # the journal is SQLite's


def refused(exc: BaseException) -> bool:
    """The ledger refused this charge (a value no column holds, a constraint, no wallet),
    as opposed to the database failing (locked, disk full, gone): only the first is set aside."""
    if isinstance(exc, sa.exc.DBAPIError):
        return isinstance(exc, sa.exc.IntegrityError | sa.exc.DataError)
    # (a StatementError that is no DBAPIError wraps a Python error raised binding a value)
    return isinstance(exc, sa.exc.StatementError | OverflowError | ValueError | TypeError | NotFound)


def apply_groups(conn: Connection, groups: list[tuple[list[Charge], int]], apply: Apply) -> None:
    """Each tenant's (charges, what its other requests hold), all in one SAVEPOINT (two
    statements per flush in the common case); if the ledger refuses any, again tenant by
    tenant (`apply_each`)."""
    try:
        with conn.begin_nested():
            for charges, others in groups:
                apply(conn, charges, others)
        return
    except Exception as exc:
        if not refused(exc):
            raise
    for charges, others in groups:
        apply_each(conn, charges, others, apply)


def apply_each(conn: Connection, charges: list[Charge], others: int, apply: Apply) -> list[Charge]:
    """`apply` one tenant's charges in a SAVEPOINT; if the ledger refuses them, each in its
    own (the later ones still held, as `Ledger._charges` caps them), setting aside those it
    still refuses. Returns the charges set aside."""
    try:
        with conn.begin_nested():
            apply(conn, charges, others)
        return []
    except Exception as exc:
        if not refused(exc):
            raise
        if len(charges) == 1:
            set_aside(conn, charges[0], exc)
            return charges
    aside: list[Charge] = []
    later = sum(c.amount_micros for c in charges)
    for charge in charges:
        later -= charge.amount_micros
        try:
            with conn.begin_nested():
                apply(conn, [charge], others + later)
        except Exception as exc:
            if not refused(exc):
                raise
            set_aside(conn, charge, exc)
            aside.append(charge)
    return aside


def set_aside(conn: Connection, charge: Charge, exc: BaseException) -> None:
    cause = getattr(exc, "orig", None) or exc  # the driver's message: it names no parameter values
    conn.execute(_SET_ASIDE, {"request_id": charge.request_id, "tenant_id": charge.tenant_id,
                              "amount_micros": charge.amount_micros, "charge": charge.line().decode().strip(),
                              "reason": f"{type(cause).__name__}: {cause}"[:200], "created_at": now_ms()})
    log.error("charge_set_aside", request_id=charge.request_id, tenant_id=charge.tenant_id,
              cost_micros=charge.amount_micros, exc_type=type(cause).__name__)


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
                apply_groups(conn, [(charges, self.holds.held(tenant_id) - in_batch[tenant_id])
                                    for tenant_id, charges in by_tenant.items()], self.apply)
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


async def recover(store: Store, files: JournalFiles, recorded: Callable[[Connection, Charge], bool],
                  apply: Apply) -> int:
    """Apply the journal files a previous process left (module docstring), then delete them.
    A charge `recorded` already is skipped, one the ledger refuses is set aside. Returns how
    many charges were applied now (not before, not set aside)."""
    async with files.recovery_lock():
        paths = files.leftovers()
        if not paths:
            return 0
        charges: list[Charge] = []
        for path in paths:
            try:
                found, bad = files.read(path)
            except FileNotFoundError:
                continue  # applied and deleted by another worker's recovery
            charges += found
            if bad:
                log.warning("charge_journal_unreadable_lines", count=bad)

        def apply_new(conn: Connection) -> int:
            return sum(1 for c in charges if not recorded(conn, c) and not apply_each(conn, [c], 0, apply))

        applied = await store.transact(apply_new)
        files.discard(paths)
        return applied
