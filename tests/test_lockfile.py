"""requirements.lock, the production install's exact versions with hashes, stays in step
with pyproject.toml (docs/operations.md: Installing for production)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, its sha256 hashes)."""
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    out: dict[str, tuple[Version, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            out[canonicalize_name(m[1])] = (Version(m[2]), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return out


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_every_direct_dependency_is_pinned_within_its_range() -> None:
    lock = locked()
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"requirements.lock misses {req.name}"
        assert req.specifier.contains(lock[name][0], prereleases=True), f"{req.name}=={lock[name][0]} not in {req}"


def test_every_pin_carries_hashes() -> None:
    lock = locked()
    assert len(lock) > len(runtime_requirements())  # transitive dependencies are pinned too
    for name, (_, hashes) in lock.items():
        assert hashes, f"{name} has no --hash"


def test_the_transitive_closure_is_locked() -> None:
    """Every runtime dependency's own requirements (as the installed distributions declare
    them, extras named in pyproject included) is in the lock: nothing is left for pip to
    resolve at install time."""
    lock = locked()
    todo = [(canonicalize_name(r.name), set(r.extras)) for r in runtime_requirements()]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        assert name in lock, f"requirements.lock misses {name}"
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((canonicalize_name(req.name), set(req.extras)))


def test_no_development_tool_is_in_the_production_lock() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dev_only = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}
    runtime = {canonicalize_name(r.name) for r in runtime_requirements()}
    assert not (dev_only - runtime) & set(locked())
