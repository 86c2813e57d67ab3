"""Wallets and the append-only ledger.

Every change to a balance is one ledger row whose id is its idempotency key (primary
key): applying the same entry again inserts nothing and moves nothing. Application
code inserts ledger rows and never updates or deletes them. The wallet row holds the
running balance (what the tenant can still spend, holds deducted) so a request reads
one row, not a sum; `verify` checks it against the sum of the ledger.

Why concurrent requests cannot overspend: a reservation is the conditional statement
  UPDATE wallets SET balance = balance - :amount WHERE tenant = :t AND balance >= :amount
executed in the same transaction as its ledger row. The database applies it atomically
against the latest committed balance (SQLite: one writer at a time under BEGIN
IMMEDIATE; PostgreSQL: the UPDATE takes the row lock and re-checks the condition), so
two racing requests can never both take the last dollar. A CHECK constraint keeps the
balance >= 0 even against a bug here.

On the committed paths (`serve --workers N`, PostgreSQL) a request costs two short write
transactions, reserve (before forwarding) and settle (after; it also writes the usage
row), each durable when it returns. On PostgreSQL each is one statement in the common case (ledger/postgres.py:
the same writes, atomic the same way, in one round trip). The reservation row is
settle's idempotency gate: settle deletes it and only the transaction that deleted it
moves money. An open reservation whose worker died is released in full by the sweep
(auth/workers.py), recorded as `<request>:swept`: a customer is never charged for a request
whose outcome Tollway never saw. If the worker was in fact alive (a long stall made it
look dead), its settle arrives later and charges the request then, once, capped at the
balance (`_settle_late`).

Where one process serves from an SQLite database (the embedded default), holds are kept
in that process's memory instead (ledger/embedded.py, ledger/holds.py), and a settle appends its
charge to the charge journal (ledger/journal.py) before the answer leaves: the append is
what makes the charge durable (it survives a killed process; the next start applies it),
and the charges gathered every few milliseconds are applied in one transaction: the
`:debit` entry, key spend and usage row of each, as a settle of its own would write them
(`_charge`). The wallet row holds what the ledger sums to; what is held in memory
(reservations, and charges not yet applied) is deducted when a balance is read. What a
crash costs, on every path: requests in flight were not answered in full and are released
uncharged; every answered request's charge is durable.

Entry ids: `<request>:reserve`, `<request>:release` (or `:swept`), `<request>:debit`;
operator credits `manual:<tenant>:<reference>`; Stripe `stripe:...`. An id must fit the
column (ENTRY_ID_MAX; PostgreSQL enforces it), and a manual reference must leave room for
the longer pseudonym a deletion puts in its place (MANUAL_REFERENCE_MAX).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from tollway.errors import BadRequest, Conflict, InsufficientFunds, NotFound, SpendLimitExceeded
from tollway.ledger import postgres
from tollway.ledger.embedded import MemoryPath, recover_charges
from tollway.ledger.holds import MemoryHolds
from tollway.ledger.journal import Charge, Journal
from tollway.money import format_usd
from tollway.store.db import PG_CLOCK_MS, Store, db_clock, now_ms
from tollway.store.prepared import Prepared
from tollway.store.schema import (
    api_keys,
    key_spend,
    ledger_entries,
    reservations,
    set_aside_charges,
    usage_events,
    wallets,
)
from tollway.telemetry import log

T = TypeVar("T")
P = ParamSpec("P")
ENTRY_ID_MAX: int = ledger_entries.c.id.type.length  # type: ignore[attr-defined]
# "manual:" + a pseudonym ("tn_anon_" + 16 hex) + ":" + reference must fit ENTRY_ID_MAX.
MANUAL_REFERENCE_MAX = 80

# The request path's statements, built once with bind parameters (named apart from the
# columns: SQLAlchemy reserves those in SET clauses). Building each statement per call,
# and SQLAlchemy deriving its cache key again, cost 30-40% of the ledger's CPU per
# request (docs/performance-history.md); the SQL sent is the same.
_P = sa.bindparam
_USAGE_COLUMNS = frozenset(usage_events.c.keys())


def _check_usage(usage: dict[str, Any] | None) -> None:
    if usage is not None and not usage.keys() <= _USAGE_COLUMNS:
        # Executed with parameters, unknown keys would be dropped silently.
        raise ValueError(f"not usage_events columns: {sorted(usage.keys() - _USAGE_COLUMNS)}")
_INSERT_ENTRY = Prepared(ledger_entries.insert())
_INSERT_RESERVATION = Prepared(reservations.insert())
_INSERT_RESERVATION_PG = Prepared(reservations.insert().values(created_at=PG_CLOCK_MS))
_RESERVE = Prepared(wallets.update()
            .where(wallets.c.tenant_id == _P("tenant"), wallets.c.balance_micros >= _P("amount"))
            .values(balance_micros=wallets.c.balance_micros - _P("amount"), updated_at=_P("ts"))
            .returning(wallets.c.balance_micros))
_TAKE = Prepared(wallets.update()
         .where(wallets.c.tenant_id == _P("tenant"),
                wallets.c.balance_micros + _P("held") - _P("others") >= _P("charge"))
         .values(balance_micros=wallets.c.balance_micros + _P("held") - _P("charge"), updated_at=_P("ts"))
         .returning(wallets.c.balance_micros))
_UNRESERVE = Prepared(reservations.delete().where(reservations.c.request_id == _P("rid"))
              .returning(reservations.c.tenant_id, reservations.c.amount_micros,
                         reservations.c.key_id, reservations.c.key_period))


class Ledger:
    """Money operations. Each write is one sync function on a `Connection` run by
    `Store.transact` in one write transaction: on SQLite that is one step of the group-
    committing writer instead of a thread hand-off per statement, the largest CPU cost per
    request before (docs/performance-history.md). Callers already inside a transaction pass `conn` and the same
    function runs there (`AsyncConnection.run_sync`), so there is one code path for money."""

    def __init__(self, store: Store, holds: MemoryHolds | None = None, *, journaled: bool = False) -> None:
        """`holds`: keep reservations in this process's memory (ledger/holds.py); only for a
        process that is the sole server of an SQLite database. `journaled` (with holds):
        settle through the charge journal (ledger/journal.py)."""
        if holds is not None and not store.is_sqlite:
            raise ValueError("holds in memory need the embedded database and one serving process")
        self.store = store
        self.holds = holds
        self.memory = MemoryPath(store, holds, self._charges, journaled=journaled) if holds is not None else None
        # The requests this process is serving (proxy/pipeline.py adds and discards them):
        # the sweep never releases their holds, however long they run; the relay bounds them.
        self.live: set[str] = set()
        self._insert: Any = postgresql.insert if not store.is_sqlite else sqlite.insert
        # A usage row already there means this request was recorded: keep the first.
        self._insert_usage = Prepared(self._insert(usage_events).on_conflict_do_nothing())

    async def _run(self, conn: AsyncConnection | None, fn: Callable[Concatenate[Connection, P], T],
                   *args: P.args, **kwargs: P.kwargs) -> T:
        if conn is not None:
            return await conn.run_sync(fn, *args, **kwargs)
        return await self.store.transact(fn, *args, **kwargs)

    # --- credits and manual debits ------------------------------------------------------------

    async def credit(self, tenant_id: str, amount_micros: int, entry_id: str, *, kind: str = "credit",
                     reference: str | None = None, conn: AsyncConnection | None = None) -> dict[str, Any]:
        """Add money. Idempotent on entry_id: a replay returns applied=False and changes nothing.
        With `conn`, runs inside the caller's transaction (a concurrent replay then raises
        IntegrityError there, rolling the caller's transaction back whole)."""
        if amount_micros <= 0:
            raise ValueError("credit amount must be positive")
        _check_entry_id(entry_id)
        try:
            return self._spendable(await self._run(conn, self._credit, tenant_id, amount_micros, entry_id, kind,
                                                   reference), tenant_id)
        except sa.exc.IntegrityError:
            if conn is not None:
                raise
            # A concurrent replay of the same entry won the insert; ours rolled back whole.
            return {"applied": False, "entry_id": entry_id, "balance_micros": await self.balance(tenant_id)}

    def _credit(self, conn: Connection, tenant_id: str, amount: int, entry_id: str, kind: str,
                reference: str | None) -> dict[str, Any]:
        if _exists(conn, entry_id):
            return {"applied": False, "entry_id": entry_id, "balance_micros": self._balance(conn, tenant_id)}
        new = conn.execute(
            wallets.update().where(wallets.c.tenant_id == tenant_id)
            .values(balance_micros=wallets.c.balance_micros + amount, updated_at=now_ms())
            .returning(wallets.c.balance_micros)
        ).scalar()
        if new is None:
            raise NotFound(f"no wallet for tenant {tenant_id}")
        _entry(conn, entry_id, tenant_id, kind, amount, new, reference)
        return {"applied": True, "entry_id": entry_id, "balance_micros": new}

    async def credit_manual(self, tenant_id: str, amount_micros: int, reference: str) -> dict[str, Any]:
        """An operator's credit; idempotent on (tenant, reference). The same reference with
        another amount is refused (Conflict naming it): ignoring it would tell the operator
        nothing while the wallet holds a different sum than they asked for."""
        if not 0 < len(reference) <= MANUAL_REFERENCE_MAX:
            raise BadRequest(f"reference: must be 1 to {MANUAL_REFERENCE_MAX} characters (got {len(reference)})",
                             param="reference")
        entry_id = f"manual:{tenant_id}:{reference}"
        result = await self.credit(tenant_id, amount_micros, entry_id, reference=reference)
        if not result["applied"]:
            async with self.store.read() as conn:
                before = (await conn.execute(sa.select(ledger_entries.c.amount_micros)
                                             .where(ledger_entries.c.id == entry_id))).scalar()
            if before is not None and int(before) != amount_micros:
                raise Conflict(f"reference {reference!r} already credited {format_usd(int(before))} to {tenant_id}; "
                               f"use a new reference for another amount", param="reference", code="reference_conflict")
        return result

    async def debit(self, tenant_id: str, amount_micros: int, entry_id: str, *, kind: str = "debit",
                    reference: str | None = None, conn: AsyncConnection | None = None) -> dict[str, Any]:
        """Take money back (refund, dispute, adjustment). Never below zero: the part the
        balance cannot cover is reported as `shortfall_micros`, not invented."""
        if amount_micros <= 0:
            raise ValueError("debit amount must be positive")
        _check_entry_id(entry_id)
        try:
            return self._spendable(await self._run(conn, self._debit, tenant_id, amount_micros, entry_id, kind,
                                                   reference), tenant_id)
        except sa.exc.IntegrityError:
            if conn is not None:
                raise
            return {"applied": False, "entry_id": entry_id, "balance_micros": await self.balance(tenant_id),
                    "shortfall_micros": 0}

    def _debit(self, conn: Connection, tenant_id: str, amount: int, entry_id: str, kind: str,
               reference: str | None) -> dict[str, Any]:
        if _exists(conn, entry_id):
            return {"applied": False, "entry_id": entry_id, "balance_micros": self._balance(conn, tenant_id),
                    "shortfall_micros": 0}
        taken, new = self._take(conn, tenant_id, 0, amount, self._held(tenant_id))
        _entry(conn, entry_id, tenant_id, kind, -taken, new, reference)
        return {"applied": True, "entry_id": entry_id, "balance_micros": new, "shortfall_micros": amount - taken}

    # --- the request path: reserve, then settle -------------------------------------------------

    async def reserve(self, tenant_id: str, request_id: str, amount_micros: int, *, key_id: str | None = None,
                      key_limit_micros: int | None = None, key_period: str | None = None,
                      worker_id: str | None = None) -> int:
        """Hold the most a request can cost, or raise 402 (wallet) / 429 (key spend limit)
        and hold nothing. Returns the balance left. A request id can be reserved once."""
        if amount_micros < 0:
            raise ValueError("a reservation cannot be negative")
        limit = key_limit_micros if key_limit_micros is not None and key_period is not None else None
        if self.memory is not None:
            return self.memory.reserve(tenant_id, request_id, amount_micros, key_id, limit, key_period)
        if limit is None and not self.store.is_sqlite:
            found = await self.store.statement(postgres.RESERVE, {
                "tenant": tenant_id, "amount": amount_micros, "ts": now_ms(), "rid": request_id,
                "entry_id": f"{request_id}:reserve", "key_id": key_id, "worker_id": worker_id})
            if not found:
                raise InsufficientFunds.to_reserve(amount_micros)
            return int(found[0][0])
        return await self.store.transact(
            self._reserve, tenant_id, request_id, amount_micros, key_id, limit, key_period, worker_id)

    def _reserve(self, conn: Connection, tenant_id: str, request_id: str, amount: int, key_id: str | None,
                 key_limit: int | None, key_period: str | None, worker_id: str | None) -> int:
        ts = now_ms()
        row = _RESERVE.first(conn, {"tenant": tenant_id, "amount": amount, "ts": ts})
        if row is None:
            raise InsufficientFunds.to_reserve(amount)
        if key_limit is not None:
            self._hold_key_spend(conn, key_id or "", key_period or "", amount, key_limit)
        new = row[0]
        _entry(conn, f"{request_id}:reserve", tenant_id, "reserve", -amount, new, request_id, ts)
        held = {"request_id": request_id, "tenant_id": tenant_id, "key_id": key_id,
                "key_period": key_period if key_limit is not None else None, "worker_id": worker_id,
                "amount_micros": amount}
        if self.store.is_sqlite:
            _INSERT_RESERVATION.rows(conn, {**held, "created_at": ts})
        else:  # its age is compared on the database's clock (workers.sweep): written on it too
            _INSERT_RESERVATION_PG.rows(conn, held)
        return int(new)

    def _hold_key_spend(self, conn: Connection, key_id: str, period: str, amount: int, limit: int) -> None:
        # Same shape as the wallet: one conditional upsert, atomic under concurrency.
        stmt = self._insert(key_spend).values(key_id=key_id, period=period, spent_micros=amount)
        stmt = stmt.on_conflict_do_update(
            index_elements=[key_spend.c.key_id, key_spend.c.period],
            set_={"spent_micros": key_spend.c.spent_micros + amount},
            where=key_spend.c.spent_micros + amount <= limit,
        ).returning(key_spend.c.spent_micros)
        spent = conn.execute(stmt).scalar() if amount <= limit else None
        if spent is None:
            raise SpendLimitExceeded.for_key(limit, amount)

    def _add_key_spend(self, conn: Connection, key_id: str, period: str, amount: int) -> None:
        stmt = self._insert(key_spend).values(key_id=key_id, period=period, spent_micros=amount)
        conn.execute(stmt.on_conflict_do_update(index_elements=[key_spend.c.key_id, key_spend.c.period],
                                                set_={"spent_micros": key_spend.c.spent_micros + amount}))

    async def settle(self, request_id: str, charge_micros: int, usage: dict[str, Any] | None = None) -> int | None:
        """Charge the actual cost, release the rest of the hold, and record the usage row,
        in one transaction (a hold in memory: one journal append). Returns what was
        charged, or None if there was nothing to settle (a replay: settling twice charges
        once).

        The charge is capped at what was reserved plus what the wallet still holds, so
        the balance never goes negative."""
        _check_usage(usage)
        charge = max(0, charge_micros)
        if self.memory is not None and (hold := self.memory.holds.claim(request_id)) is not None:
            return await self.memory.settle(request_id, hold, charge, usage)
        # Not held here: a hold committed (by an earlier run: its sweep or late settle), or none.
        try:
            if not self.store.is_sqlite:
                charged = await self._settle_in_one_statement(request_id, charge, usage)
                if charged is not None:
                    return charged
            return await self.store.transact(self._settle, request_id, charge, usage, False)
        except sa.exc.IntegrityError:
            # Two late settles of the same swept request raced; the other one charged it.
            return None

    def settle_at_once(self, request_id: str, charge_micros: int, usage: dict[str, Any] | None = None
                       ) -> int | None:
        """`settle` done within this step of the loop, where it can be: a hold in this
        process's memory whose charge the journal takes (MemoryPath.settle_at_once).
        Returns what was charged, or None if it cannot be done so: the caller then awaits
        `settle`, which does the rest as before. Why: the common settle then needs no task
        and no shield from cancellation (pipeline.py), which was ~7% of a non-streaming
        request's CPU at one connection (docs/performance-history.md)."""
        if self.memory is None:
            return None
        _check_usage(usage)
        return self.memory.settle_at_once(request_id, max(0, charge_micros), usage)

    def _charge(self, conn: Connection, charge: Charge, others: int) -> int:
        """The writes of a settled hold in memory: the charge, capped so the balance stays >= 0
        and `others` (what other requests hold) stays, its `:debit` entry, key spend, usage row."""
        tenant_id, rid = charge.tenant_id, charge.request_id
        charged, new = self._take(conn, tenant_id, 0, charge.amount_micros, others)
        if charged:
            _entry(conn, f"{rid}:debit", tenant_id, "debit", -charged, new, rid, charge.at_ms)
            if charge.key is not None:
                self._add_key_spend(conn, charge.key[0], charge.key[1], charged)
        self._usage(conn, rid, tenant_id, charged, charge.usage, charge.at_ms)
        return charged

    def _charges(self, conn: Connection, charges: list[Charge], others: int) -> int:
        """One tenant's charges (a journal flush), written as `_charge` writes each, with the
        same rows and balances after, but one wallet update for their sum and one insert
        statement per table: per-charge statements were most of a flush's cost. Returns the
        total charged. If the wallet cannot cover the sum with `others` left (a debit raced
        them; ledger/holds.py), each is charged on its own, capped, in order."""
        if len(charges) == 1:
            return self._charge(conn, charges[0], others)
        total = sum(c.amount_micros for c in charges)
        tenant_id = charges[0].tenant_id
        row = _TAKE.first(conn, {"tenant": tenant_id, "held": 0, "others": others, "charge": total,
                                 "ts": now_ms()})
        if row is None:
            charged, later = 0, total
            for charge in charges:
                later -= charge.amount_micros  # later charges of the batch are still held
                charged += self._charge(conn, charge, others + later)
            return charged
        after, entries, usage_rows = int(row[0]) + total, [], []
        spend: dict[tuple[str, str], int] = {}
        for charge in charges:
            rid, amount = charge.request_id, charge.amount_micros
            after -= amount
            if amount:
                entries.append({"id": f"{rid}:debit", "tenant_id": tenant_id, "kind": "debit",
                                "amount_micros": -amount, "balance_after_micros": after, "reference": rid,
                                "created_at": charge.at_ms})
                if charge.key is not None:
                    spend[charge.key] = spend.get(charge.key, 0) + amount
            if charge.usage is not None:
                usage_rows.append(_usage_row(rid, tenant_id, amount, charge.usage, charge.at_ms))
        if entries:
            _INSERT_ENTRY.many(conn, entries)
        for (key_id, period), amount in spend.items():
            self._add_key_spend(conn, key_id, period, amount)
        by_columns: dict[frozenset[str], list[dict[str, Any]]] = {}
        for usage_row in usage_rows:  # one executemany needs the same columns in every row
            by_columns.setdefault(frozenset(usage_row), []).append(usage_row)
        for same in by_columns.values():
            self._insert_usage.many(conn, same)
        return total

    async def recover_charges(self) -> int:
        """Apply what a previous process left in the charge journal (ledger/embedded.py)."""
        return await recover_charges(self.store, self._charges)

    @property
    def journal(self) -> Journal | None:
        return self.memory.journal if self.memory is not None else None

    async def flush(self) -> None:
        """Apply the journaled charges now, so the ledger tables show every settled request."""
        if self.journal is not None:
            await self.journal.flush()

    def unapplied(self, tenant_id: str) -> int:
        """Charges of this tenant journaled and not yet in the ledger tables."""
        return self.journal.unapplied(tenant_id) if self.journal is not None else 0

    async def close(self) -> None:
        if self.journal is not None:
            await self.journal.close()

    async def _settle_in_one_statement(self, request_id: str, charge: int,
                                       usage: dict[str, Any] | None) -> int | None:
        """PostgreSQL's common case (ledger/postgres.py). None: not settled here, because no
        reservation was open or the charge exceeds the hold plus the balance; `_settle`
        then decides, in a transaction."""
        params = {"rid": request_id, "charge": charge, "ts": now_ms(), "release_id": f"{request_id}:release",
                  "debit_id": f"{request_id}:debit"}
        if usage is not None:
            params.update({f"usage_{k}": v for k, v in usage.items()})
        try:
            found = await self.store.statement(postgres.settle_statement(usage), params)
        except sa.exc.IntegrityError:
            return None  # the wallet's CHECK: the statement wrote nothing
        return charge if found else None

    async def release(self, request_id: str, usage: dict[str, Any] | None = None) -> int | None:
        """Release a hold without charging (the request failed before any cost arose)."""
        return await self.settle(request_id, 0, usage)

    async def release_stale_in_memory(self, max_request_ms: int) -> int:
        """The sweep's backstop for holds in memory: release any older than the longest
        request whose request this process no longer serves (its settle failed), in full,
        as for committed ones, recorded as `<request>:swept` so that a settle that comes
        after all still charges it, once (`_settle_late`). A request still served keeps
        its hold however long it runs: released under it, its settle would find nothing."""
        holds = self.holds
        if holds is None:
            return 0
        released = 0
        for request_id in holds.older_than(max_request_ms):
            hold = None if request_id in self.live else holds.claim(request_id)
            if hold is None:
                continue

            def swept(conn: Connection, request_id: str = request_id, tenant_id: str = hold.tenant_id) -> None:
                found = conn.execute(sa.select(wallets.c.balance_micros)
                                     .where(wallets.c.tenant_id == tenant_id)).scalar()
                if found is not None:  # else the tenant was deleted meanwhile: nothing to charge later
                    _entry(conn, f"{request_id}:swept", tenant_id, "release", 0, int(found), request_id)
                holds.drop(request_id)

            try:
                await self.store.transact_undoable(swept, undo=functools.partial(holds.add, request_id, hold))
            except Exception:
                holds.unclaim(request_id)  # the next sweep tries again
                raise
            released += 1
        return released

    async def release_swept(self, request_ids: list[str]) -> int:
        """The sweep's release: each in its own short transaction, so one bad row cannot
        hold the others back. Returns how many were still open."""
        released = 0
        for request_id in request_ids:
            try:
                if await self.store.transact(self._settle, request_id, 0, None, True) is not None:
                    released += 1
            except sa.exc.IntegrityError:
                continue  # a settle got there first
        return released

    def _settle(self, conn: Connection, request_id: str, charge: int, usage: dict[str, Any] | None,
                swept: bool) -> int | None:
        res = _UNRESERVE.first(conn, {"rid": request_id})
        if res is None:
            return None if swept else self._settle_late(conn, request_id, charge, usage)
        tenant_id, held, key_id, key_period = res[0], int(res[1]), res[2], res[3]
        if charge > held and key_period is not None:
            charge = self._within_key_limit(conn, request_id, key_id, key_period, held, charge)
        charged, new = self._take(conn, tenant_id, held, charge)
        ts = now_ms()
        rows = [dict(id=f"{request_id}:{'swept' if swept else 'release'}", tenant_id=tenant_id, kind="release",
                     amount_micros=held, balance_after_micros=new + charged, reference=request_id, created_at=ts)]
        if charged:
            rows.append(dict(id=f"{request_id}:debit", tenant_id=tenant_id, kind="debit", amount_micros=-charged,
                             balance_after_micros=new, reference=request_id, created_at=ts))
        _INSERT_ENTRY.many(conn, rows)
        if key_period is not None and charged != held:
            conn.execute(
                key_spend.update()
                .where(key_spend.c.key_id == key_id, key_spend.c.period == key_period)
                .values(spent_micros=key_spend.c.spent_micros - held + charged))
        self._usage(conn, request_id, tenant_id, charged, usage, ts)
        return charged

    def _within_key_limit(self, conn: Connection, request_id: str, key_id: str, period: str | None, held: int,
                          charge: int) -> int:
        """A charge above its hold takes only what the key's spend limit has left (the
        committed spend counts every open hold, this one included), as in
        MemoryPath._within_key_limit; under the spend row's lock on PostgreSQL, so two
        settles cannot both take what is left. `period` None: the key's current one (a late
        settle, whose hold and period went with the sweep)."""
        key = conn.execute(sa.select(api_keys.c.spend_limit_micros, api_keys.c.spend_limit_period)
                           .where(api_keys.c.id == key_id)).first()
        if key is None or key[0] is None:
            return charge
        if period is None:
            period = spend_period(key[1])
        q = sa.select(key_spend.c.spent_micros).where(key_spend.c.key_id == key_id, key_spend.c.period == period)
        spent = conn.execute(q if self.store.is_sqlite else q.with_for_update()).scalar() or 0
        capped = min(charge, held + max(0, int(key[0]) - int(spent)))
        log.warning("charge_above_hold", request_id=request_id, key_id=key_id, cost_micros=charge,
                    notice="capped by the key's spend limit" if capped < charge else "within the key's spend limit")
        return capped

    def _settle_late(self, conn: Connection, request_id: str, charge: int,
                     usage: dict[str, Any] | None) -> int | None:
        """Settle a request whose hold the sweep already released (its worker looked dead,
        or its settle had failed until then).
        The `:debit` entry, written even when the charge is zero, makes it the only settle."""
        swept_id, debit_id = f"{request_id}:swept", f"{request_id}:debit"
        found = dict(conn.execute(
            sa.select(ledger_entries.c.id, ledger_entries.c.tenant_id)
            .where(ledger_entries.c.id.in_((swept_id, debit_id)))).all())
        if swept_id not in found or debit_id in found:
            return None  # never reserved, or already settled
        tenant_id = found[swept_id]
        ts = now_ms()
        key_id = (usage or {}).get("key_id")
        if charge and key_id:  # no hold is left: all of it is above the hold
            charge = self._within_key_limit(conn, request_id, key_id, None, 0, charge)
        # What this process holds in memory for the tenant's other requests stays theirs.
        charged, new = self._take(conn, tenant_id, 0, charge, self._held(tenant_id))
        _entry(conn, debit_id, tenant_id, "debit", -charged, new, request_id, ts)
        if charged and key_id:
            # The hold's period went with the reservation row; count it in the current one.
            now = datetime.now(UTC)
            conn.execute(
                key_spend.update()
                .where(key_spend.c.key_id == key_id,
                       key_spend.c.period.in_((now.strftime("%Y-%m-%d"), now.strftime("%Y-%m"))))
                .values(spent_micros=key_spend.c.spent_micros + charged))
        self._usage(conn, request_id, tenant_id, charged, usage, ts)
        return charged

    def _take(self, conn: Connection, tenant_id: str, held: int, charge: int, others: int = 0) -> tuple[int, int]:
        """Return `held` to the wallet and take `charge`, capped so the balance stays >= 0
        and, with holds in memory, so that `others` (what other requests hold) stays.
        Returns (charged, new balance)."""
        row = _TAKE.first(conn, {"tenant": tenant_id, "held": held, "others": others, "charge": charge,
                                 "ts": now_ms()})
        if row is not None:
            return charge, int(row[0])
        # Rare: the cost exceeds the hold plus the balance. Charge what exists, under the row lock.
        balance = self._balance(conn, tenant_id, lock=True)
        charged = max(0, min(charge, balance + held - others))
        new = balance + held - charged
        conn.execute(wallets.update().where(wallets.c.tenant_id == tenant_id)
                     .values(balance_micros=new, updated_at=now_ms()))
        return charged, new

    def _usage(self, conn: Connection, request_id: str, tenant_id: str, charged: int,
               usage: dict[str, Any] | None, ts: int) -> None:
        if usage is not None:
            self._insert_usage.rows(conn, _usage_row(request_id, tenant_id, charged, usage, ts))

    def _balance(self, conn: Connection, tenant_id: str, lock: bool = False) -> int:
        q = sa.select(wallets.c.balance_micros).where(wallets.c.tenant_id == tenant_id)
        if lock and not self.store.is_sqlite:
            q = q.with_for_update()
        bal = conn.execute(q).scalar()
        if bal is None:
            raise NotFound(f"no wallet for tenant {tenant_id}")
        return int(bal)

    # --- reading ----------------------------------------------------------------------------

    def _held(self, tenant_id: str) -> int:
        return self.holds.held(tenant_id) if self.holds is not None else 0

    def _spendable(self, result: dict[str, Any], tenant_id: str) -> dict[str, Any]:
        """A credit's or debit's result, its balance read as everywhere: holds deducted."""
        result["balance_micros"] -= self._held(tenant_id)
        return result

    async def balance(self, tenant_id: str) -> int:
        """What the tenant can still spend: holds deducted, wherever they are kept."""
        if self.memory is not None:
            return self.memory.balance(tenant_id)
        async with self.store.read() as conn:
            return await conn.run_sync(self._balance, tenant_id)

    async def wallet(self, tenant_id: str) -> dict[str, Any]:
        bal = await self.balance(tenant_id)
        async with self.store.read() as conn:
            held = (await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(reservations.c.amount_micros), 0))
                .where(reservations.c.tenant_id == tenant_id))).scalar_one()
        held += self.holds.reserved(tenant_id) if self.holds is not None else 0  # journaled charges are spent
        return {"tenant_id": tenant_id, "balance_usd": format_usd(bal), "balance_micros": bal,
                "reserved_usd": format_usd(int(held)), "reserved_micros": int(held)}

    async def entries(self, tenant_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        await self.flush()
        q = (sa.select(ledger_entries).where(ledger_entries.c.tenant_id == tenant_id)
             .order_by(ledger_entries.c.created_at, ledger_entries.c.id))
        if limit:
            q = q.limit(limit)
        async with self.store.read() as conn:
            return [dict(r) for r in (await conn.execute(q)).mappings().all()]

    async def verify(self, max_reservation_age_ms: int) -> list[str]:
        """Every balance equals its ledger sum, none is negative, the open holds match the
        reserve/release entries, and no reservation is older than the longest request.
        Reads one snapshot (SQLite: one read transaction; PostgreSQL: REPEATABLE READ),
        so it can run against a live gateway without false alarms."""
        await self.flush()
        problems: list[str] = []
        cutoff = db_clock(self.store) - max_reservation_age_ms  # the clock reservations are written on
        async with self.store.read() as conn:
            if not self.store.is_sqlite:
                await conn.execution_options(isolation_level="REPEATABLE READ")
            sums = dict((await conn.execute(
                sa.select(ledger_entries.c.tenant_id, sa.func.sum(ledger_entries.c.amount_micros))
                .group_by(ledger_entries.c.tenant_id))).all())
            balances = await conn.execute(sa.select(wallets.c.tenant_id, wallets.c.balance_micros))
            for tenant_id, bal in balances:
                total = int(sums.pop(tenant_id, 0) or 0)
                if total != bal:
                    problems.append(f"tenant {tenant_id}: balance {format_usd(bal)} != ledger sum {format_usd(total)}")
                if bal < 0:
                    problems.append(f"tenant {tenant_id}: negative balance {format_usd(bal)}")
            for tenant_id in sums:
                problems.append(f"tenant {tenant_id}: ledger entries without a wallet")
            held = dict((await conn.execute(
                sa.select(reservations.c.tenant_id, sa.func.sum(reservations.c.amount_micros))
                .group_by(reservations.c.tenant_id))).all())
            open_by_ledger = dict((await conn.execute(
                sa.select(ledger_entries.c.tenant_id, sa.func.sum(ledger_entries.c.amount_micros))
                .where(ledger_entries.c.kind.in_(("reserve", "release")))
                .group_by(ledger_entries.c.tenant_id))).all())
            for tenant_id in sorted(set(held) | set(open_by_ledger)):
                if int(held.get(tenant_id, 0) or 0) != -int(open_by_ledger.get(tenant_id, 0) or 0):
                    problems.append(f"tenant {tenant_id}: open reservations do not match reserve/release entries")
            for rid, tenant_id in (await conn.execute(
                sa.select(reservations.c.request_id, reservations.c.tenant_id)
                .where(reservations.c.created_at < cutoff))):
                problems.append(f"tenant {tenant_id}: reservation {rid} older than the longest request")
            for rid, tenant_id, amount, reason in (await conn.execute(
                sa.select(set_aside_charges.c.request_id, set_aside_charges.c.tenant_id,
                          set_aside_charges.c.amount_micros, set_aside_charges.c.reason)
                .order_by(set_aside_charges.c.created_at))):
                problems.append(f"tenant {tenant_id}: charge of request {rid} ({format_usd(amount)} USD) set aside, "
                                f"not applied: {reason} (docs/ledger.md: set-aside charges)")
        return problems

    async def open_requests(self, tenant_id: str) -> list[str]:
        """The requests holding this tenant's money now: committed holds and this process's."""
        return await self.open_reservations(tenant_id=tenant_id) + self.held_in_memory(tenant_id)

    def held_in_memory(self, tenant_id: str | None = None) -> list[str]:
        return self.holds.requests(tenant_id) if self.holds is not None else []

    async def open_reservations(self, older_than_ms: int | None = None, worker_ids: list[str] | None = None,
                                tenant_id: str | None = None) -> list[str]:
        """Committed holds (the reservations table), by age, worker or tenant."""
        q = sa.select(reservations.c.request_id)
        if tenant_id is not None:
            q = q.where(reservations.c.tenant_id == tenant_id)
        if older_than_ms is not None:
            q = q.where(reservations.c.created_at < db_clock(self.store) - older_than_ms)
        if worker_ids is not None:
            q = q.where(reservations.c.worker_id.in_(worker_ids))
        async with self.store.read() as conn:
            return list((await conn.execute(q)).scalars().all())

    async def open_wallet(self, conn: AsyncConnection, tenant_id: str) -> None:
        await conn.execute(wallets.insert().values(tenant_id=tenant_id, balance_micros=0, updated_at=now_ms()))


def _usage_row(request_id: str, tenant_id: str, charged: int, usage: dict[str, Any], ts: int) -> dict[str, Any]:
    row = {**usage, "request_id": request_id, "tenant_id": tenant_id, "cost_micros": charged}
    row.setdefault("created_at", ts)
    return row


def _check_entry_id(entry_id: str) -> None:
    if len(entry_id) > ENTRY_ID_MAX:
        raise BadRequest(f"The ledger entry id is {len(entry_id)} characters long; at most {ENTRY_ID_MAX} fit.",
                         code="entry_id_too_long")


def _exists(conn: Connection, entry_id: str) -> bool:
    return conn.execute(sa.select(ledger_entries.c.id).where(ledger_entries.c.id == entry_id)).first() is not None


def _entry(conn: Connection, entry_id: str, tenant_id: str, kind: str, amount: int, balance_after: int,
           reference: str | None, ts: int | None = None) -> None:
    _INSERT_ENTRY.rows(conn, {
        "id": entry_id, "tenant_id": tenant_id, "kind": kind, "amount_micros": amount,
        "balance_after_micros": balance_after, "reference": reference, "created_at": ts or now_ms()})


def spend_period(kind: str | None, at: datetime | None = None) -> str:
    """The key_spend period a moment (now by default) falls in: the UTC day for "day", else
    the UTC month."""
    d = at or datetime.now(UTC)
    return d.strftime("%Y-%m-%d") if kind == "day" else d.strftime("%Y-%m")
