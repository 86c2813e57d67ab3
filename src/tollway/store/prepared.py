"""Core statements compiled once and, on SQLite, run straight on the DBAPI cursor.

Why: the ledger runs two write transactions per request. On SQLite, SQLAlchemy's work
around each execution (execution context, events, result object) cost about ten times
what SQLite itself spends, and the writer runs on the event loop (sqlite_writer.py), so
every request paid for it (docs/performance-history.md). The statement
is still written once, in Core, against the schema; only its execution takes the short
path. Elsewhere (PostgreSQL, where the round trip dominates, and the async SQLite
engine a caller's own transaction may be on) it is executed normally, except by
`fetch`: one statement straight on an asyncpg connection (Store.statement).

Results come back as plain tuples in the statement's column order on both paths.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import Executable

# Key in a pooled connection's `info`: a callable given the SQL of each statement
# executed on the cursor path (sqlite_writer.py sets it).
STATEMENT_HOOK = "tollway.on_statement"


class Prepared:
    def __init__(self, stmt: Executable) -> None:
        self.stmt = stmt
        # SQL text and parameter order, per set of parameter names (an INSERT's columns
        # are the names it is given).
        self._compiled: dict[tuple[str, ...], tuple[str, tuple[str, ...]]] = {}

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Execute once; the rows it returns (RETURNING), or [] if none."""
        if conn.dialect.driver != "pysqlite":
            result = conn.execute(self.stmt, dict(params))
            return [tuple(r) for r in result] if result.returns_rows else []
        return self._on_cursor(conn, [params], many=False)

    def first(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        found = self.rows(conn, params)
        return found[0] if found else None

    def many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per row (same keys in every row); nothing returned."""
        if conn.dialect.driver != "pysqlite":
            conn.execute(self.stmt, [dict(r) for r in rows])
            return
        self._on_cursor(conn, rows, many=True)

    def _on_cursor(self, conn: Connection, rows: Sequence[Mapping[str, Any]], *, many: bool
                   ) -> list[tuple[Any, ...]]:
        sql, order = self._sql(conn.dialect, tuple(rows[0]))
        fairy = conn.connection
        raw: Any = fairy.driver_connection
        # Every statement is still seen (Store counts them; tests and bench read the count)
        # through the hook the writer puts on its connection, the only one this path runs
        # on: a call instead of SQLAlchemy's event dispatch (which, with the cursor object,
        # was half of this method's cost per statement).
        fairy.info[STATEMENT_HOOK](sql)
        try:
            if many:
                raw.executemany(sql, [[r[k] for k in order] for r in rows])
                return []
            params = rows[0]
            found: list[tuple[Any, ...]] = raw.execute(sql, [params[k] for k in order]).fetchall()
            return found
        except sqlite3.Error as exc:
            raise as_sqlalchemy_error(sql, exc) from exc

    async def fetch(self, driver_conn: Any, dialect: Dialect, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Execute once on an asyncpg connection, as its own transaction unless one is
        open on it; asyncpg prepares the statement once per connection. Driver errors
        propagate as asyncpg raises them (Store.statement translates them)."""
        sql, order = self._sql(dialect, tuple(params))
        return [tuple(r) for r in await driver_conn.fetch(sql, *[params[k] for k in order])]

    def _sql(self, dialect: Dialect, keys: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
        found = self._compiled.get((dialect.name, *keys))
        if found is None:
            compiled = self.stmt.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
            order = tuple(compiled.positiontup or ())
            if set(order) - set(keys):
                raise ValueError(f"missing parameters: {sorted(set(order) - set(keys))}")
            found = self._compiled[(dialect.name, *keys)] = (str(compiled), order)
        return found


def as_sqlalchemy_error(sql: str, exc: sqlite3.Error) -> sqlalchemy.exc.StatementError:
    # The same exception classes SQLAlchemy raises (IntegrityError for a duplicate id,
    # OperationalError for a locked database), so callers and Store's error translation
    # need not know which path ran; parameters are never included.
    return sqlalchemy.exc.DBAPIError.instance(sql, None, exc, sqlite3.Error, hide_parameters=True)
