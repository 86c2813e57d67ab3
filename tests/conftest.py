"""Test factories.

* `backend` runs a test on the embedded default (SQLite + memory cache) and on the
  scale-out stack (PostgreSQL + Redis). When PostgreSQL or Redis is not reachable the
  scale-out variant is skipped with the reason; with TOLLWAY_REQUIRE_SERVICES=1 (CI) it
  fails instead, so nothing is skipped silently there.
* `make_config(**sections)` writes a real tollway.toml into the test's folder.
* `serve_app(app)` runs any ASGI app under uvicorn on a loopback port in its own thread
  (streaming, stalls and disconnects need a real server, not an in-process client).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn

from tollway import config as config_mod

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = os.environ.get("TOLLWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TOLLWAY_TEST_REDIS", "redis://127.0.0.1:6379/9")
REQUIRE_SERVICES = os.environ.get("TOLLWAY_REQUIRE_SERVICES") == "1"
T = TypeVar("T")

os.environ.setdefault("TOLLWAY_KEY_SECRET", "test-key-secret-" + "x" * 16)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    msg = f"{name} is not reachable on {host}:{port} (see README: Running the tests)"
    if REQUIRE_SERVICES:
        pytest.fail(msg + "; TOLLWAY_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(msg)


def need_postgres() -> None:
    need_service("PostgreSQL", PG_HOST, PG_PORT)


def need_redis() -> None:
    need_service("Redis", "127.0.0.1", 6379)


# --- PostgreSQL: one fresh database per test ----------------------------------------------
#
# Each test gets its own database, copied from a migrated template (CREATE DATABASE ...
# TEMPLATE copies files: cheaper than running the migrations again). The template's name
# carries a hash of the migration files, so editing a migration builds a new one. Several
# pytest runs may share the server: a template is built under a random name and renamed
# into place, so a half-built one is never copied.


def run_aside(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on its own loop in another thread, so sync helpers
    work from sync fixtures and from inside a running test loop alike."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _pg_run(*statements: str, url: str = PG_ADMIN_URL) -> list[Any]:
    """Run statements on one admin connection."""
    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return [await conn.fetch(sql) for sql in statements]
        finally:
            await conn.close()

    return run_aside(run())


def _pg_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _migrations_digest() -> str:
    import hashlib

    from tollway.store.db import MIGRATIONS

    h = hashlib.sha256()
    for f in sorted([MIGRATIONS / "env.py", *(MIGRATIONS / "versions").glob("*.py")]):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


_template_name: str | None = None


def pg_template() -> str:
    """The migrated template database for this checkout's migrations, built once."""
    global _template_name
    if _template_name is not None:
        return _template_name
    from tollway.store.db import Store

    name = "tollway_tpl_" + _migrations_digest()
    exists = _pg_run(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")[0]
    if not exists:
        building = f"{name}_{secrets.token_hex(4)}"
        _pg_run(f'CREATE DATABASE "{building}"')

        async def migrate() -> None:
            store = Store(_pg_url(building))
            try:
                await store.migrate()
            finally:
                await store.close()

        try:
            run_aside(migrate())
            # Nobody may connect to a template while it is copied.
            _pg_run(f'ALTER DATABASE "{building}" WITH ALLOW_CONNECTIONS false',
                    f'ALTER DATABASE "{building}" RENAME TO "{name}"')
        except Exception:
            if not _pg_run(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")[0]:
                raise  # not a lost race with another test run: a real failure
        finally:
            with contextlib.suppress(Exception):
                _pg_run(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)')
        # Templates of earlier migration files are of no further use (each is ~8 MB).
        for row in _pg_run("SELECT datname FROM pg_database WHERE datname LIKE 'tollway\\_tpl\\_%'")[0]:
            if row["datname"] != name and len(row["datname"]) == len(name):
                with contextlib.suppress(Exception):
                    _pg_run(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    _template_name = name
    return name


@contextlib.contextmanager
def fresh_pg_database(migrated: bool = True) -> Iterator[str]:
    """A new database, dropped afterwards; migrated to head unless migrated=False."""
    need_postgres()
    global _template_name
    name = "tollway_t_" + secrets.token_hex(6)
    template = pg_template() if migrated else "template0"
    try:
        _pg_run(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    except Exception as exc:
        # A concurrent run of a checkout with other migrations dropped our template: build it again.
        if not migrated or "does not exist" not in str(exc):
            raise
        _template_name = None
        _pg_run(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template()}"')
    try:
        yield _pg_url(name)
    finally:
        with contextlib.suppress(Exception):
            _pg_run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis() -> None:
    need_redis()
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    r.close()


# --- backends ---------------------------------------------------------------------------


@pytest.fixture(params=["embedded", "scaleout"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """{"database": {...}, "cache": {...}} for the two supported stacks."""
    if request.param == "embedded":
        yield {"database": {"url": f"sqlite:///{tmp_path / 'tollway.db'}"}, "cache": {"url": "memory://"}}
        return
    need_redis()
    # Redis is not flushed: other test runs may share it, and every cache key a test
    # writes derives from random keys and ids, so tests cannot see each other's entries.
    with fresh_pg_database() as url:
        yield {"database": {"url": url}, "cache": {"url": REDIS_URL}}


@pytest.fixture
def embedded(tmp_path: Path) -> dict[str, Any]:
    return {"database": {"url": f"sqlite:///{tmp_path / 'tollway.db'}"}, "cache": {"url": "memory://"}}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, body in data.items():
        if section == "providers":
            for name, table in body.items():
                lines.append(f"[providers.{name}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        elif section == "models":
            for table in body:
                lines.append("[[models]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)


DEMO_MODELS = {
    "providers": {"echo": {"type": "echo"}},
    "models": [{"id": "demo/echo", "provider": "echo", "upstream": "echo-1",
                "input_usd_per_mtok": "1.00", "output_usd_per_mtok": "2.00"}],
}


@pytest.fixture
def make_config(tmp_path: Path, embedded: dict[str, Any]) -> Callable[..., config_mod.Config]:
    """make_config(database=..., providers=..., models=..., server=...) -> Config from a real file.
    Sections given replace the defaults whole; the default stack is embedded."""

    def make(**sections: Any) -> config_mod.Config:
        data: dict[str, Any] = {**embedded, **DEMO_MODELS}
        data.update(sections)
        path = tmp_path / f"tollway-{secrets.token_hex(3)}.toml"
        path.write_text(to_toml(data), encoding="utf-8")
        return config_mod.load(path)

    return make


# --- running servers on loopback -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """An ASGI app under uvicorn in its own thread and event loop."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                     access_log=False, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(self.config)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        serve = self.server.serve

        async def serve_here(*args: Any, **kwargs: Any) -> None:
            self.loop = asyncio.get_running_loop()
            await serve(*args, **kwargs)

        self.server.serve = serve_here  # type: ignore[method-assign]
        self.server.run()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's own event loop (what the app's objects belong to)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve_app(request: pytest.FixtureRequest) -> Iterator[Callable[[Any], ServerThread]]:
    # Servers stop before the test's database is dropped: fixtures are torn down in the
    # reverse order of set-up, so the backend must be set up first.
    if "backend" in request.fixturenames:
        request.getfixturevalue("backend")
    started: list[ServerThread] = []

    def serve(app: Any) -> ServerThread:
        s = ServerThread(app).start()
        started.append(s)
        return s

    yield serve
    for s in reversed(started):
        s.stop()


@pytest.fixture
def launch(make_config: Callable[..., config_mod.Config], serve_app: Callable[[Any], ServerThread]
           ) -> Iterator[Callable[..., Any]]:
    """launch(upstream_url, **config sections) -> a Gateway (tests/fakes/harness.py) serving on loopback."""
    from tests.fakes.harness import launcher  # the harness imports the app; most tests need neither

    yield from launcher(make_config, serve_app)
