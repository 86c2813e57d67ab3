"""Benchmark the /v1 proxy: gateway vs direct-to-upstream, with Debian's wrk and nginx.

    python bench/run.py                # full run, about 5 minutes
    python bench/run.py --quick        # a smoke run, about 1 minute (numbers are noisier)

Starts nginx (fixed JSON and SSE bodies) and `tollway serve` (one worker, SQLite +
memory cache, auth and billing on) on free 127.0.0.1 ports in a temp dir, then drives
POST /v1/chat/completions at 1 and 32 connections, non-streaming and streaming, through
the gateway and directly against nginx; also through the floor (a bare
uvicorn + aiohttp forwarder, floor.py). Every measurement is repeated and the median is
reported. CPU per request = (utime + stime of the server's process, from /proc/<pid>/stat,
after - before) / requests completed. The gateway's RSS is sampled after every run until
at least --soak-requests requests have gone through.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import report
from gateway import Gateway, ScaleOut, cpu_seconds, rss_bytes, write_bodies
from upstream import ECHO_HINT, Nginx, free_port, has_echo_module, wait_port

HERE = Path(__file__).resolve().parent
WRK_HINT = "wrk is not installed; on Debian/Ubuntu: sudo apt-get install -y wrk"


class Floor:
    """floor.py in a subprocess: what uvicorn + aiohttp cost with nothing else to do."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "floor.py"), "--port", str(self.port),
                                      "--upstream", f"http://127.0.0.1:{upstream_port}"])
        wait_port(self.port, self.proc, "floor.py")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Bench:
    nginx: Nginx
    gateway: Gateway
    key: str
    bodies: dict[str, Path]
    floor: Floor | None = None
    runs: list[report.Run] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (gateway requests so far, bytes)
    gateway_requests: int = 0
    in_flight_bound: int = 0  # requests wrk may have abandoned at the end of its gateway runs

    def url(self, target: str, kind: str) -> str:
        if target == "gateway":
            return f"{self.gateway.url}/v1/chat/completions"
        if target == "floor":
            assert self.floor is not None
            return f"http://127.0.0.1:{self.floor.port}/v1/chat/completions"
        return f"http://127.0.0.1:{self.nginx.port}/{kind}/v1/chat/completions"

    def wrk(self, target: str, kind: str, conns: int, seconds: int, record: bool = True) -> report.Run:
        env = dict(os.environ, BENCH_BODY_FILE=str(self.bodies[kind]),
                   BENCH_AUTH=self.key if target == "gateway" else "")
        # One wrk thread: on two cores, wrk, nginx and the server under test share the machine.
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "-s", str(HERE / "post.lua"),
               self.url(target, kind)]
        pid = self.gateway.pid if target == "gateway" else (self.floor.proc.pid if self.floor else None)
        nginx_pids = self.nginx.worker_pids()
        s0 = cpu_seconds(pid) if target != "direct" and pid else 0.0
        n0 = sum(cpu_seconds(p) for p in nginx_pids)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=seconds + 60)
        s1 = cpu_seconds(pid) if target != "direct" and pid else 0.0
        n1 = sum(cpu_seconds(p) for p in nginx_pids)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        r = json.loads(line.removeprefix("BENCH_RESULT "))
        errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["status_errors"] + r["timeouts"]
        run = report.Run(target, kind, conns, r["requests"], r["requests"] / (r["duration_us"] / 1e6),
                         r["p50_us"] / 1000, r["p99_us"] / 1000, errors,
                         cpu_s=(s1 - s0) if target != "direct" else None, nginx_cpu_s=n1 - n0)
        if target == "gateway":
            self.gateway_requests += run.requests
            self.in_flight_bound += conns
            self.rss.append((self.gateway_requests, rss_bytes(self.gateway.pid)))
        if record:
            self.runs.append(run)
            cpu = f"  CPU {run.cpu_ms_per_req:.3f} ms/req" if run.cpu_ms_per_req is not None else ""
            print(f"  {target:<8} {kind:<4} c{conns:<3} {run.rps:8.0f} req/s  p50 {run.p50_ms:8.3f} ms{cpu}",
                  flush=True)
        if errors:
            print(f"  ! {errors} errors in {target}/{kind}/c{conns}: {done.stdout.strip()}", file=sys.stderr)
        return run


