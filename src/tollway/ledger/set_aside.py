"""Resolving a charge the journal set aside (journal.py, docs/ledger.md).

A set-aside charge was not applied: the customer was not charged for that request, and
`ledger verify` reports it until an operator decides. `--charge` debits the recorded amount
as the request's `:debit` entry (idempotent on that id, capped at the balance as any
settle), `--drop` writes nothing; either way the row goes, in the same transaction.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tollway.errors import NotFound
from tollway.ledger.transactions import Ledger
from tollway.money import format_usd
from tollway.store.schema import set_aside_charges


async def resolve(ledger: Ledger, request_id: str, *, charge: bool) -> dict[str, Any]:
    async with ledger.store.write() as conn:
        row = (await conn.execute(sa.select(set_aside_charges.c.tenant_id, set_aside_charges.c.amount_micros)
                                  .where(set_aside_charges.c.request_id == request_id))).first()
        if row is None:
            raise NotFound(f"no set-aside charge for request {request_id}")
        tenant_id, amount = str(row[0]), int(row[1])
        charged = 0
        if charge and amount > 0:
            done = await ledger.debit(tenant_id, amount, f"{request_id}:debit", kind="debit", reference=request_id,
                                      conn=conn)
            charged = amount - int(done["shortfall_micros"])
        await conn.execute(set_aside_charges.delete().where(set_aside_charges.c.request_id == request_id))
    return {"request_id": request_id, "tenant_id": tenant_id, "charged_usd": format_usd(charged),
            "resolved": "charged" if charge else "dropped"}
