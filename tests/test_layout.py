"""The package's shape, which the audit guide relies on: no import cycles anywhere, and each
promise's package opens with a map of its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import tollway

SRC = Path(tollway.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the tollway modules it imports, counting every import statement (those
    inside functions and under TYPE_CHECKING too: a cycle hidden there is still a cycle
    for a reader)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py") if "migrations" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from tollway.ledger import postgres` imports a module; `from x import Name` a name in x.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "tollway.webhooks.stripe" in graph["tollway.services"]  # imported inside build()
    assert "tollway.ledger.postgres" in graph["tollway.ledger.transactions"]  # `from package import module`


def test_the_money_rules_do_not_depend_on_the_request_path_or_auth() -> None:
    graph = import_graph()
    for module in (m for m in graph if m.startswith("tollway.ledger")):
        outside = ("tollway.proxy", "tollway.auth", "tollway.providers")
        assert not {t for t in graph[module] if t.startswith(outside)}, module


def test_each_promise_package_opens_with_its_map() -> None:
    """A package's docstring names every module of the package (its reading order)."""
    for package in ("ledger", "auth", "dashboard"):
        doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text())) or ""
        modules = sorted(p.name for p in (SRC / package).glob("*.py") if p.name != "__init__.py")
        assert modules, package
        for m in modules:
            assert m in doc, f"{package}/__init__.py does not name {m}"
