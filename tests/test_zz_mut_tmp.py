from tests.test_ledger import *  # noqa
from tollway.ledger import Ledger

def test_mutant_double_late_charge(make_config, monkeypatch):
    orig = Ledger._settle_late
    async def buggy(self, conn, request_id, charge, usage):
        # forget the idempotency check: charge every late settle
        import sqlalchemy as sa
        from tollway.store.schema import ledger_entries
        t = (await conn.execute(sa.select(ledger_entries.c.tenant_id).where(ledger_entries.c.id == f"{request_id}:swept"))).scalar()
        if t is None: return None
        charged, new = await self._take(conn, t, 0, charge)
        await self._entry(conn, f"{request_id}:debit:{secrets.token_hex(3)}", t, "debit", -charged, new, request_id)
        return charged
    monkeypatch.setattr(Ledger, "_settle_late", buggy)
    _run_machine(make_config(), examples=30, steps=25)
