"""dashboard: used sign-in links, daily usage totals, usage by tenant and request id

Revision ID: 0004
Revises: 0003

A sign-in link (`tollway dashboard-link`) is a signed token carrying a random nonce;
using it inserts the nonce into dashboard_link_uses, so a second use fails on the key.
usage_daily / usage_rollup: the dashboard's totals of days that are over (schema.py).
usage_events' index on tenant_id becomes one on (tenant_id, request_id): on SQLite the
same B-tree (a WITHOUT ROWID index holds the primary key), on PostgreSQL one index as
before, wider by the request id, so a tenant's time range is an index range.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_usage_events_tenant_id", table_name="usage_events")
    op.create_index("ix_usage_events_tenant_request", "usage_events", ["tenant_id", "request_id"])
    op.create_table(
        "usage_daily",
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day", "key_id", "model", name="pk_usage_daily"),
    )
    op.create_table(
        "usage_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("folded_until", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_rollup"),
    )
    op.create_table(
        "dashboard_link_uses",
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("used_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name="pk_dashboard_link_uses"),
    )


def downgrade() -> None:
    op.drop_table("dashboard_link_uses")
    op.drop_table("usage_rollup")
    op.drop_table("usage_daily")
    op.drop_index("ix_usage_events_tenant_request", table_name="usage_events")
    op.create_index("ix_usage_events_tenant_id", "usage_events", ["tenant_id"])
