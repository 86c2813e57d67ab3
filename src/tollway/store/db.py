"""The async database engine, transactions, and migrations.

SQLite (embedded) runs in WAL mode with one writer at a time: in-process writers queue
on an asyncio lock and each write transaction starts with BEGIN IMMEDIATE, so writers in
other processes wait on SQLite's lock (busy_timeout) instead of failing half-way.
`transact(fn)` runs a whole write transaction as one sync function: on SQLite through the
group-committing writer (sqlite_writer.py: on the loop, never waiting on a lock or a
checkpoint there; aiosqlite would hand off to its thread once per DBAPI call, ~17 times
per money transaction), on PostgreSQL through `run_sync`.
PostgreSQL needs neither: wallet writes are conditional UPDATEs, atomic on their own.

Driver errors that mean "the database is not there right now" (refused, restarted,
shutting down, too many connections, a killed session) become ServiceUnavailable here
and nowhere else; programming errors stay what they are. A PostgreSQL restart costs at
most the transactions in flight at that moment: the pool replaces connections the server
closed before handing them out (see Store._pg_checkout), so the service recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import asyncpg.exceptions
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy import Connection, event
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from tollway.errors import ServiceUnavailable
from tollway.store.prepared import Prepared
from tollway.store.sqlite_writer import SQLiteWriter

MIGRATIONS = Path(__file__).with_name("migrations")
T = TypeVar("T")
P = ParamSpec("P")

# Seconds a pooled PostgreSQL connection may sit unused before it is pinged on checkout.
IDLE_PING_AFTER = 1.0

# Any constant: serialises `tollway migrate` runs started on several hosts at once.
_MIGRATION_LOCK = 0x746F6C6C  # "toll"

# PostgreSQL SQLSTATE classes that say "not now" rather than "wrong": connection
# exceptions (08), insufficient resources (53: too many connections, disk full), operator
# intervention (57: shutdown, restart, statement timeout), serialisation failures and
# deadlocks (40001, 40P01), and a read-only standby after a fail-over (25006).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57", "40001", "40P01", "25006")

# SQLite result codes with the same meaning: still locked after busy_timeout, disk I/O
# errors, a full disk, a file that cannot be opened. (SQLITE_ERROR, a bad statement, is not.)
_TRANSIENT_SQLITE_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN",
                            "SQLITE_NOMEM", "SQLITE_PROTOCOL", "SQLITE_READONLY")

_NOT_THERE: tuple[type[BaseException], ...] = (
    OSError,                # refused, reset, unreachable; includes TimeoutError on 3.11+
    asyncio.TimeoutError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection free within pool_timeout
)


def now_ms() -> int:
    return int(time.time() * 1000)


# Now in epoch milliseconds by PostgreSQL's clock. Ages that several hosts write and compare
# (heartbeats, reservations) use it, so a host whose clock is off neither looks silent nor
# makes everyone else's reservations look old (workers.py).
# Literal SQL: no bound parameter, so statements compiled once (prepared.py) take no extra one.
PG_CLOCK_MS: sa.ColumnElement[int] = sa.literal_column(
    "CAST(floor(extract(epoch FROM clock_timestamp()) * 1000) AS BIGINT)", sa.BigInteger)


def db_clock(store: Store) -> sa.ColumnElement[int]:
    """Now, in epoch milliseconds, by the database's clock (PostgreSQL) or this host's
    (SQLite: every process serving from the file runs on this host)."""
    if store.is_sqlite:
        return sa.literal(now_ms(), sa.BigInteger)
    return PG_CLOCK_MS


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


def owner_only(database: Path) -> None:
    """Names, e-mails and client IPs live in the database: created 0600 before SQLite first
    opens it, whatever the umask (SQLite gives its -wal and -shm the database's mode), and
    an existing file, -wal or -shm readable by others tightened to the owner's bits."""
    with contextlib.suppress(OSError):  # exists, or no folder or no right: SQLite reports the latter
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (database.name, database.name + "-wal", database.name + "-shm", database.name + "-journal"):
        f = database.with_name(name)
        with contextlib.suppress(OSError):  # absent, another owner's, a read-only file system
            current = stat.S_IMODE(f.stat().st_mode)
            if current & 0o077:
                f.chmod(current & 0o700)


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` means the database cannot serve us now (retrying later may work)."""
    if isinstance(exc, sqlalchemy.exc.IntegrityError):
        return False
    if isinstance(exc, _NOT_THERE):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlite_error = getattr(exc.orig, "sqlite_errorname", None)
        if isinstance(sqlite_error, str):
            return sqlite_error.startswith(_TRANSIENT_SQLITE_ERRORS)
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES):
            return True
        # asyncpg's "connection is closed" / "connection was closed in the middle of
        # operation": the server went away between two statements.
        if isinstance(exc, sqlalchemy.exc.InterfaceError) and "closed" in str(exc.orig):
            return True
        # asyncpg's "another operation is in progress": the connection took in the error
        # a closing server sends (a restart, pg_terminate_backend) while it sat in the
        # pool, and waits for a ready signal that will never come. Dead, not a bug here.
        return isinstance(getattr(exc.orig, "__cause__", None), asyncpg.exceptions.InternalClientError)
    return False


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The gateway's database is unavailable; retry shortly.", code="database_unavailable")


class Store:
    """One engine per process. `write()` for a serialised write transaction, `read()` for reads."""

    def __init__(self, url: str, *, base_dir: Path | None = None, pool_size: int = 10,
                 pool_timeout: float = 10.0, password: str | None = None) -> None:
        """`password`: PostgreSQL's, from the environment (config: database.password_env)."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.queries = 0  # statements sent; tests assert cache hits cost none
        self.pings = 0    # liveness round trips spent on idle pooled connections
        kwargs: dict[str, Any] = {}
        self._aside: AsyncEngine | None = None  # transact_aside's engine, made on first use
        self._connect_args: dict[str, Any] = {}
        if not self.is_sqlite:
            self._connect_args = {"timeout": 5, "command_timeout": 30,
                                  "server_settings": {"application_name": "tollway"},
                                  **({"password": password} if password else {})}
            kwargs.update(
                pool_size=pool_size,
                # No overflow: a connection opened for a burst is closed when it is
                # returned, so a steady load just above pool_size opened and closed
                # connections all the time (a TCP + TLS attempt + a server fork each, and
                # every prepared statement again): 248 -> 415 requests/s without it.
                max_overflow=0,
                # A request that cannot get a connection this long gets a 503, not a hang.
                pool_timeout=pool_timeout,
                pool_recycle=300,
                connect_args=self._connect_args,
            )
        self.engine: AsyncEngine = create_async_engine(async_url(url, base_dir), **kwargs)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        sync = self.engine.sync_engine
        # transact()'s SQLite writer: one connection, group commit, checkpoints in a thread.
        path = sqlite_path(url, base_dir)
        self.writer = None
        self.sqlite_file: Path | None = None  # the database file, when there is one
        if path is not None and str(path) != ":memory:":
            # The real file, symlinks followed: the serving lock and the journal sit beside
            # it, so two spellings of one database cannot hold two locks (ledger/holds.py).
            self.sqlite_file = path = Path(os.path.realpath(path))
            owner_only(path)
            self.writer = SQLiteWriter(path, on_connect=_sqlite_on_connect, on_statement=self._count)
        if self.is_sqlite:
            event.listen(sync, "connect", _sqlite_on_connect)
            event.listen(sync, "begin", _sqlite_on_begin)
        else:
            event.listen(sync, "checkout", self._pg_checkout)
            event.listen(sync, "checkin", _pg_checkin)
        event.listen(sync, "before_cursor_execute", self._count)

    def _count(self, *_: Any) -> None:
        self.queries += 1

    def _pg_checkout(self, dbapi_conn: Any, record: Any, fairy: Any) -> None:
        """Replace a pooled connection the server has closed before anyone uses it.

        Why not pool_pre_ping: it costs BEGIN, `;` and ROLLBACK (three round trips) on
        every checkout, and a request checks out two or three times. Here a connection in
        steady use costs nothing: asyncpg already marks a connection whose socket the
        server closed; only one idle for longer than IDLE_PING_AFTER (it may have slept
        through a restart) is pinged first. A connection that breaks mid-use fails that
        transaction with a 503 and makes the pool recycle every older connection."""
        if fairy.driver_connection.is_closed():
            raise sqlalchemy.exc.DisconnectionError("closed by the server while idle")
        idle_since = record.info.get("idle_since")
        if idle_since is not None and time.monotonic() - idle_since > IDLE_PING_AFTER:
            self.pings += 1
            try:
                dbapi_conn.ping()
            except Exception as exc:
                raise sqlalchemy.exc.DisconnectionError("did not answer a ping") from exc

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One short write transaction; committed on success, rolled back on error.

        If the connection breaks during COMMIT the outcome is unknown to us: callers make
        their writes idempotent (ledger entry ids, the reservation row as a gate) so that
        a retry after a 503 is always safe."""
        if self._write_lock is None:
            async with self._translate(), self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._translate(), self.engine.connect() as raw:
            conn = await raw.execution_options(tollway_write=True)
            async with conn.begin():
                yield conn

    async def transact(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(conn, *args, **kwargs)` as one write transaction: committed if it
        returns, rolled back if it raises (the exception propagates). Same idempotency
        contract as `write()`. `fn` must not await: on SQLite it runs in the writer
        (sqlite_writer.py), on PostgreSQL through `run_sync`."""
        if self.writer is None:
            async with self.write() as conn:
                return await conn.run_sync(fn, *args, **kwargs)
        return await self.transact_undoable(lambda conn: fn(conn, *args, **kwargs), None)

    async def transact_undoable(self, fn: Callable[[Connection], T], undo: Callable[[], None] | None) -> T:
        """SQLite only: `transact` for an `fn` that also changes this process's memory;
        `undo` reverts that if the transaction is rolled back after `fn` returned
        (sqlite_writer.py)."""
        assert self.writer is not None, "in-memory state goes with the embedded database's writer"
        try:  # what _translate() does, without a context manager's cost (once per request)
            return await self.writer.run(fn, undo)
        except Exception as exc:
            if is_unavailable(exc):
                raise _unavailable() from exc
            raise

    async def transact_aside(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args,
                             **kwargs: P.kwargs) -> T:
        """`transact` on a connection of its own, never one of the pool's (PostgreSQL): for
        the heartbeat, which must not queue behind requests for a pooled connection (up to
        pool_timeout, 10 s by default, four times the silence after which revokes stop
        waiting for a worker). On SQLite it is `transact`: there is no pool to wait for,
        and any write waits for the file's one write lock anyway."""
        if self.is_sqlite:
            return await self.transact(fn, *args, **kwargs)
        async with self._translate(), self._aside_engine().begin() as conn:
            return await conn.run_sync(fn, *args, **kwargs)

    async def statement_aside(self, prepared: Prepared, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """`statement` on transact_aside's connection (PostgreSQL): for the revocation poll,
        which a worker must keep up with while its pool is busy, or it stops trusting its
        key cache and revokes wait for its acknowledgement in vain."""
        if self.is_sqlite:
            return await self.statement(prepared, params)
        async with self._translate(), self._aside_engine().connect() as conn:
            return await conn.run_sync(prepared.rows, params)

    def _aside_engine(self) -> AsyncEngine:
        if self._aside is None:
            self._aside = create_async_engine(self.engine.url, pool_size=1, max_overflow=0, pool_recycle=300,
                                              pool_pre_ping=True, connect_args=self._connect_args)
        return self._aside

    def read_now(self, prepared: Prepared, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """SQLite only: one read statement on the writer's connection, without awaiting, so
        a caller can check what it read and act on it in the same step of the loop (the
        in-memory holds, ledger/holds.py). Sees every money transaction this process committed."""
        assert self.writer is not None, "read_now is for the embedded database"
        try:
            return self.writer.read_now(lambda conn: prepared.rows(conn, params))
        except Exception as exc:
            if is_unavailable(exc):
                raise _unavailable() from exc
            raise

    async def statement(self, prepared: Prepared, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run ONE statement by itself and return its rows. On PostgreSQL it runs outside
        any transaction, so the server commits it on its own (atomically, data-modifying
        CTEs included): one round trip, straight on the pooled asyncpg connection, with
        row locks held only while the server runs it (ledger/postgres.py says why that
        matters). Errors come back as SQLAlchemy's (IntegrityError, ...) or as
        ServiceUnavailable, the same as from `transact`. On SQLite it is a `transact`."""
        if self.is_sqlite:
            return await self.transact(prepared.rows, params)
        # Straight from the pool (checkout and checkin events included), without the
        # Connection and AsyncConnection that engine.connect() would build around it: one
        # statement needs neither (~5% of a request's CPU on this path, docs/performance-history.md).
        dialect = self.engine.dialect
        async with self._translate():
            try:
                fairy = await self.engine.raw_connection()
            except dialect.loaded_dbapi.Error as exc:  # a failed checkout (engine.connect() would wrap it)
                raise _from_asyncpg(dialect, exc) from exc
            try:
                self._count()
                return await prepared.fetch(fairy.driver_connection, dialect, params)
            except Exception as exc:
                error = _from_asyncpg(dialect, exc)
                if is_unavailable(error):
                    await greenlet_spawn(fairy.invalidate)  # never hand this connection out again
                raise error from exc
            finally:
                await greenlet_spawn(fairy.close)  # back to the pool (its queue needs the greenlet)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._translate(), self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def _translate(self) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:  # (a ServiceUnavailable is not "unavailable": it passes as is)
            if is_unavailable(exc):
                raise _unavailable() from exc
            raise

    async def migrate(self) -> None:
        """Apply every migration in one transaction that first takes the database's
        write lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE), so concurrent
        runs, from other hosts or this process, apply them once. The lock must be held
        before Alembic starts: Alembic keeps its run state in process-wide globals."""
        async with self._translate(), self.engine.connect() as raw:
            conn = await raw.execution_options(tollway_write=True)
            if self.is_sqlite:
                await conn.execute(sa.text("SELECT 1"))
            else:
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            await conn.run_sync(_upgrade)
            await conn.commit()

    async def migrations_current(self) -> bool:
        async with self.read() as conn:
            return await conn.run_sync(_is_current)

    async def close(self) -> None:
        await self.engine.dispose()
        if self._aside is not None:
            await self._aside.dispose()
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


async def retry_while_unavailable(op: Callable[[], Awaitable[T]], *, within: float,
                                  first_delay: float = 0.05, max_delay: float = 1.0) -> T:
    """Run an idempotent storage operation until it stops raising ServiceUnavailable,
    backing off, for at most `within` seconds; then the last 503 propagates.

    For writes that must not be dropped because the database restarted under them, such
    as settling a request whose answer the customer already has."""
    deadline = time.monotonic() + within
    delay = first_delay
    while True:
        try:
            return await op()
        except ServiceUnavailable:
            if time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)


def _from_asyncpg(dialect: Any, exc: Exception) -> Exception:
    """An asyncpg exception, or the adapter's DBAPI error that a failed pool checkout
    raises, as SQLAlchemy would have raised it, so `is_unavailable` and callers catching
    IntegrityError see one kind. The mapping is the adapter's own (a private SQLAlchemy
    method, which passes the adapter's errors through): written here again, it would
    drift from SQLAlchemy's."""
    dbapi = dialect.loaded_dbapi
    try:
        AsyncAdapt_asyncpg_connection._handle_exception_no_connection(dbapi, exc)
    except dbapi.Error as translated:
        error: Exception = sqlalchemy.exc.DBAPIError.instance(None, None, translated, dbapi.Error,
                                                              hide_parameters=True, dialect=dialect)
        return error
    except Exception as other:  # not a database error (OSError, a timeout): as it is
        return other
    return exc


def _pg_checkin(_dbapi_conn: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit BEGIN
    # would defer the write lock to the first write and break serialisation).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=10000")
    _switch_to_wal(cur)
    for pragma in (
        "synchronous=NORMAL",   # durable across process crashes; WAL fsyncs on checkpoint
        "foreign_keys=ON",
        "secure_delete=ON",     # deleted personal data is overwritten, not left in free pages
    ):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def _switch_to_wal(cur: Any) -> None:
    """WAL persists in the file, so this only changes anything on a new database. There,
    connections racing to switch it can get "database is locked" at once (SQLite does not
    wait on busy_timeout for that lock); one of them wins, the others retry. Only when
    several processes open a brand-new file together does this wait, for milliseconds."""
    for attempt in range(100):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.02)


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
