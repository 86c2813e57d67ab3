"""Reads docs/audit.md (the reviewer's path) so tests and pytest markers follow it.

    python3 tests/audit_guide.py --budget   # lines per package, as the guide reports them
    python3 tests/audit_guide.py --fix      # rewrite the guide's line counts and tables

The guide names, per promise, a pytest marker, the code to read as `file::function` with
its length, and the tests that prove it. conftest.py registers each marker and puts it on
the tests the guide lists, so `./dev.sh test -m <marker>` runs exactly those tests;
tests/test_audit_guide.py checks that everything named exists. Standard library only.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "audit.md"
SECURITY = ROOT / "SECURITY.md"
SRC = ROOT / "src" / "tollway"

_SECTION = re.compile(r"^## (\d+)\. (.+?) \(`([a-z_]+)`\)\s*$")
_CODE_ROW = re.compile(r"^\| `(src/[^`:]+)::([A-Za-z_][\w.]*)` \| (\d+) \|\s*$")
_TEST_ROW = re.compile(r"^- `(tests/[^`:]+)::(test_\w+)`\s*$")


@dataclass
class Promise:
    number: int
    title: str
    marker: str
    code: list[tuple[str, str, int]] = field(default_factory=list)  # (file, qualified name, stated lines)
    tests: list[tuple[str, str]] = field(default_factory=list)      # (file, test function)


def promises(text: str | None = None) -> list[Promise]:
    found: list[Promise] = []
    for line in (GUIDE.read_text(encoding="utf-8") if text is None else text).splitlines():
        if m := _SECTION.match(line):
            found.append(Promise(int(m[1]), m[2], m[3]))
        elif found and (m := _CODE_ROW.match(line)):
            found[-1].code.append((m[1], m[2], int(m[3])))
        elif found and (m := _TEST_ROW.match(line)):
            found[-1].tests.append((m[1], m[2]))
    return found


def definitions(path: Path) -> dict[str, int]:
    """Qualified name (`f`, `Class`, `Class.method`) -> its length in lines."""
    out: dict[str, int] = {}

    def walk(nodes: list[ast.stmt], prefix: str) -> None:
        for n in nodes:
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                start = min([n.lineno, *(d.lineno for d in n.decorator_list)])
                out[prefix + n.name] = (n.end_lineno or n.lineno) - start + 1
                if isinstance(n, ast.ClassDef):
                    walk(n.body, prefix + n.name + ".")

    walk(ast.parse(path.read_text(encoding="utf-8")).body, "")
    return out


def markers_by_test() -> dict[tuple[str, str], list[str]]:
    """(test file, test function) -> the markers of the promises that list it."""
    out: dict[tuple[str, str], list[str]] = {}
    for p in promises():
        for t in p.tests:
            out.setdefault(t, []).append(p.marker)
    return out


def budget() -> list[tuple[str, int, int]]:
    """(package, modules, lines) for src/tollway, migrations left out."""
    rows: dict[str, list[int]] = {}
    for f in sorted(SRC.rglob("*.py")):
        if "migrations" in f.parts:
            continue
        rel = f.relative_to(SRC).parts
        package = "tollway" if len(rel) == 1 else f"tollway.{rel[0]}"
        entry = rows.setdefault(package, [0, 0])
        entry[0] += 1
        entry[1] += len(f.read_text(encoding="utf-8").splitlines())
    return [(k, v[0], v[1]) for k, v in sorted(rows.items())]


def budget_table() -> str:
    lines = ["| package | modules | lines |", "| --- | ---: | ---: |"]
    rows = budget()
    for package, modules, n in rows:
        label = f"`{package}` (top-level modules)" if package == "tollway" else f"`{package}`"
        lines.append(f"| {label} | {modules} | {n:,} |")
    lines.append(f"| **all** (without migrations) | {sum(r[1] for r in rows)} | {sum(r[2] for r in rows):,} |")
    return "\n".join(lines)


def test_lines(p: Promise) -> int:
    return sum(definitions(ROOT / f).get(name, 0) for f, name in p.tests)


def totals_table(found: list[Promise]) -> str:
    """Per promise: the code to read, and the tests that prove it, in lines. A test listed
    under two promises counts in the overall total once."""
    lines = ["| promise | code: functions | code: lines | tests | test lines | to read in all |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in found:
        code, tests = sum(c[2] for c in p.code), test_lines(p)
        lines.append(f"| {p.number}. {p.marker} | {len(p.code)} | {code:,} | {len(p.tests)} | {tests:,} "
                     f"| {code + tests:,} |")
    places = {c for p in found for c in p.code}
    code = sum(c[2] for c in places)
    unique_tests = {t for p in found for t in p.tests}
    tests = sum(definitions(ROOT / f).get(name, 0) for f, name in unique_tests)
    lines.append(f"| **all** (each place once) | {len(places)} | {code:,} "
                 f"| {len(unique_tests)} | {tests:,} | {code + tests:,} |")
    return "\n".join(lines)


def _replace_block(text: str, name: str, table: str) -> str:
    return re.sub(rf"(<!-- {name} -->\n).*?(\n<!-- /{name} -->)", lambda m: m[1] + table + m[2], text, flags=re.S)


def fix() -> None:
    """Rewrite the stated line counts from the code, then the budget and totals tables."""
    text = GUIDE.read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        if m := _CODE_ROW.match(line):
            n = definitions(ROOT / m[1]).get(m[2])
            if n is not None:
                line = f"| `{m[1]}::{m[2]}` | {n} |"
        out.append(line)
    text = "\n".join(out) + "\n"
    text = _replace_block(text, "budget", budget_table())
    text = _replace_block(text, "totals", totals_table(promises(text)))
    GUIDE.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if "--fix" in sys.argv[1:]:
        fix()
    print(budget_table())
