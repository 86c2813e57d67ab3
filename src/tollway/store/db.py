"""The async database engine, transactions, and migrations.

SQLite (embedded) runs in WAL mode with one writer at a time: in-process writers queue
on an asyncio lock and each write transaction starts with BEGIN IMMEDIATE, so writers in
other processes wait on SQLite's lock (busy_timeout) instead of failing half-way.
PostgreSQL needs neither: wallet writes are conditional UPDATEs, atomic on their own.
Driver errors that mean "the database is not there" become ServiceUnavailable here and
nowhere else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tollway.errors import ServiceUnavailable

MIGRATIONS = Path(__file__).with_name("migrations")


def now_ms() -> int:
    return int(time.time() * 1000)


def async_url(url: str, base_dir: Path | None = None) -> str:
    """tollway.toml URL -> SQLAlchemy async URL. Relative SQLite paths are relative to
    the config file's folder, so `--config /etc/tollway/tollway.toml` finds its data."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path != ":memory:" and base_dir is not None and not Path(path).is_absolute():
            path = str((base_dir / path).resolve())
        return f"sqlite+aiosqlite:///{path}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    raise ValueError(f"unsupported database URL {url!r}")


def sqlite_path(url: str, base_dir: Path | None = None) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(async_url(url, base_dir)[len("sqlite+aiosqlite:///"):])


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
)


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        # "database is locked" after busy_timeout is contention, still a 503 for the client.
        return True
    if isinstance(exc, _UNAVAILABLE):
        return True
    name = type(exc).__name__
    # asyncpg raises its own classes (wrapped by SQLAlchemy as DBAPIError) on shutdown.
    return name in {"ConnectionDoesNotExistError", "CannotConnectNowError", "AdminShutdownError"} or (
        isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None and _is_unavailable_orig(exc.orig)
    )


def _is_unavailable_orig(orig: BaseException) -> bool:
    text = type(orig).__name__ + " " + type(getattr(orig, "__cause__", None)).__name__
    return any(s in text for s in ("Connection", "CannotConnect", "Shutdown", "OSError", "Timeout"))


class Store:
    """One engine per process. `write()` for a serialised write transaction, `read()` for reads."""

    def __init__(self, url: str, *, base_dir: Path | None = None, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.queries = 0  # statements sent; tests assert cache hits cost none
        kwargs: dict[str, Any] = {}
        if not self.is_sqlite:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_recycle=300,
                          connect_args={"timeout": 5, "command_timeout": 30})
        self.engine: AsyncEngine = create_async_engine(async_url(url, base_dir), **kwargs)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        sync = self.engine.sync_engine
        if self.is_sqlite:
            event.listen(sync, "connect", _sqlite_on_connect)
            event.listen(sync, "begin", _sqlite_on_begin)
        event.listen(sync, "before_cursor_execute", self._count)

    def _count(self, *_: Any) -> None:
        self.queries += 1

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One short write transaction; committed on success, rolled back on error."""
        if self._write_lock is None:
            async with self._translate(), self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._translate(), self.engine.connect() as raw:
            conn = await raw.execution_options(tollway_write=True)
            async with conn.begin():
                yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._translate(), self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def _translate(self) -> AsyncIterator[None]:
        try:
            yield
        except sqlalchemy.exc.IntegrityError:
            raise
        except ServiceUnavailable:
            raise
        except Exception as exc:
            if _is_unavailable(exc):
                raise ServiceUnavailable(
                    "The gateway's database is unavailable; retry shortly.", code="database_unavailable"
                ) from exc
            raise

    async def migrate(self) -> None:
        async with self._translate(), self.engine.connect() as conn:
            await conn.run_sync(_upgrade)
            await conn.commit()

    async def migrations_current(self) -> bool:
        async with self.read() as conn:
            return await conn.run_sync(_is_current)

    async def close(self) -> None:
        await self.engine.dispose()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit BEGIN
    # would defer the write lock to the first write and break serialisation).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",   # durable across process crashes; WAL fsyncs on checkpoint
        "busy_timeout=10000",
        "foreign_keys=ON",
        "secure_delete=ON",     # deleted personal data is overwritten, not left in free pages
    ):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get("tollway_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _alembic_config(sync_conn: Any) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    return cfg


def _upgrade(sync_conn: Any) -> None:
    from alembic import command

    command.upgrade(_alembic_config(sync_conn), "head")


def _is_current(sync_conn: Any) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(sync_conn))
    current = MigrationContext.configure(sync_conn).get_current_heads()
    return set(current) == set(script.get_heads())
