"""The embedded default's request path: holds in this process's memory, charges journaled.

Why a path of its own: where one process is the sole server of an SQLite database
(services.build), no other process reserves from its wallets (ledger/holds.py says why), so a
reservation needs no write at all and a settle needs no transaction of its own
(ledger/journal.py); together they were most of a request's CPU (docs/performance-history.md). What stays
the same as on the committed path (ledger/transactions.py): the wallet row holds what the ledger sums
to, a request's charge is written as its `:debit` entry, key spend and usage row
(`Ledger._charges`, passed in as `write_charges`), and every balance, reservation and
key-limit check deducts what is held, here in memory, so nothing can be spent twice.

A reserve or a balance read is one step of the event loop: the wallet row and the holds
are read with no await in between, so no settle can commit between the two and count
a hold twice or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import Connection

from tollway.errors import InsufficientFunds, NotFound, SpendLimitExceeded
from tollway.ledger.holds import Hold, MemoryHolds
from tollway.ledger.journal import Charge, Journal, JournalFiles, recover
from tollway.store.db import Store, now_ms
from tollway.store.prepared import Prepared
from tollway.store.schema import key_spend, ledger_entries, set_aside_charges, usage_events, wallets
from tollway.telemetry import log

# (the transaction's connection, charges of one tenant, what its other requests hold) -> charged
WriteCharges = Callable[[Connection, list[Charge], int], int]

_P = sa.bindparam
_BALANCE = Prepared(sa.select(wallets.c.balance_micros).where(wallets.c.tenant_id == _P("tenant")))
_KEY_SPENT = Prepared(sa.select(key_spend.c.spent_micros)
                      .where(key_spend.c.key_id == _P("key"), key_spend.c.period == _P("period")))
# A request's charge is in the ledger once either of its rows is (a zero charge writes no entry).
# One set aside (journal.py) is not tried again.
_RECORDED = Prepared(sa.union_all(
    sa.select(ledger_entries.c.id).where(ledger_entries.c.id == _P("debit")),
    sa.select(usage_events.c.request_id).where(usage_events.c.request_id == _P("rid")),
    sa.select(set_aside_charges.c.request_id).where(set_aside_charges.c.request_id == _P("rid"))))


class MemoryPath:
    """Reserve, settle and read balances with the holds in memory (ledger/holds.py); with
    `journaled`, a settle appends to the charge journal (ledger/journal.py) instead of
    running its own transaction."""

    def __init__(self, store: Store, holds: MemoryHolds, write_charges: WriteCharges, *, journaled: bool) -> None:
        self.store = store
        self.holds = holds
        self._write_charges = write_charges
        self.journal: Journal | None = None
        if journaled and store.sqlite_file is not None:
            self.journal = Journal(JournalFiles(store.sqlite_file), store, holds, self._apply)

    def reserve(self, tenant_id: str, request_id: str, amount: int, key_id: str | None, key_limit: int | None,
                key_period: str | None) -> int:
        """Hold `amount` or raise 402 / 429, holding nothing; returns the balance left.
        A request id held twice: MemoryHolds.add refuses."""
        free = self._free(tenant_id)
        if free is None or free < amount:
            raise InsufficientFunds.to_reserve(amount)
        key = None
        if key_limit is not None:
            key = (key_id or "", key_period or "")
            spent = self.store.read_now(_KEY_SPENT, {"key": key[0], "period": key[1]})
            if (int(spent[0][0]) if spent else 0) + self.holds.key_held(key) + amount > key_limit:
                raise SpendLimitExceeded.for_key(key_limit, amount)
        self.holds.add(request_id, Hold(tenant_id, amount, key, key_limit))
        return free - amount

    def balance(self, tenant_id: str) -> int:
        """What the tenant can still spend: the wallet row less every hold, charged or not."""
        free = self._free(tenant_id)
        if free is None:
            raise NotFound(f"no wallet for tenant {tenant_id}")
        return free

    def _free(self, tenant_id: str) -> int | None:
        found = self.store.read_now(_BALANCE, {"tenant": tenant_id})
        return int(found[0][0]) - self.holds.held(tenant_id) if found else None

    async def settle(self, request_id: str, hold: Hold, charge: int, usage: dict[str, Any] | None) -> int:
        """Charge a hold this process claimed (MemoryHolds.claim); returns what was charged."""
        charged = self.journal_charge(request_id, hold, charge, usage)
        if charged is not None:
            return charged
        return await self._settle_in_transaction(request_id, hold, charge, usage)

    def settle_at_once(self, request_id: str, charge: int, usage: dict[str, Any] | None) -> int | None:
        """Claim the hold and journal its charge in this one step of the loop; None if there
        is no such hold or journal, or the write failed: the hold is then left unclaimed,
        as `settle` needs it."""
        if self.journal is None:
            return None
        hold = self.holds.claim(request_id)
        if hold is None:
            return None
        try:
            charged = self.journal_charge(request_id, hold, charge, usage)
        except BaseException:
            self.holds.unclaim(request_id)
            raise
        if charged is None:
            self.holds.unclaim(request_id)
        return charged

    def journal_charge(self, request_id: str, hold: Hold, charge: int, usage: dict[str, Any] | None) -> int | None:
        """The charge of a claimed hold, journaled in this one step of the loop; None if
        there is no journal or it could not be written (the hold stays claimed: the caller
        settles it in a transaction, or unclaims it)."""
        journal = self.journal
        if journal is None:
            return None
        tenant_id = hold.tenant_id
        charged = self._within_key_limit(request_id, hold, charge)
        if charged > hold.amount_micros:
            # Beyond its hold a charge may take only money nobody else holds, as in `Ledger._take`.
            free = self._free(tenant_id)
            charged = hold.amount_micros if free is None else max(hold.amount_micros,
                                                                  min(charged, free + hold.amount_micros))
        if charged == 0 and usage is None:
            self.holds.drop(request_id)  # a release with nothing to record
            return 0
        try:
            journal.record(Charge(request_id, tenant_id, charged, hold.key, usage, now_ms()), hold)
        except (OSError, orjson.JSONEncodeError):
            # (a value JSON cannot hold, e.g. an int beyond 64 bits: nothing was written; the
            # transaction then refuses it too, and leaves the hold for the sweep, not claimed forever)
            log.error("charge_journal_write_failed", request_id=request_id, exc_info=True)
            return None
        return charged

    def _within_key_limit(self, request_id: str, hold: Hold, charge: int, conn: Connection | None = None) -> int:
        """A charge above its hold (the provider billed more than the reservation bounded)
        takes only what the key's spend limit has left: what is neither spent nor held,
        this hold included, so the key never passes its limit, as the wallet never goes
        below zero. The operator bears the rest; it is logged."""
        if charge <= hold.amount_micros:
            return charge
        capped = charge
        if hold.key is not None and hold.key_limit is not None:
            params = {"key": hold.key[0], "period": hold.key[1]}
            found = _KEY_SPENT.rows(conn, params) if conn is not None else self.store.read_now(_KEY_SPENT, params)
            left = hold.key_limit - (int(found[0][0]) if found else 0) - self.holds.key_held(hold.key)
            capped = min(charge, hold.amount_micros + max(0, left))
        log.warning("charge_above_hold", request_id=request_id, tenant_id=hold.tenant_id, cost_micros=charge,
                    notice="capped by the key's spend limit" if capped < charge else "taken from the free balance")
        return capped

    async def _settle_in_transaction(self, request_id: str, hold: Hold, charge: int,
                                     usage: dict[str, Any] | None) -> int:
        # The hold leaves memory inside the transaction, with its charge: the next settle of
        # the same commit batch must not count it as held any more, and a rolled-back COMMIT
        # puts it back before anything else runs (`undo`). So a hold still here was never
        # charged, and any failure leaves it open for the caller's retry (pipeline.py) or
        # the sweep.
        def settle_held(conn: Connection) -> int:
            # What the other requests hold is read here, in the transaction.
            others = self.holds.held(hold.tenant_id) - hold.amount_micros
            capped = self._within_key_limit(request_id, hold, charge, conn)
            charged = self._write_charges(conn, [Charge(request_id, hold.tenant_id, capped, hold.key, usage,
                                                        now_ms())], others)
            self.holds.drop(request_id)
            return charged

        try:
            return await self.store.transact_undoable(settle_held, undo=lambda: self.holds.add(request_id, hold))
        except BaseException:
            self.holds.unclaim(request_id)
            raise

    def _apply(self, conn: Connection, charges: list[Charge], others: int) -> None:
        """Journaled charges of one tenant, written as any settle of a hold in memory; only a
        dispute debit racing the requests can cap them (ledger/holds.py)."""
        _apply(self._write_charges, conn, charges, others)


async def recover_charges(store: Store, write_charges: WriteCharges) -> int:
    """Apply what a previous process left in the charge journal, each charge at most once
    (skipped if the ledger has it, or set it aside, already); SQLite only. Returns how many
    were applied."""
    if store.sqlite_file is None:
        return 0

    def recorded(conn: Connection, charge: Charge) -> bool:
        rid = charge.request_id
        return _RECORDED.first(conn, {"debit": f"{rid}:debit", "rid": rid}) is not None

    return await recover(store, JournalFiles(store.sqlite_file), recorded,
                         lambda conn, charges, others: _apply(write_charges, conn, charges, others))


def _apply(write_charges: WriteCharges, conn: Connection, charges: list[Charge], others: int) -> None:
    # A tenant deleted meanwhile raises NotFound: the charge is set aside (journal.py), not dropped.
    write_charges(conn, charges, others)
