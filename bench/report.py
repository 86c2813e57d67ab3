"""Medians, the table, and the targets of bench/run.py."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from upstream import chat_sse_events

# The targets, on a 2-core machine with one gateway worker.
TARGETS = {"cpu_ms_json": 0.5, "cpu_ms_sse": 1.0, "added_p50_ms": 1.0, "rps_32": 2000.0, "rss_mb": 150.0}
STREAM_EVENTS = len(chat_sse_events())
SERVERS = ("gateway", "floor")  # targets whose own process CPU is measured (direct: nginx alone)


@dataclass
class Run:
    """One wrk invocation, with the CPU the server under test and nginx spent during it."""

    target: str  # "direct", "gateway" or "floor"
    kind: str  # "json", "sse" or "tok" (the same stream, one event per write)
    conns: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float | None = None  # the gateway's or the floor's utime + stime
    nginx_cpu_s: float = 0.0

    @property
    def cpu_ms_per_req(self) -> float | None:
        return None if self.cpu_s is None else 1000 * self.cpu_s / max(self.requests, 1)


def summarise(runs: list[Run], rss: list[tuple[int, int]]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for conns in (1, 32):
        for kind in ("json", "sse", "tok"):
            for target in ("direct", "floor", "gateway"):
                sel = [r for r in runs if (r.target, r.kind, r.conns) == (target, kind, conns)]
                if not sel:
                    continue
                cpus = [r.cpu_ms_per_req for r in sel if r.cpu_ms_per_req is not None]
                rows.append({
                    "target": target, "kind": kind, "conns": conns, "repeats": len(sel),
                    "requests": sum(r.requests for r in sel), "errors": sum(r.errors for r in sel),
                    "rps": statistics.median(r.rps for r in sel),
                    "p50_ms": statistics.median(r.p50_ms for r in sel),
                    "p99_ms": statistics.median(r.p99_ms for r in sel),
                    "cpu_ms_per_req": statistics.median(cpus) if cpus else None,
                    "nginx_cpu_us_per_req": 1e6 * statistics.median(r.nginx_cpu_s / max(r.requests, 1) for r in sel),
                })
    return {"rows": rows, "rss": rss}


def find(summary: dict[str, Any], target: str, kind: str, conns: int) -> dict[str, Any] | None:
    return next((r for r in summary["rows"] if (r["target"], r["kind"], r["conns"]) == (target, kind, conns)), None)


def table(summary: dict[str, Any]) -> None:
    print("\n  target   body conns      req/s   p50 ms   p99 ms  CPU ms/req  nginx CPU us/req  errors")
    for r in summary["rows"]:
        cpu = f"{r['cpu_ms_per_req']:.3f}" if r["cpu_ms_per_req"] is not None else "-"
        print(f"  {r['target']:<8} {r['kind']:<4} {r['conns']:>5} {r['rps']:>10.0f} {r['p50_ms']:>8.3f} "
              f"{r['p99_ms']:>8.3f} {cpu:>11} {r['nginx_cpu_us_per_req']:>17.1f} {r['errors']:>7}")
    print("  (CPU ms/req: the gateway's or the floor's own process; floor = bare uvicorn + aiohttp forwarder)")


def rss_lines(rss: list[tuple[int, int]]) -> None:
    first, last = rss[0], rss[-1]
    mid = next((s for s in rss if s[0] >= last[0] / 2), last)
    print(f"\n  gateway RSS: {first[1] / 2**20:.1f} MB after {first[0]} requests (warm-up), "
          f"{last[1] / 2**20:.1f} MB after {last[0]} requests; "
          f"{(last[1] - mid[1]) / 2**20:+.1f} MB over the second half ({mid[0]} -> {last[0]})")
    step = max(1, len(rss) // 12)
    print("  samples (requests: MB): " + ", ".join(f"{n}: {b / 2**20:.1f}" for n, b in rss[::step]))


def targets(summary: dict[str, Any]) -> list[str]:
    """Prints each target with the measured value; returns the ones missed."""
    checks: list[tuple[str, float, float, bool]] = []  # (what, measured, limit, lower is better)
    for kind, limit in (("json", TARGETS["cpu_ms_json"]), ("sse", TARGETS["cpu_ms_sse"])):
        cpus = [r["cpu_ms_per_req"] for c in (1, 32) if (r := find(summary, "gateway", kind, c))]
        if cpus:
            checks.append((f"gateway CPU per {kind} request, ms (median over its runs at 1 and 32 connections: "
                           + ", ".join(f"{c:.3f}" for c in cpus) + ")", statistics.median(cpus), limit, True))
    for kind in ("json", "sse"):
        g, d = find(summary, "gateway", kind, 1), find(summary, "direct", kind, 1)
        if g and d:
            checks.append((f"p50 latency added over direct at 1 connection, {kind}, ms", g["p50_ms"] - d["p50_ms"],
                           TARGETS["added_p50_ms"], True))
    for kind in ("json", "sse"):
        if g := find(summary, "gateway", kind, 32):
            checks.append((f"gateway requests/s at 32 connections, {kind}", g["rps"], TARGETS["rps_32"], False))
    rss = summary["rss"]
    if rss:
        checks.append((f"gateway RSS after {rss[-1][0]} requests, MB", rss[-1][1] / 2**20, TARGETS["rss_mb"], True))
    token_by_token(summary)
    print("\n  targets (this machine, one worker):")
    missed = []
    for what, value, limit, lower in checks:
        ok = value <= limit if lower else value >= limit
        print(f"  [{'ok' if ok else 'MISS'}] {what}: {value:.3f} ({'<=' if lower else '>='} {limit:g})")
        if not ok:
            missed.append(what)
    return missed


def token_by_token(summary: dict[str, Any]) -> None:
    """What the same stream costs when each event comes in a read of its own, as from a
    provider streaming token by token: shown beside the targets, which the issue sets for
    fixed bodies."""
    lines = []
    for conns in (1, 32):
        tok, sse = find(summary, "gateway", "tok", conns), find(summary, "gateway", "sse", conns)
        if tok and sse and tok["cpu_ms_per_req"] is not None and sse["cpu_ms_per_req"] is not None:
            extra = 1000 * (tok["cpu_ms_per_req"] - sse["cpu_ms_per_req"]) / (STREAM_EVENTS - 1)
            lines.append(f"{tok['cpu_ms_per_req']:.3f} ms per streamed request at {conns} connection(s) "
                         f"({sse['cpu_ms_per_req']:.3f} in one write; {extra:+.1f} us per event read apart)")
    if lines:
        print(f"\n  the stream token by token ({STREAM_EVENTS} events, one write each; not a target):")
        for line in lines:
            print(f"    {line}")


def paired_ratio(base: list[float], this: list[float]) -> tuple[float, float, float]:
    """this / base per round (the two sides of a round ran back to back, so whatever else
    loaded the machine then hit both): the median ratio and the lowest and highest.

    Why not only the ratio of the medians: it cannot say whether a difference is more
    than the noise; a range that straddles 1.00 says it is not."""
    if len(base) != len(this) or not base:
        raise ValueError("one value per round on each side")
    ratios = [t / b for b, t in zip(base, this, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def billing_lines(billing: dict[str, Any], completed: int, in_flight_bound: int) -> bool:
    """The ledger after the run; False when it does not add up."""
    verify = billing["ledger_verify"]
    verified = isinstance(verify, dict) and bool(verify.get("ok"))
    reserved = billing["wallet"].get("reserved_micros")
    rows = sum(u["count"] for u in billing["usage"])
    # 499 = a stream whose client (wrk, at the end of a run) went away: settled, not failed.
    cut = sum(u["count"] for u in billing["usage"] if u["status"] == 499)
    failed = sum(u["count"] for u in billing["usage"] if u["status"] not in (200, 499) or
                 (u["status"] == 200 and u["estimated"]))
    print(f"\n  billing: ledger verify {'ok' if verified else verify}; {billing['wallet'].get('balance_usd')} USD "
          f"left, {billing['wallet'].get('reserved_usd')} still reserved")
    for u in billing["usage"]:
        print(f"    {u['model']:<10} status {u['status']} estimated={u['estimated']!s:<5} {u['count']:>7} usage rows, "
              f"{u['cost_micros']} micro-USD")
    # wrk stops with requests in flight: the gateway finishes (and bills) those after wrk
    # stopped counting, at most one per connection per run.
    print(f"    {rows} usage rows for {completed} responses wrk counted (+ at most {in_flight_bound} in flight "
          f"when a wrk run ended)")
    ok = (verified and reserved == 0 and failed == 0 and cut <= in_flight_bound
          and completed <= rows <= completed + in_flight_bound)
    if not ok:
        print("  ! billing does not add up (failed or estimated requests, open reservations, or missing rows)")
    return ok
