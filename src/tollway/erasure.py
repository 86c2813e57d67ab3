"""Erasure: the parts of a tenant's deletion that make it irreversible (tenants.py runs them).

Pseudonyms for the kept rows, the deletion record that names no one, and making the old
bytes leave the database files (SQLite: secure_delete and a truncating WAL checkpoint;
PostgreSQL: a rewrite of every table the deletion touched, once no snapshot can still
see the old row versions).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tollway.ledger.journal import Charge
from tollway.ledger.transactions import ENTRY_ID_MAX
from tollway.store.db import Store
from tollway.store.schema import access_log, deletion_requests, ledger_entries, set_aside_charges, usage_events

# Every table whose rows a deletion changes or removes. On PostgreSQL an UPDATE or DELETE
# leaves the old row version in the table's pages until they are rewritten, and only a
# rewrite (VACUUM FULL) drops it: a plain VACUUM marks the space free but the bytes stay.
REWRITTEN_TABLES = ("tenants", "api_keys", "key_spend", "wallets", "ledger_entries", "usage_events",
                    "reservations", "access_log", "topups", "stripe_events")
REWRITE_TIMEOUT = 3_600.0
_REQUEST_KINDS = frozenset({"reserve", "release", "debit"})
DAY_MS = 86_400_000
_INSUFFICIENT_PRIVILEGE = "42501"


async def scrub_files(store: Store, xid: int | None) -> bool:
    """Make the erased bytes leave the database files, not only the tables. True only if
    every step ran with the rights it needs."""
    if store.is_sqlite:
        return await checkpoint_sqlite(store)
    assert xid is not None
    async with store.engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        clear = await wait_until_invisible(auto, xid)
        # PostgreSQL skips, with a warning only, a table the role may not vacuum (pg_statistic
        # needs the database's owner): without that right, the files are not reported clean.
        clear = clear and bool((await auto.exec_driver_sql(
            "SELECT rolsuper OR pg_has_role(current_user, (SELECT datdba FROM pg_database "
            "WHERE datname = current_database()), 'MEMBER') FROM pg_roles WHERE rolname = current_user")
        ).scalar())
        raw = await auto.get_raw_connection()
        pg: Any = raw.driver_connection  # asyncpg: a timeout of its own, not the pool's 30 s per statement
        try:
            # Its time grows with the tables (docs/privacy.md has measurements), and each
            # table is locked while it is rewritten.
            await pg.execute(f"VACUUM (FULL, ANALYZE) {', '.join(REWRITTEN_TABLES)}", timeout=REWRITE_TIMEOUT)
            # Records in key order (random), not in the order of the deletions, which is
            # the order the pseudonymous rows were appended in.
            await pg.execute("CLUSTER deletion_requests USING pk_deletion_requests", timeout=REWRITE_TIMEOUT)
            # Column statistics (most common values) held tenant and request ids; the
            # ANALYZE above replaced them, this drops the old versions.
            await pg.execute("VACUUM (FULL) pg_catalog.pg_statistic", timeout=REWRITE_TIMEOUT)
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != _INSUFFICIENT_PRIVILEGE:
                raise
            return False  # CLUSTER needs the table's owner; the erasure itself is committed
    return clear


async def checkpoint_sqlite(store: Store, attempts: int = 50) -> bool:
    """PRAGMA wal_checkpoint(TRUNCATE): copy the WAL into the database and empty it, so
    old page images (which still hold erased rows) leave the -wal file. Retries while a
    reader holds an old snapshot; returns False if it never got a clean checkpoint."""
    for _ in range(attempts):
        async with store.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            cursor = await driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            busy = (await cursor.fetchone())[0]
            await cursor.close()
        if not busy:
            return True
        await asyncio.sleep(0.1)
    return False


async def wait_until_invisible(conn: AsyncConnection, xid: int, limit: float = 30.0) -> bool:
    """Wait until no transaction could still see the rows the erasing transaction (xid)
    deleted. Until then PostgreSQL keeps those row versions and even VACUUM FULL copies
    them; a snapshot's horizon is cluster-wide (a transaction running in another database
    holds it back too), so wait for every older transaction, and for every older snapshot
    in this database. Returns False if one outlived `limit` seconds."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        oldest_running = int((await conn.exec_driver_sql(
            "SELECT txid_snapshot_xmin(txid_current_snapshot())")).scalar_one())
        older_snapshots = (await conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL "
            "AND age(backend_xmin) >= age((($1::bigint) % 4294967296)::text::xid)", (xid,))).scalar_one()
        if oldest_running > xid and not older_snapshots:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)


