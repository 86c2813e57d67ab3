"""Compare the gateway's cost at two commits, side by side, in one run.

    python bench/compare.py --base HEAD~1              # this checkout vs HEAD~1
    python bench/compare.py --base main --rounds 7 --conns 1,32
    python bench/compare.py --base HEAD --base-python ../venv312/bin/python   # interpreters

On a shared machine the same code measures 30% apart from one run to the next, so
a before/after taken in two runs says little. This starts one nginx (upstream.py) and
two gateways, this checkout's and the one at --base (a temporary `git worktree`, run
with its own source first on PYTHONPATH, same interpreter and dependencies unless
--base-python names another), each on its own SQLite database with auth and billing
on, and alternates wrk runs between them (the order flips every round) so whatever
else loads the machine hits both alike.
Both gateways are restarted before every round: one process of the same code differs
from the next by up to ±10% in CPU per request (its memory layout, hash seeds, where
the scheduler puts it; an A/A run measured 0.90-1.05 with processes kept for the whole
run), so each round samples a new pair. Prints the median CPU per request, requests/s
and p99 latency of each, and the ratios, with each round's CPU ratio range beside them;
`--base HEAD` on a clean tree gives the noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway import MODEL_OF, Gateway, ScaleOut, write_bodies
from report import paired_ratio
from run import WRK_HINT, Bench
from upstream import ECHO_HINT, Nginx, has_echo_module

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1, main)")
    ap.add_argument("--rounds", type=int, default=5, help="runs per configuration and side; medians are reported")
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    ap.add_argument("--conns", default="1,32", help="connection counts, comma-separated")
    ap.add_argument("--kinds", default="json,sse", help="comma-separated: json, sse, tok (the stream one event "
                    "per write; needs nginx's echo module)")
    ap.add_argument("--base-python", default=sys.executable,
                    help="the interpreter the base side runs on, e.g. another venv's python with the same "
                    "dependencies: with --base HEAD, compares interpreters instead of commits")
    ap.add_argument("--scale-out", action="store_true",
                    help="each side on a throw-away PostgreSQL database (127.0.0.1:5432) + Redis (db 14)")
    ap.add_argument("--rate-limits", action="store_true",
                    help="this side with per-key rate limits on ([limits], never reached): their cost; the base "
                    "side runs without (a base from before [limits] existed refuses the table)")
    args = ap.parse_args()
    if "tok" in args.kinds.split(",") and not has_echo_module():
        print(ECHO_HINT, file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print(WRK_HINT, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tollway-compare-"))
    tree = workdir / "base-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.base], check=True)
    nginx = Nginx(workdir)
    gateways: dict[str, Gateway] = {}
    databases: list[ScaleOut] = []
    try:
        nginx.start()
        benches: dict[str, Bench] = {}
        for side in ("base", "this"):
            side_dir = workdir / side
            side_dir.mkdir()
            scale_out = None
            if args.scale_out:
                scale_out = ScaleOut()
                scale_out.create()
                databases.append(scale_out)
            gw = gateways[side] = Gateway(side_dir, nginx.port, scale_out,
                                          args.base_python if side == "base" else sys.executable,
                                          rate_limits=args.rate_limits and side == "this")
            if side == "base":
                gw.env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), gw.env.get("PYTHONPATH", "")])
            setup = gw.setup()
            gw.start()
            benches[side] = Bench(nginx, gw, setup.key, write_bodies(side_dir, MODEL_OF))
        kinds = args.kinds.split(",")
        configs = [(conns, kind) for conns in (int(c) for c in args.conns.split(",")) for kind in kinds]
        cpu: dict[tuple[int, str, str], list[float]] = {}
        rps: dict[tuple[int, str, str], list[float]] = {}
        p99: dict[tuple[int, str, str], list[float]] = {}
        on = f" on {args.base_python}" if args.base_python != sys.executable else ""
        print(f"base = {args.base}{on}, this = the working tree; {args.rounds} rounds x {args.duration} s per side and "
              f"configuration, both gateways restarted every round; "
              f"{'PostgreSQL + Redis' if args.scale_out else 'SQLite + memory'}"
              f"{'; rate limits on this side' if args.rate_limits else ''}", flush=True)
        for r in range(args.rounds):
            for side, bench in benches.items():
                if r:
                    gateways[side].stop()
                    gateways[side].start()
                for kind in kinds:  # warm-up: key cache, SQLite pages, connection pools
                    bench.wrk("gateway", kind, 4, 1, record=False)
            for conns, kind in configs:
                for side in (("base", "this") if r % 2 == 0 else ("this", "base")):
                    run = benches[side].wrk("gateway", kind, conns, args.duration, record=False)
                    if run.errors or run.cpu_ms_per_req is None:
                        raise RuntimeError(f"{side}: {run.errors} errors at {kind}/c{conns}")
                    cpu.setdefault((conns, kind, side), []).append(run.cpu_ms_per_req)
                    rps.setdefault((conns, kind, side), []).append(run.rps)
                    p99.setdefault((conns, kind, side), []).append(run.p99_ms)
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        print(f"\n  {'body':<5}{'conns':>5}  {'CPU ms/req base':>16}{'this':>8}{'ratio':>8}{'per round':>18}"
              f"  {'req/s base':>11}{'this':>8}{'ratio':>8}  {'p99 ms base':>12}{'this':>8}")
        for conns, kind in configs:
            c, q, t = ({s: statistics.median(m[(conns, kind, s)]) for s in ("base", "this")} for m in (cpu, rps, p99))
            mid, lo, hi = paired_ratio(cpu[(conns, kind, "base")], cpu[(conns, kind, "this")])
            print(f"  {kind:<5}{conns:>5}  {c['base']:>16.3f}{c['this']:>8.3f}{c['this'] / c['base']:>8.2f}"
                  f"{f'{mid:.2f} ({lo:.2f}-{hi:.2f})':>18}"
                  f"  {q['base']:>11.0f}{q['this']:>8.0f}{q['this'] / q['base']:>8.2f}"
                  f"  {t['base']:>12.2f}{t['this']:>8.2f}", flush=True)
        print("  per round: the CPU ratio of each round's pair, median (lowest-highest); a range that "
              "straddles 1.00 is noise")
        return 0
    finally:
        for gw in gateways.values():
            gw.stop()
        nginx.stop()
        for db in databases:
            db.drop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
