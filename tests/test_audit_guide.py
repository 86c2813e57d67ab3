"""docs/audit.md and SECURITY.md cannot go stale: everything they name exists, the line
counts are right, and each promise's marker selects exactly the tests the guide lists."""

from __future__ import annotations

import re
import subprocess
import sys

from tests import audit_guide
from tests.audit_guide import ROOT, SECURITY, definitions, promises

PROMISES = promises()


def test_the_guide_covers_every_promise_of_the_product() -> None:
    markers = [p.marker for p in PROMISES]
    assert markers == ["custody", "provider_key", "revocation", "overspend", "exactly_once", "webhooks",
                       "metadata_logs", "retention", "deletion"]
    assert [p.number for p in PROMISES] == list(range(1, len(PROMISES) + 1))
    for p in PROMISES:
        assert p.code and p.tests, p.marker


def test_every_function_the_guide_names_exists_with_about_its_length() -> None:
    for p in PROMISES:
        for file, name, stated in p.code:
            assert (ROOT / file).is_file(), f"{p.marker}: {file} does not exist"
            actual = definitions(ROOT / file).get(name)
            assert actual is not None, f"{p.marker}: {file} has no {name}"
            # A few lines of drift is fine; more means the guide's time budget is wrong
            # (`python3 tests/audit_guide.py --fix` rewrites the counts).
            assert abs(actual - stated) <= max(3, stated // 5), f"{file}::{name} is {actual} lines, guide says {stated}"


def test_every_test_the_guide_names_exists() -> None:
    for p in PROMISES:
        for file, name in p.tests:
            assert (ROOT / file).is_file(), f"{p.marker}: {file} does not exist"
            assert name in definitions(ROOT / file), f"{p.marker}: {file} has no {name}"


def test_the_guides_tables_add_up() -> None:
    text = audit_guide.GUIDE.read_text(encoding="utf-8")
    totals = re.search(r"<!-- totals -->\n(.*?)\n<!-- /totals -->", text, re.S)
    assert totals and totals[1] == audit_guide.totals_table(PROMISES)
    budget = re.search(r"<!-- budget -->\n(.*?)\n<!-- /budget -->", text, re.S)
    assert budget
    row = r"\| `([\w.]+)`[^|]*\| \d+ \| ([\d,]+) \|"
    stated = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(row, budget[1])}
    actual = {package: lines for package, _, lines in audit_guide.budget()}
    assert stated.keys() == actual.keys(), "a package is missing from the guide's budget table"
    for package, lines in actual.items():
        assert abs(lines - stated[package]) <= max(50, stated[package] // 10), (package, lines, stated[package])


def test_security_md_indexes_the_same_promises_and_names_only_what_exists() -> None:
    text = SECURITY.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`-m " in line]
    assert [re.search(r"`-m (\w+)`", r)[1] for r in rows] == [p.marker for p in PROMISES]  # type: ignore[index]
    for row in rows:
        for file, name in re.findall(r"`((?:src|tests)/[\w/]+\.py)::([\w.]+)`", row):
            assert name in definitions(ROOT / file), f"SECURITY.md: {file} has no {name}"


def test_a_marker_runs_exactly_the_tests_the_guide_lists() -> None:
    promise = next(p for p in PROMISES if p.marker == "exactly_once")
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", promise.marker, "-p",
                          "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    collected = {re.sub(r"\[.*\]$", "", line) for line in out.stdout.splitlines() if "::" in line}
    assert collected == {f"{file}::{name}" for file, name in promise.tests}


def test_the_ledger_docs_matrix_names_only_what_exists() -> None:
    text = (ROOT / "docs" / "ledger.md").read_text(encoding="utf-8")
    cells = re.findall(r"`((?:ledger|auth)/\w+\.py)::([\w.]+)`", text)
    assert len(cells) >= 12  # three paths x reserve, settle, crash recovery, sweep
    for file, name in cells:
        assert name in definitions(ROOT / "src" / "tollway" / file), f"docs/ledger.md: {file} has no {name}"