class Pseudonyms:
    """Fresh ids for one deletion; the salt lives only as long as this object."""

    def __init__(self) -> None:
        self._salt = secrets.token_bytes(32)
        self.tenant = "tn_anon_" + secrets.token_hex(8)

    def mac(self, value: str) -> str:
        return hmac.new(self._salt, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def request(self, request_id: str) -> str:
        return "req_anon_" + self.mac("r:" + request_id)[:24]

    def key(self, key_id: str | None) -> str | None:
        return "key_anon_" + self.mac("k:" + key_id)[:16] if key_id else None


async def move_ledger(conn: AsyncConnection, tenant_id: str, anon: str, pseudo: Pseudonyms) -> None:
    rows = (await conn.execute(sa.select(ledger_entries.c.id, ledger_entries.c.kind, ledger_entries.c.reference)
                               .where(ledger_entries.c.tenant_id == tenant_id))).all()
    updates = []
    for entry_id, kind, ref in rows:
        new_id = entry_id.replace(tenant_id, anon)
        new_ref = ref.replace(tenant_id, anon) if ref else ref
        if kind in _REQUEST_KINDS and ref:
            new_id, new_ref = new_id.replace(ref, pseudo.request(ref)), pseudo.request(ref)
        if len(new_id) > ENTRY_ID_MAX:  # an id made before references were limited
            new_id = new_id[:ENTRY_ID_MAX - 33] + "~" + pseudo.mac("e:" + entry_id)[:32]
        updates.append({"b_old": entry_id, "b_id": new_id, "b_reference": new_ref})
    await _rewrite(conn, ledger_entries.c.id, updates, tenant_id=anon)


async def move_set_aside(conn: AsyncConnection, tenant_id: str, anon: str, pseudo: Pseudonyms) -> None:
    """Charges the journal set aside (ledger/journal.py) stay for the operator to resolve against
    the moved wallet, under the same pseudonyms as the rest of the books."""
    rows = (await conn.execute(sa.select(set_aside_charges.c.request_id, set_aside_charges.c.charge)
                               .where(set_aside_charges.c.tenant_id == tenant_id))).all()
    updates = []
    for rid, line in rows:
        charge = Charge.parse(line.encode())
        if charge is not None:
            charge.request_id, charge.tenant_id = pseudo.request(rid), anon
            charge.key = (pseudo.key(charge.key[0]) or "", charge.key[1]) if charge.key else None
            if charge.usage is not None:
                charge.usage["key_id"] = pseudo.key(charge.usage.get("key_id"))
        updates.append({"b_old": rid, "b_request_id": pseudo.request(rid),
                        "b_charge": charge.line().decode().strip() if charge is not None else "unreadable"})
    await _rewrite(conn, set_aside_charges.c.request_id, updates, tenant_id=anon)


async def move_usage(conn: AsyncConnection, tenant_id: str, anon: str, pseudo: Pseudonyms) -> None:
    rows = (await conn.execute(sa.select(usage_events.c.request_id, usage_events.c.key_id)
                               .where(usage_events.c.tenant_id == tenant_id))).all()
    await _rewrite(conn, usage_events.c.request_id, [
        {"b_old": rid, "b_request_id": pseudo.request(rid), "b_key_id": pseudo.key(kid)} for rid, kid in rows],
        tenant_id=anon)


async def move_access_log(conn: AsyncConnection, tenant_id: str, anon: str, pseudo: Pseudonyms) -> None:
    # Only the tenant's own rows lose their address: behind a load balancer or a NAT every
    # row has the same one, and other tenants' rows are theirs (unauthenticated rows expire
    # with the access log's retention).
    rows = (await conn.execute(sa.select(access_log.c.id, access_log.c.request_id)
                               .where(access_log.c.tenant_id == tenant_id))).all()
    await _rewrite(conn, access_log.c.id, [{"b_old": row_id, "b_request_id": pseudo.request(rid)}
                                           for row_id, rid in rows], tenant_id=anon, client_ip=None)


async def _rewrite(conn: AsyncConnection, key: sa.Column[Any], updates: list[dict[str, Any]], **fixed: Any) -> None:
    """One executemany: row `b_old` (by `key`) gets each `b_<column>` and the `fixed` values."""
    if not updates:
        return
    per_row: dict[str, Any] = {name[2:]: sa.bindparam(name) for name in updates[0] if name != "b_old"}
    await conn.execute(key.table.update().where(key == sa.bindparam("b_old")).values(**per_row, **fixed), updates)


def record_filter(tenant_id: str) -> sa.ColumnElement[bool]:
    """Where a tenant's deletion record is: under deletion_record_id, or, for a record made
    before records were keyed so, under the id itself."""
    return deletion_requests.c.tenant_id.in_((deletion_record_id(tenant_id), tenant_id))


async def find_record(conn: AsyncConnection, tenant_id: str) -> dict[str, Any] | None:
    """The deletion record of a tenant."""
    row = (await conn.execute(sa.select(deletion_requests).where(record_filter(tenant_id)))).mappings().first()
    return dict(row) if row is not None else None


async def insert_record(conn: AsyncConnection, is_sqlite: bool, record_id: str, day: int) -> None:
    if is_sqlite:
        # At a rowid taken from the hash: SQLite returns rows in rowid order, which would
        # otherwise be the order of the deletions (PostgreSQL's records are CLUSTERed on
        # the hash in scrub_files).
        await conn.execute(sa.text("INSERT INTO deletion_requests (rowid, tenant_id, requested_at) "
                                   "VALUES (:rowid, :tid, :day)"),
                           {"rowid": int(record_id.removeprefix("del_")[:15], 16) + 1, "tid": record_id,
                            "day": day})
    else:
        await conn.execute(deletion_requests.insert().values(tenant_id=record_id, requested_at=day))


def deletion_record_id(tenant_id: str) -> str:
    """What the deletion record keeps instead of the tenant id: whoever holds the id can
    find its record (that is what the record is for), the database alone names nobody."""
    return "del_" + hashlib.sha256(b"tollway deletion record v1:" + tenant_id.encode()).hexdigest()[:32]


def utc_day(ms: int) -> int:
    """The UTC day of an instant: all a deletion record keeps of its times."""
    return ms - ms % DAY_MS