def hold(bench: Bench) -> None:
    """Keep both servers up for manual load and profiling (e.g. py-spy record -p PID)."""
    print(f"gateway pid {bench.gateway.pid}, log {bench.gateway.log_path}")
    for kind in ("json", "sse"):
        print(f"  BENCH_BODY_FILE={bench.bodies[kind]} BENCH_AUTH=<key> wrk -t1 -c32 -d10s -s {HERE / 'post.lua'} "
              f"{bench.url('gateway', kind)}")
    key_file = bench.gateway.workdir / "customer-key"
    key_file.write_text(bench.key)
    key_file.chmod(0o600)
    print(f"  the customer key is in {key_file}; Ctrl-C (or SIGTERM to this pid, {os.getpid()}) stops both",
          flush=True)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    # A shell's background job ignores SIGINT; SIGTERM still ends the hold with a clean-up.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while bench.gateway.proc is not None and bench.gateway.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def measure(bench: Bench, args: argparse.Namespace) -> None:
    for kind in bench.bodies:  # warm-up: key cache, SQLite pages, connection pools
        bench.wrk("gateway", kind, 4, 2, record=False)
        bench.wrk("direct", kind, 4, 1, record=False)
    for conns in (1, 32):
        for kind in bench.bodies:
            for _ in range(args.repeat):
                # Interleaved, so load from other processes hits each target alike.
                for target in ("direct", "gateway", *(("floor",) if bench.floor else ())):
                    bench.wrk(target, kind, conns, args.duration)
    soak_end = time.monotonic() + args.soak_limit
    while bench.gateway_requests < args.soak_requests and time.monotonic() < soak_end:
        for kind in ("json", "sse"):
            bench.wrk("gateway", kind, 32, int(min(10, max(1, soak_end - time.monotonic()))), record=False)
    if bench.gateway_requests < args.soak_requests:
        print(f"  ! soak stopped at {bench.gateway_requests} requests (--soak-limit {args.soak_limit:g} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration; medians are reported")
    ap.add_argument("--soak-requests", type=int, default=100_000, help="gateway requests before the last RSS reading")
    ap.add_argument("--soak-limit", type=float, default=90.0, help="most seconds spent topping up the soak")
    ap.add_argument("--no-floor", action="store_true", help="skip the bare uvicorn + aiohttp forwarder")
    ap.add_argument("--scale-out", action="store_true",
                    help="PostgreSQL (a throw-away database on 127.0.0.1:5432) + Redis (127.0.0.1:6379/14) "
                         "instead of SQLite + memory")
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 repeat, 20k soak: a smoke test")
    ap.add_argument("--json-out", type=Path, help="also write every run and the summary to this file")
    ap.add_argument("--hold", action="store_true",
                    help="start nginx and the gateway, print how to drive and profile them, wait for Ctrl-C")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, gateway log, database)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.repeat, args.soak_requests, args.soak_limit = 2, 1, 20_000, 30.0
    if shutil.which("wrk") is None:
        print(WRK_HINT, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tollway-bench-"))
    started = time.monotonic()
    nginx = Nginx(workdir)
    gateway: Gateway | None = None
    floor: Floor | None = None
    scale_out = ScaleOut() if args.scale_out else None
    try:
        nginx.start()
        if scale_out:
            scale_out.create()
        gateway = Gateway(workdir, nginx.port, scale_out)
        setup = gateway.setup()
        gateway.start()
        kinds = ("json", "sse", "tok") if has_echo_module() else ("json", "sse")
        if "tok" not in kinds:
            print(f"  ! {ECHO_HINT}", file=sys.stderr)
        bench = Bench(nginx, gateway, setup.key, write_bodies(workdir, kinds))
        if args.hold:
            hold(bench)
            return 0
        if not args.no_floor:
            bench.floor = floor = Floor(nginx.port)
        print(f"nginx :{nginx.port}, gateway :{gateway.port} (pid {gateway.pid}, "
              f"{'PostgreSQL + Redis' if scale_out else 'SQLite + memory'})"
              + (f", floor :{floor.port}" if floor else "") + f"; {args.repeat} x {args.duration} s per configuration",
              flush=True)
        measure(bench, args)
        summary = report.summarise(bench.runs, bench.rss)
        log_bytes = gateway.log_path.stat().st_size
        gateway.stop()
        billing = gateway.billing_summary(setup.tenant_id)
        report.table(summary)
        report.rss_lines(bench.rss)
        missed = report.targets(summary)
        billed = report.billing_lines(billing, bench.gateway_requests, bench.in_flight_bound)
        print(f"\n  {bench.gateway_requests} gateway requests; gateway log "
              f"{log_bytes / max(bench.gateway_requests, 1):.0f} bytes/request; {time.monotonic() - started:.0f} s")
        if args.json_out:
            args.json_out.write_text(json.dumps({"runs": [asdict(r) for r in bench.runs], "summary": summary,
                                                 "billing": billing}, indent=2, default=str))
        return 1 if missed or not billed else 0
    finally:
        if floor is not None:
            floor.stop()
        if gateway is not None:
            gateway.stop()
        nginx.stop()
        if scale_out:
            scale_out.drop()
        if args.keep:
            print(f"  kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
