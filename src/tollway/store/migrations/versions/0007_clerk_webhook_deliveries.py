"""clerk: the Svix message ids of processed Clerk webhook deliveries

Revision ID: 0007
Revises: 0006

A Clerk webhook (webhooks/clerk.py) is acted on once per `svix-id`: a redelivery or a
replay finds its row and changes nothing. Rows older than a day are pruned (Svix refuses
a signature older than five minutes, so an older id can never verify again).
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clerk_webhook_deliveries",
        sa.Column("id", sa.String(120), nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("outcome", sa.String(200), nullable=False),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_clerk_webhook_deliveries"),
    )
    op.create_index("ix_clerk_webhook_deliveries_received_at", "clerk_webhook_deliveries", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_clerk_webhook_deliveries_received_at", table_name="clerk_webhook_deliveries")
    op.drop_table("clerk_webhook_deliveries")
