"""request path's tables by primary key; reservations without the age index

Revision ID: 0002
Revises: 0001

SQLite: ledger_entries, reservations and usage_events are rebuilt WITHOUT ROWID (rows
copied, indexes re-created); schema.py says why. Both databases: reservations loses its
index on created_at (the table holds only requests in flight). A SQLite file holding
300,000 requests (1.2M rows, 191 MB) took 3.4 s here (docs/operations.md).
"""
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_REBUILT = ("ledger_entries", "reservations", "usage_events")


def upgrade() -> None:
    op.drop_index("ix_reservations_created_at", table_name="reservations")
    if op.get_bind().dialect.name == "sqlite":
        for table in _REBUILT:
            _rebuild(table, with_rowid=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in _REBUILT:
            _rebuild(table, with_rowid=True)
    op.create_index("ix_reservations_created_at", "reservations", ["created_at"])


def _rebuild(table: str, *, with_rowid: bool) -> None:
    # Batch mode copies the table into a new one built with these options, then renames it.
    with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_with_rowid": with_rowid}):
        pass
