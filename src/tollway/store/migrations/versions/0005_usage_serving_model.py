"""usage rows say which model was asked for and how many upstream requests were sent

Revision ID: 0005
Revises: 0004

With fallbacks and retries (docs/proxy.md) the model that served and was billed, still
`usage_events.model`, may differ from the one the client asked for. Two columns, added
without rewriting the table on either database: `requested_model` (NULL on rows written
before), `attempts` (1 on rows written before, the server default).
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage_events", sa.Column("requested_model", sa.String(200), nullable=True))
    op.add_column("usage_events", sa.Column("attempts", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    op.drop_column("usage_events", "attempts")
    op.drop_column("usage_events", "requested_model")
