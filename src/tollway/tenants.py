"""Tenants: the customers of the gateway. Creating one opens its wallet."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tollway.errors import NotFound
from tollway.keys import new_id
from tollway.ledger import Ledger
from tollway.store.db import Store, now_ms
from tollway.store.schema import tenants


class Tenants:
    def __init__(self, store: Store, ledger: Ledger) -> None:
        self.store = store
        self.ledger = ledger

    async def create(self, name: str | None = None, email: str | None = None,
                     external_id: str | None = None) -> dict[str, Any]:
        tenant_id = new_id("tn")
        async with self.store.write() as conn:
            await conn.execute(tenants.insert().values(
                id=tenant_id, name=name, email=email, external_id=external_id, created_at=now_ms()))
            await self.ledger.open_wallet(conn, tenant_id)
        return {"tenant_id": tenant_id, "name": name, "email": email}

    async def get(self, tenant_id: str) -> dict[str, Any]:
        async with self.store.read() as conn:
            row = (await conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id))).mappings().first()
        if row is None:
            raise NotFound(f"no tenant {tenant_id}")
        return dict(row)

    async def list(self) -> list[dict[str, Any]]:
        async with self.store.read() as conn:
            rows = (await conn.execute(sa.select(tenants).order_by(tenants.c.created_at))).mappings().all()
        return [dict(r) for r in rows]
