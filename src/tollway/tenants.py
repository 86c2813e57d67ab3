"""Tenants: the customers of the gateway. Creating one opens its wallet; deleting one
erases the person and keeps the books.

Deletion (GDPR art. 17, CCPA) in four steps, each safe to repeat if the process dies:
  1. the request is recorded in deletion_requests (tenant id and time, nothing else);
  2. every key is revoked at once (keys.revoke_tenant returns when no worker admits it);
  3. open reservations are released: requests still in flight are not charged;
  4. one transaction erases and pseudonymises, and records the completion time.

What "pseudonymise" means here. A tenant id is random and opaque, but it is not
anonymous: it is in the operator's Stripe metadata next to the customer's card and
email, in log lines shipped elsewhere, in the attribution header sent upstream, and in
the customer's own records. Hashing it would not help (anyone holding the id can compute
the hash). So the usage, ledger, payment and access-log rows are moved to a *fresh*
random id ("tn_anon_..."), and request and key ids are replaced by an HMAC under a
random salt that is discarded when the transaction ends: the rows still add up per
account and per request (reserve/release/debit of one request keep one shared id), but
no mapping back to the person exists anywhere. Stripe object ids in ledger ids and
payment rows are kept: they are the processor's payment records, which accounting law
requires keeping and which let a later refund or dispute still find its wallet.

What is erased: the tenant row (name, email, external_id), the key rows (their names
are often personal), the tenant's client IPs everywhere in the access log (including
unauthenticated rows from the same addresses). SQLite runs with secure_delete, and the
WAL is checkpointed and truncated afterwards, so the bytes are gone from the database
files. On PostgreSQL, once no transaction could still see the deleted row versions (until
then even VACUUM FULL keeps them), VACUUM FULL rewrites the small tables that held names
and the access log is vacuumed; its WAL, replicas and backups age out by the operator's
policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tollway.errors import Conflict, NotFound
from tollway.keys import new_id
from tollway.ledger import Ledger
from tollway.money import format_usd
from tollway.store.db import Store, now_ms
from tollway.store.schema import (
    access_log,
    api_keys,
    deletion_requests,
    key_spend,
    ledger_entries,
    reservations,
    stripe_events,
    tenants,
    topups,
    usage_daily,
    usage_events,
    wallets,
)
from tollway.telemetry import log

if TYPE_CHECKING:
    from tollway.keys import Keys

# Every table with a tenant_id column, and what deletion does to it (a test checks that
# a new table holding tenant ids cannot be added without deciding this).
TENANT_TABLES: dict[str, str] = {
    "tenants": "row erased",
    "api_keys": "rows erased after revocation",
    "wallets": "moved to the pseudonym",
    "ledger_entries": "moved to the pseudonym; request ids pseudonymised",
    "usage_events": "moved to the pseudonym; request and key ids pseudonymised",
    "reservations": "released before erasure (none remain)",
    "topups": "moved to the pseudonym (Stripe ids kept)",
    "access_log": "moved to the pseudonym; client IPs erased",
    "deletion_requests": "kept: the record of the request and its completion",
    "usage_daily": "rows erased (dashboard totals, derived from the pseudonymised usage rows)",
}
_REQUEST_KINDS = frozenset({"reserve", "release", "debit"})
_ATTEMPTS = 5


class Tenants:
    def __init__(self, store: Store, ledger: Ledger, keys: Keys | None = None) -> None:
        self.store = store
        self.ledger = ledger
        self.keys = keys

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
            if row is None or row["deleted_at"] is not None:
                raise await _not_found(conn, tenant_id)
        return dict(row)

    async def list(self) -> list[dict[str, Any]]:
        """Live tenants (the pseudonymous holders of deleted tenants' books are not listed)."""
        async with self.store.read() as conn:
            rows = (await conn.execute(
                sa.select(tenants).where(tenants.c.deleted_at.is_(None)).order_by(tenants.c.created_at)
            )).mappings().all()
        return [dict(r) for r in rows]

    # --- export ---------------------------------------------------------------------------

    async def export(self, tenant_id: str) -> dict[str, Any]:
        """Everything Tollway holds about a tenant, as one JSON-ready object (GDPR art. 15/20)."""
        key_cols = [c for c in api_keys.c if c.name != "key_hash"]
        await self.ledger.flush()  # every settled request's usage row, journaled ones too
        async with self.store.read() as conn:
            profile = (await conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id))).mappings().first()
            if profile is None or profile["deleted_at"] is not None:
                raise await _not_found(conn, tenant_id)

            async def rows(query: Any) -> list[dict[str, Any]]:
                return [_readable(dict(r)) for r in (await conn.execute(query)).mappings().all()]

            balance = (await conn.execute(
                sa.select(wallets.c.balance_micros).where(wallets.c.tenant_id == tenant_id))).scalar()
            keys = await rows(sa.select(*key_cols).where(api_keys.c.tenant_id == tenant_id)
                              .order_by(api_keys.c.created_at))
            ledger = await rows(sa.select(ledger_entries).where(ledger_entries.c.tenant_id == tenant_id)
                                .order_by(ledger_entries.c.created_at, ledger_entries.c.id))
            usage = await rows(sa.select(usage_events).where(usage_events.c.tenant_id == tenant_id)
                               .order_by(usage_events.c.created_at))
            payments = await rows(sa.select(topups).where(topups.c.tenant_id == tenant_id)
                                  .order_by(topups.c.created_at))
            access = await rows(sa.select(access_log).where(access_log.c.tenant_id == tenant_id)
                                .order_by(access_log.c.created_at))
        return {
            "format": "tollway-tenant-export/1",
            "exported_at": _iso(now_ms()),
            "profile": _readable({k: v for k, v in profile.items() if k != "deleted_at"}),
            "wallet": {"balance_micros": int(balance or 0), "balance_usd": format_usd(int(balance or 0))},
            "keys": keys,
            "ledger": ledger,
            "usage": usage,
            "payments": payments,
            "access_log": access,
        }

    # --- deletion ---------------------------------------------------------------------------

    async def delete(self, tenant_id: str) -> dict[str, Any]:
        """Erase a tenant's personal data and pseudonymise its books; idempotent."""
        if self.keys is None:
            raise RuntimeError("Tenants.delete needs the Keys service to revoke keys")
        record, done = await self._record_request(tenant_id)
        if done:
            return {**record, "already_deleted": True}
        revoked = await self.keys.revoke_tenant(tenant_id)
        released = 0
        erased: tuple[dict[str, Any], int | None] | None = None
        for attempt in range(_ATTEMPTS):
            for rid in await self.ledger.open_requests(tenant_id):
                if await self.ledger.release(rid) is not None:
                    released += 1
            await self.ledger.flush()  # journaled charges into the books that are moved below
            erased = await self._erase(tenant_id)
            if erased is not None:
                break
            await asyncio.sleep(0.05 * (attempt + 1))  # a request that authenticated just before revocation
        if erased is None:
            raise Conflict("requests of this tenant are still starting; retry the deletion in a moment")
        result, xid = erased
        scrubbed = await self._scrub_files(xid)
        if not scrubbed:
            log.warning("tenant_deleted_files_not_scrubbed", tenant_id=tenant_id,
                        notice="an older transaction outlived the wait; the erased bytes leave the "
                               "database files at the next checkpoint (SQLite) or vacuum (PostgreSQL)")
        log.info("tenant_deleted", tenant_id=tenant_id, count=revoked, released=released)
        return {**result, "keys_revoked": revoked, "reservations_released": released, "already_deleted": False,
                "files_scrubbed": scrubbed}

    async def _record_request(self, tenant_id: str) -> tuple[dict[str, Any], bool]:
        async with self.store.write() as conn:
            t = (await conn.execute(sa.select(tenants.c.deleted_at).where(tenants.c.id == tenant_id))).first()
            found = (await conn.execute(sa.select(deletion_requests)
                                        .where(deletion_requests.c.tenant_id == tenant_id))).mappings().first()
            if t is None or t.deleted_at is not None:
                if found is not None and found["completed_at"] is not None:
                    return _request_view(dict(found)), True
                raise NotFound(f"no tenant {tenant_id}")
            if found is not None:
                return _request_view(dict(found)), False  # an interrupted deletion: finish it
            ts = now_ms()
            await conn.execute(deletion_requests.insert().values(tenant_id=tenant_id, requested_at=ts))
            await conn.execute(tenants.update().where(tenants.c.id == tenant_id).values(deletion_requested_at=ts))
        return _request_view({"tenant_id": tenant_id, "requested_at": ts, "completed_at": None}), False

    async def _erase(self, tenant_id: str) -> tuple[dict[str, Any], int | None] | None:
        """One transaction; None (and nothing changed) if a reservation appeared meanwhile.
        Returns the deletion request's view and, on PostgreSQL, the transaction's id."""
        async with self.store.write() as conn:
            held = (await conn.execute(sa.select(sa.func.count()).select_from(reservations)
                                       .where(reservations.c.tenant_id == tenant_id))).scalar_one()
            if held or self.ledger.held_in_memory(tenant_id) or self.ledger.unapplied(tenant_id):
                return None
            ts = now_ms()
            pseudo = _Pseudonyms()
            anon = pseudo.tenant
            await conn.execute(tenants.insert().values(id=anon, created_at=ts, deletion_requested_at=ts,
                                                       deleted_at=ts))
            balance = int((await conn.execute(
                sa.select(wallets.c.balance_micros).where(wallets.c.tenant_id == tenant_id))).scalar() or 0)
            await conn.execute(wallets.insert().values(tenant_id=anon, balance_micros=balance, updated_at=ts))
            await conn.execute(wallets.delete().where(wallets.c.tenant_id == tenant_id))
            await _move_ledger(conn, tenant_id, anon, pseudo)
            await _move_usage(conn, tenant_id, anon, pseudo)
            await _move_access_log(conn, tenant_id, anon, pseudo)
            await conn.execute(topups.update().where(topups.c.tenant_id == tenant_id).values(tenant_id=anon))
            await conn.execute(  # outcomes name the tenant ("credited 5.00 to tn_...")
                stripe_events.update().where(stripe_events.c.outcome.contains(tenant_id, autoescape=True))
                .values(outcome=sa.func.replace(stripe_events.c.outcome, tenant_id, anon)))
            key_ids = sa.select(api_keys.c.id).where(api_keys.c.tenant_id == tenant_id)
            await conn.execute(key_spend.delete().where(key_spend.c.key_id.in_(key_ids)))
            await conn.execute(api_keys.delete().where(api_keys.c.tenant_id == tenant_id))
            await conn.execute(usage_daily.delete().where(usage_daily.c.tenant_id == tenant_id))
            await conn.execute(tenants.delete().where(tenants.c.id == tenant_id))
            await conn.execute(deletion_requests.update().where(deletion_requests.c.tenant_id == tenant_id)
                               .values(completed_at=ts))
            req = (await conn.execute(sa.select(deletion_requests)
                                      .where(deletion_requests.c.tenant_id == tenant_id))).mappings().one()
            xid = None  # PostgreSQL: this transaction's id, to know when its deletes are invisible
            if not self.store.is_sqlite:
                xid = int((await conn.exec_driver_sql("SELECT txid_current()")).scalar_one())
        # The remaining balance is reported so the operator can refund it; the pseudonym is not.
        return {**_request_view(dict(req)), "balance_usd": format_usd(balance)}, xid

    async def _scrub_files(self, xid: int | None) -> bool:
        """Make the erased bytes leave the database files, not only the tables."""
        if self.store.is_sqlite:
            return await checkpoint_sqlite(self.store)
        assert xid is not None
        async with self.store.engine.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            clear = await _wait_until_invisible(auto, xid)
            await auto.exec_driver_sql("VACUUM (FULL) tenants, api_keys")
            await auto.exec_driver_sql("VACUUM access_log")
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


