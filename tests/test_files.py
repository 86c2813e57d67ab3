"""The embedded database on disk: owner-only modes for the file and its -wal and -shm
(names, e-mails and client IPs live there), and one serving lock per real file however
the path to it is spelled."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tollway.app import create_app
from tollway.config import Config
from tollway.ledger.holds import DatabaseInUse
from tollway.services import build


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The common default: files created 0644 unless the creator asks for less."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
async def test_database_wal_and_shm_are_created_owner_only(make_config: Callable[..., Config], tmp_path: Path) -> None:
    db = tmp_path / "private" / "tollway.db"
    db.parent.mkdir()
    cfg = make_config(database={"url": f"sqlite:///{db}"})
    svc = build(cfg)
    try:
        await svc.store.migrate()
        await svc.tenants.create("Ada", "ada@example.com")
        files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        await svc.close()


@pytest.mark.usefixtures("open_umask")
async def test_existing_database_files_readable_by_others_are_tightened(make_config: Callable[..., Config],
                                                                        tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    cfg = make_config(database={"url": f"sqlite:///{db}"})
    svc = build(cfg)
    await svc.store.migrate()
    await svc.tenants.create("Ada", None)
    await svc.close()
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        f.touch()  # SQLite removed the -wal and -shm at close; a crash leaves them behind
        f.chmod(0o644)
    svc = build(cfg)
    try:
        await svc.tenants.create("Bo", None)
        for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert mode(f) == 0o600, f.name
    finally:
        await svc.close()


async def test_serving_lock_follows_symlinks_to_the_real_file(make_config: Callable[..., Config],
                                                              tmp_path: Path) -> None:
    real = tmp_path / "data" / "tollway.db"
    real.parent.mkdir()
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "linked.db").symlink_to(real)
    (tmp_path / "dirlink").symlink_to(real.parent)

    def app(path: Path) -> Any:
        return create_app(make_config(database={"url": f"sqlite:///{path}"}), provider_keys={}, migrate=True)

    first = app(real)
    async with first.router.lifespan_context(first):
        for other in (elsewhere / "linked.db", tmp_path / "dirlink" / "tollway.db"):
            second = app(other)
            with pytest.raises(DatabaseInUse):
                async with second.router.lifespan_context(second):
                    pass
