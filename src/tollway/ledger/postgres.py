"""The request path's two money transactions as ONE statement each, for PostgreSQL.

Why: as `BEGIN; UPDATE wallets ...; INSERT ...; INSERT ...; COMMIT`, a reservation holds
the wallet's row lock from its UPDATE until its COMMIT, across three round trips to
the gateway. Every request of a tenant takes that same row, so a busy tenant's requests
queued behind each other for as long as the gateway's event loop took to come back to
each transaction (docs/performance-history.md, third pass).
A statement of data-modifying CTEs is atomic by itself (PostgreSQL autocommits it when
it runs outside a transaction), costs one round trip, and holds the row lock only while
the server runs it.

The guarantees are ledger/transactions.py's, unchanged:
- reserve: the wallet UPDATE is conditional (`balance >= amount`) and the ledger entry
  and reservation rows are inserted FROM its RETURNING, so when funds are short the
  statement returns no row and writes nothing;
- settle: the reservation row is deleted and everything else is written FROM that
  DELETE's RETURNING, so a settle that finds no reservation writes nothing; a charge
  above the hold plus the balance would break the wallet's CHECK (balance >= 0) and
  the whole statement fails, so nothing is half-written.
Whatever the statements do not cover (key spend limits, a settle that found no
reservation, a charge that exceeds what is there) goes through ledger/transactions.py's
transactions, which remain the reference.

All CTEs of a statement run on one snapshot and cannot see each other's writes to the
same table; none here reads a table another one writes, other than through RETURNING.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql.expression import Select

from tollway.store.db import PG_CLOCK_MS
from tollway.store.prepared import Prepared
from tollway.store.schema import key_spend, ledger_entries, reservations, usage_events, wallets

_ENTRY_COLUMNS = ["id", "tenant_id", "kind", "amount_micros", "balance_after_micros", "reference", "created_at"]


def _p(name: str, type_: Any) -> sa.BindParameter[object]:
    # Typed, so the statement carries a cast for every parameter: PostgreSQL cannot infer
    # the type of a parameter in a SELECT list.
    return sa.bindparam(name, type_=type_)


def _str(name: str) -> sa.BindParameter[object]:
    return _p(name, sa.String)


def _int(name: str) -> sa.BindParameter[object]:
    return _p(name, sa.BigInteger)


def _kind(kind: str) -> sa.ColumnElement[str]:
    return sa.literal_column(f"'{kind}'", sa.String)


def _reserve() -> Prepared:
    """Params: tenant, amount, ts, rid, entry_id, key_id, worker_id. Returns (new balance,),
    or no row when the wallet does not cover `amount`."""
    w = (wallets.update()
         .where(wallets.c.tenant_id == _str("tenant"), wallets.c.balance_micros >= _int("amount"))
         .values(balance_micros=wallets.c.balance_micros - _int("amount"), updated_at=_int("ts"))
         .returning(wallets.c.balance_micros)
         .cte("w"))
    entry = ledger_entries.insert().from_select(_ENTRY_COLUMNS, sa.select(
        _str("entry_id"), _str("tenant"), _kind("reserve"), -_int("amount"), w.c.balance_micros,
        _str("rid"), _int("ts"))).cte("entry")
    held = reservations.insert().from_select(
        ["request_id", "tenant_id", "key_id", "key_period", "worker_id", "amount_micros", "created_at"],
        # Its age is compared by the sweep on the database's clock: written on it too.
        sa.select(_str("rid"), _str("tenant"), _str("key_id"), sa.null(), _str("worker_id"), _int("amount"),
                  PG_CLOCK_MS).select_from(w)).cte("held")
    return Prepared(sa.select(w.c.balance_micros).add_cte(entry, held))


def _settle(usage_columns: Iterable[str] | None) -> Prepared:
    """Params: rid, charge, ts, release_id, debit_id, and one per usage column
    (`usage_<column>`; None: no usage row). Returns (new balance,), or no row when no
    reservation was open or the charge exceeds a key-limited hold."""
    # A charge above a key-limited hold is capped by the key's limit in `Ledger._settle`.
    r = (reservations.delete().where(reservations.c.request_id == _str("rid"),
                                     sa.or_(reservations.c.key_period.is_(None),
                                            reservations.c.amount_micros >= _int("charge")))
         .returning(reservations.c.tenant_id, reservations.c.amount_micros, reservations.c.key_id,
                    reservations.c.key_period)
         .cte("r"))
    w = (wallets.update()
         .where(wallets.c.tenant_id == r.c.tenant_id)
         .values(balance_micros=wallets.c.balance_micros + r.c.amount_micros - _int("charge"), updated_at=_int("ts"))
         .returning(wallets.c.tenant_id, wallets.c.balance_micros, r.c.amount_micros.label("held"))
         .cte("w"))
    release: Select[tuple[object, ...]] = sa.select(
        _str("release_id"), w.c.tenant_id, _kind("release"), w.c.held, w.c.balance_micros + _int("charge"),
        _str("rid"), _int("ts"))
    debit = sa.select(
        _str("debit_id"), w.c.tenant_id, _kind("debit"), -_int("charge"), w.c.balance_micros,
        _str("rid"), _int("ts")).where(_int("charge") > sa.literal_column("0"))
    entries = ledger_entries.insert().from_select(_ENTRY_COLUMNS, release.union_all(debit)).cte("entries")
    spend = (key_spend.update()
             .where(key_spend.c.key_id == r.c.key_id, key_spend.c.period == r.c.key_period)
             .values(spent_micros=key_spend.c.spent_micros - r.c.amount_micros + _int("charge"))
             .cte("spend"))
    if usage_columns is None:
        return Prepared(sa.select(w.c.balance_micros).add_cte(entries, spend))
    columns = sorted(set(usage_columns) - {"request_id", "tenant_id", "cost_micros"})
    typed = {c.name: c.type for c in usage_events.c}
    values = [_p(f"usage_{c}", typed[c]) for c in columns]
    if "created_at" not in columns:
        columns.append("created_at")
        values.append(_int("ts"))
    usage = pg_insert(usage_events).from_select(
        ["request_id", "tenant_id", "cost_micros", *columns],
        sa.select(_str("rid"), w.c.tenant_id, _int("charge"), *values),
    ).on_conflict_do_nothing().cte("usage")
    return Prepared(sa.select(w.c.balance_micros).add_cte(entries, spend, usage))


RESERVE = _reserve()
_SETTLES: dict[tuple[str, ...] | None, Prepared] = {}


def settle_statement(usage_columns: Iterable[str] | None) -> Prepared:
    """The settle statement for usage rows with these columns (built once per set; the
    pipeline always passes its columns in the same order)."""
    key = None if usage_columns is None else tuple(usage_columns)
    found = _SETTLES.get(key)
    if found is None:
        found = _SETTLES[key] = _settle(key)
    return found
