"""dashboard: used sign-in links

Revision ID: 0004
Revises: 0002

A sign-in link (`tollway dashboard-link`) is a signed token carrying a random nonce;
using it inserts the nonce here, so a second use fails on the primary key.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dashboard_link_uses",
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("used_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name="pk_dashboard_link_uses"),
    )


def downgrade() -> None:
    op.drop_table("dashboard_link_uses")
