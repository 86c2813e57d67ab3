"""key rate limits: api_keys.requests_per_minute and tokens_per_minute

Revision ID: 0006
Revises: 0005

A key's own rate limits (proxy/ratelimit.py); NULL takes the [limits] default of
tollway.toml, 0 means unlimited. Nullable columns without a default: adding them rewrites
no row on either database.
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("requests_per_minute", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("tokens_per_minute")
        batch.drop_column("requests_per_minute")