async def _wait_until_invisible(conn: AsyncConnection, xid: int, limit: float = 30.0) -> bool:
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


class _Pseudonyms:
    """Fresh ids for one deletion; the salt lives only as long as this object."""

    def __init__(self) -> None:
        self._salt = secrets.token_bytes(32)
        self.tenant = "tn_anon_" + secrets.token_hex(8)

    def _mac(self, value: str) -> str:
        return hmac.new(self._salt, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def request(self, request_id: str) -> str:
        return "req_anon_" + self._mac("r:" + request_id)[:24]

    def key(self, key_id: str | None) -> str | None:
        return "key_anon_" + self._mac("k:" + key_id)[:16] if key_id else None


async def _move_ledger(conn: AsyncConnection, tenant_id: str, anon: str, pseudo: _Pseudonyms) -> None:
    rows = (await conn.execute(sa.select(ledger_entries.c.id, ledger_entries.c.kind, ledger_entries.c.reference)
                               .where(ledger_entries.c.tenant_id == tenant_id))).all()
    updates = []
    for entry_id, kind, ref in rows:
        new_id = entry_id.replace(tenant_id, anon)
        new_ref = ref.replace(tenant_id, anon) if ref else ref
        if kind in _REQUEST_KINDS and ref:
            new_id, new_ref = new_id.replace(ref, pseudo.request(ref)), pseudo.request(ref)
        updates.append({"b_old": entry_id, "b_id": new_id, "b_ref": new_ref})
    if updates:
        await conn.execute(
            ledger_entries.update().where(ledger_entries.c.id == sa.bindparam("b_old"))
            .values(id=sa.bindparam("b_id"), reference=sa.bindparam("b_ref"), tenant_id=anon), updates)


async def _move_usage(conn: AsyncConnection, tenant_id: str, anon: str, pseudo: _Pseudonyms) -> None:
    rows = (await conn.execute(sa.select(usage_events.c.request_id, usage_events.c.key_id)
                               .where(usage_events.c.tenant_id == tenant_id))).all()
    updates = [{"b_old": rid, "b_rid": pseudo.request(rid), "b_key": pseudo.key(kid)} for rid, kid in rows]
    if updates:
        await conn.execute(
            usage_events.update().where(usage_events.c.request_id == sa.bindparam("b_old"))
            .values(request_id=sa.bindparam("b_rid"), key_id=sa.bindparam("b_key"), tenant_id=anon), updates)


async def _move_access_log(conn: AsyncConnection, tenant_id: str, anon: str, pseudo: _Pseudonyms) -> None:
    ips = (await conn.execute(sa.select(access_log.c.client_ip).distinct()
                              .where(access_log.c.tenant_id == tenant_id, access_log.c.client_ip.is_not(None))
                              )).scalars().all()
    if ips:
        # Their addresses go from every row, including requests that never authenticated.
        await conn.execute(access_log.update().where(access_log.c.client_ip.in_(ips)).values(client_ip=None))
    rows = (await conn.execute(sa.select(access_log.c.id, access_log.c.request_id)
                               .where(access_log.c.tenant_id == tenant_id))).all()
    updates = [{"b_old": row_id, "b_rid": pseudo.request(rid)} for row_id, rid in rows]
    if updates:
        await conn.execute(
            access_log.update().where(access_log.c.id == sa.bindparam("b_old"))
            .values(request_id=sa.bindparam("b_rid"), tenant_id=anon), updates)


async def _not_found(conn: AsyncConnection, tenant_id: str) -> NotFound:
    done = (await conn.execute(sa.select(deletion_requests.c.completed_at)
                               .where(deletion_requests.c.tenant_id == tenant_id))).scalar()
    if done is not None:
        return NotFound(f"tenant {tenant_id} was deleted at {_iso(done)}")
    return NotFound(f"no tenant {tenant_id}")


def _request_view(req: dict[str, Any]) -> dict[str, Any]:
    return {"tenant_id": req["tenant_id"], "requested_at": _iso(req["requested_at"]),
            "completed_at": _iso(req["completed_at"]) if req["completed_at"] is not None else None}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _readable(row: dict[str, Any]) -> dict[str, Any]:
    """Epoch-ms *_at fields as ISO 8601, micro-USD amounts also as exact USD strings."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k.endswith("_at") and isinstance(v, int):
            out[k] = _iso(v)
        else:
            out[k] = v
        if k.endswith("_micros") and isinstance(v, int):
            out[k.removesuffix("_micros") + "_usd"] = format_usd(v)
    return out
