"""token counts in 64-bit columns; the table of charges the journal set aside

Revision ID: 0003
Revises: 0002

PostgreSQL: usage_events' four token columns become BIGINT, in one ALTER that rewrites
the table under an exclusive lock (docs/operations.md has its time on 300,000 rows).
SQLite: nothing to change there, its INTEGER already holds 64 bits. Both: a new table,
set_aside_charges (journal.py, docs/ledger.md).
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        _retype("BIGINT")
    op.create_table(
        "set_aside_charges",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("charge", sa.Text(), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_set_aside_charges")),
    )


def downgrade() -> None:
    op.drop_table("set_aside_charges")
    if op.get_bind().dialect.name != "sqlite":
        _retype("INTEGER")


def _retype(sql_type: str) -> None:
    # One statement, so PostgreSQL rewrites the table once, not once per column.
    op.execute("ALTER TABLE usage_events " + ", ".join(f"ALTER COLUMN {c} TYPE {sql_type}" for c in _COUNTS))
