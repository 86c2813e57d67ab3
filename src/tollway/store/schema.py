"""SQLAlchemy Core tables. Times are unix epoch milliseconds (BigInteger), money micro-USD.

The ledger is append-only: application code inserts ledger rows and never updates or
deletes them. A wallet row caches the running balance; `tollway ledger verify` checks
it against the sum of the ledger.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

tenants = Table(
    "tenants", metadata,
    Column("id", String(40), primary_key=True),
    Column("name", Text, nullable=True),           # personal data: erased on deletion
    Column("email", Text, nullable=True),          # personal data: erased on deletion
    Column("external_id", String(200), nullable=True, unique=True),  # identity-provider subject
    Column("created_at", BigInteger, nullable=False),
    Column("deletion_requested_at", BigInteger, nullable=True),
    Column("deleted_at", BigInteger, nullable=True),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id"), nullable=False, index=True),
    Column("name", Text, nullable=True),
    Column("prefix", String(16), nullable=False),          # display only: "ak_AbCd"
    Column("key_hash", String(64), nullable=False, unique=True),  # hex HMAC-SHA256
    Column("created_at", BigInteger, nullable=False),
    Column("last_used_at", BigInteger, nullable=True),
    Column("revoked_at", BigInteger, nullable=True),
    Column("expires_at", BigInteger, nullable=True),
    Column("spend_limit_micros", BigInteger, nullable=True),
    Column("spend_limit_period", String(8), nullable=True),  # "day" | "month"
    # The key's own rate limits (proxy/ratelimit.py): NULL = the [limits] default, 0 = none.
    Column("requests_per_minute", BigInteger, nullable=True),
    Column("tokens_per_minute", BigInteger, nullable=True),
)

# Spend of one limited key in one period (reservations included), so the limit holds
# under concurrency the same way the wallet does.
key_spend = Table(
    "key_spend", metadata,
    Column("key_id", String(40), primary_key=True),
    Column("period", String(10), primary_key=True),        # "2026-11-28" or "2026-11"
    Column("spent_micros", BigInteger, nullable=False),
)

wallets = Table(
    "wallets", metadata,
    Column("tenant_id", String(40), ForeignKey("tenants.id"), primary_key=True),
    Column("balance_micros", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    CheckConstraint("balance_micros >= 0", name="balance_not_negative"),
)

# SQLite stores the request path's three tables (ledger entries, reservations, usage)
# WITHOUT ROWID, ordered by their text primary key (request and entry ids start with a
# timestamp, so inserts append): a rowid table keeps a second B-tree for that key, one more
# page written per insert or delete. The request path's two COMMITs went from ~19 to ~13
# pages in the WAL (docs/performance-history.md, fifth pass). PostgreSQL ignores the option.

ledger_entries = Table(
    "ledger_entries", metadata,
    Column("id", String(120), primary_key=True),            # the idempotency key
    Column("tenant_id", String(40), nullable=False),
    Column("kind", String(16), nullable=False),             # credit|debit|reserve|release|refund|adjust
    Column("amount_micros", BigInteger, nullable=False),    # signed change to the balance
    Column("balance_after_micros", BigInteger, nullable=False),
    Column("reference", String(200), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_ledger_entries_tenant_created", "tenant_id", "created_at"),
    sqlite_with_rowid=False,
)

# One row per open reservation; deleted when settled or released. This is bookkeeping
# about the ledger (what is still held), not the ledger itself. It only holds requests in
# flight, so the sweep's scan by age needs no index (an index was one more page per write).
reservations = Table(
    "reservations", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant_id", String(40), nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("key_period", String(10), nullable=True),
    Column("worker_id", String(40), nullable=True),        # who holds it; swept when it dies
    Column("amount_micros", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    sqlite_with_rowid=False,
)

# Token counts take 64 bits (migration 0003): a provider's count is bounded before it is
# billed (providers/base.py), but a 32-bit column made the settle of a count above 2^31
# fail, and the request went free. SQLite's INTEGER is 64-bit already.
TOKENS = BigInteger().with_variant(Integer(), "sqlite")

usage_events = Table(
    "usage_events", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant_id", String(40), nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("model", String(200), nullable=False),
    Column("provider", String(100), nullable=False),
    Column("prompt_tokens", TOKENS, nullable=False),
    Column("completion_tokens", TOKENS, nullable=False),
    Column("cached_tokens", TOKENS, nullable=False),
    Column("reasoning_tokens", TOKENS, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
    Column("estimated", Boolean, nullable=False),
    Column("status", Integer, nullable=False),
    Column("error_type", String(64), nullable=True),
    Column("latency_ms", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # `model` is the model that served and was billed; with fallbacks (docs/proxy.md) the
    # client may have asked for another, and several upstream requests may have been sent.
    Column("requested_model", String(200), nullable=True),  # NULL: rows from before 0005
    Column("attempts", Integer, nullable=False, server_default="1"),
    # A tenant's rows in request-id order, i.e. by time (request ids begin with the time):
    # the dashboard reads a time range of one tenant through it. On SQLite this is the
    # same B-tree the plain tenant_id index was (a WITHOUT ROWID index holds the key).
    Index("ix_usage_events_tenant_request", "tenant_id", "request_id"),
    sqlite_with_rowid=False,
)

# A journaled charge the ledger refused to apply (ledger/journal.py): kept here, with the journal
# line as it was written, instead of blocking every other charge; `ledger verify` reports
# each one until an operator resolves it (docs/ledger.md).
set_aside_charges = Table(
    "set_aside_charges", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant_id", String(40), nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("charge", Text, nullable=False),                 # the journal line (ids and counts only)
    Column("reason", String(200), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

access_log = Table(
    "access_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", BigInteger, nullable=False, index=True),
    Column("request_id", String(64), nullable=False),
    Column("method", String(10), nullable=False),
    Column("path", String(200), nullable=False),
    Column("status", Integer, nullable=False),
    Column("client_ip", String(64), nullable=True),        # personal data: erased on deletion
    Column("latency_ms", Integer, nullable=False),
    Column("tenant_id", String(40), nullable=True, index=True),
)

# Revocations for caches that live inside each worker (memory://): every worker polls
# this table and acknowledges in `workers`, and a revoke waits for every live worker.
revocations = Table(
    "revocations", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("key_hash", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

workers = Table(
    "workers", metadata,
    Column("id", String(40), primary_key=True),
    Column("acked_seq", BigInteger, nullable=False),
    Column("heartbeat_at", BigInteger, nullable=False),
    Column("process", String(200), nullable=True),         # boot id|pid namespace|pid|start: see auth/workers.py
)

stripe_events = Table(
    "stripe_events", metadata,
    Column("id", String(120), primary_key=True),            # evt_...
    Column("type", String(80), nullable=False),
    Column("outcome", String(200), nullable=False),
    Column("received_at", BigInteger, nullable=False),
)

# Processed Clerk webhook deliveries, by Svix message id (webhooks/clerk.py); pruned after a day.
clerk_webhook_deliveries = Table(
    "clerk_webhook_deliveries", metadata,
    Column("id", String(120), primary_key=True),            # svix-id: msg_...
    Column("type", String(100), nullable=False),
    Column("outcome", String(200), nullable=False),
    Column("received_at", BigInteger, nullable=False, index=True),
)

topups = Table(
    "topups", metadata,
    Column("session_id", String(120), primary_key=True),    # cs_...
    Column("tenant_id", String(40), nullable=False, index=True),
    Column("amount_micros", BigInteger, nullable=False),
    Column("currency", String(8), nullable=False),
    Column("status", String(16), nullable=False),           # created|pending|paid|failed|expired|refused
    Column("payment_intent", String(120), nullable=True, index=True),
    Column("refunded_micros", BigInteger, nullable=False, server_default="0"),
    Column("created_at", BigInteger, nullable=False),
)

deletion_requests = Table(
    "deletion_requests", metadata,
    Column("tenant_id", String(40), primary_key=True),
    Column("requested_at", BigInteger, nullable=False),
    Column("completed_at", BigInteger, nullable=True),
)

# One row per dashboard sign-in link that was used (dashboard/sessions.py): the primary
# key makes a second use of the same link fail, on every worker at once.
dashboard_link_uses = Table(
    "dashboard_link_uses", metadata,
    Column("nonce", String(64), primary_key=True),
    Column("used_at", BigInteger, nullable=False),
)

# The dashboard's daily usage totals per (tenant, day, key, model) for days that are over,
# folded in the background from usage_events (dashboard/rollup.py); never written by the
# request path. usage_rollup's one row says up to when (exclusive, epoch ms) they are folded.
usage_daily = Table(
    "usage_daily", metadata,
    Column("tenant_id", String(40), primary_key=True),
    Column("day", Integer, primary_key=True),               # days since 1970-01-01 (UTC)
    Column("key_id", String(40), primary_key=True),         # "" for rows without a key
    Column("model", String(200), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
)

usage_rollup = Table(
    "usage_rollup", metadata,
    Column("id", Integer, primary_key=True),
    Column("folded_until", BigInteger, nullable=False),
)
