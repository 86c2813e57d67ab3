"""The gateway under test: `tollway serve` (one worker, SQLite + memory cache) in a
subprocess, set up through the CLI like an operator would, and read from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upstream import free_port, wait_port

PROVIDER_KEY_ENV = "BENCH_PROVIDER_KEY"
JSON_MODEL = "bench/json"
SSE_MODEL = "bench/sse"
TOK_MODEL = "bench/tok"  # the same stream, one event per write (upstream.py)
MODEL_OF = {"json": JSON_MODEL, "sse": SSE_MODEL, "tok": TOK_MODEL}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/<pid>/statm (pages -> bytes)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


# Rate limits on, so high that the load never meets them: what checking them costs.
RATE_LIMITS = """
[limits]
requests_per_minute = 1000000000
tokens_per_minute = 1000000000
"""


def render_config(workdir: Path, port: int, upstream_port: int, database_url: str | None = None,
                  cache_url: str = "memory://", rate_limits: bool = False) -> str:
    base = f"http://127.0.0.1:{upstream_port}"
    return (RATE_LIMITS if rate_limits else "") + f"""
[server]
host = "127.0.0.1"
port = {port}

[database]
url = "{database_url or f'sqlite:///{workdir}/bench.db'}"

[cache]
url = "{cache_url}"

# On, as a Cloudflare AI Gateway user would run it: one more header per upstream call.
[attribution]
header = "cf-aig-metadata"

[providers.nginx_json]
type = "openai"
base_url = "{base}/json/v1"
api_key_env = "{PROVIDER_KEY_ENV}"

[providers.nginx_sse]
type = "openai"
base_url = "{base}/sse/v1"
api_key_env = "{PROVIDER_KEY_ENV}"

[providers.nginx_tok]
type = "openai"
base_url = "{base}/tok/v1"
api_key_env = "{PROVIDER_KEY_ENV}"

[[models]]
id = "{JSON_MODEL}"
provider = "nginx_json"
upstream = "bench-upstream-model"
input_usd_per_mtok = "0.27"
output_usd_per_mtok = "1.10"

[[models]]
id = "{SSE_MODEL}"
provider = "nginx_sse"
upstream = "bench-upstream-model"
input_usd_per_mtok = "0.27"
output_usd_per_mtok = "1.10"

[[models]]
id = "{TOK_MODEL}"
provider = "nginx_tok"
upstream = "bench-upstream-model"
input_usd_per_mtok = "0.27"
output_usd_per_mtok = "1.10"
"""


def write_bodies(folder: Path, kinds: Iterable[str]) -> dict[str, Path]:
    """The request body wrk sends for each kind (json, sse, tok), written into `folder`."""
    bodies = {kind: folder / f"body-{kind}.json" for kind in kinds}
    for kind, path in bodies.items():
        path.write_bytes(request_body(MODEL_OF[kind], stream=kind != "json"))
    return bodies


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "max_tokens": 64, "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello in one short sentence."}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


@dataclass
class Setup:
    tenant_id: str
    key: str


class ScaleOut:
    """A throw-away database on the local PostgreSQL, and a Redis db index, for
    `run.py --scale-out`: the gateway's other storage stack, measured the same way."""

    ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
    REDIS_URL = "redis://127.0.0.1:6379/14"  # the tests use other indexes

    def __init__(self) -> None:
        self.name = "tollway_bench_" + os.urandom(4).hex()
        self.url = self.ADMIN_URL.rsplit("/", 1)[0] + "/" + self.name

    @staticmethod
    def _run(url: str, sql: str) -> list[Any]:
        import asyncpg

        async def run() -> list[Any]:
            conn = await asyncpg.connect(url)
            try:
                return list(await conn.fetch(sql))
            finally:
                await conn.close()

        return asyncio.run(run())

    def create(self) -> None:
        self._run(self.ADMIN_URL, f'CREATE DATABASE "{self.name}"')

    def usage(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._run(self.url, _USAGE_SQL)]

    def drop(self) -> None:
        self._run(self.ADMIN_URL, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


_USAGE_SQL = ("SELECT model, status, estimated, count(*), sum(cost_micros) FROM usage_events "
              "GROUP BY model, status, estimated ORDER BY model, status, estimated")


class Gateway:
    def __init__(self, workdir: Path, upstream_port: int, scale_out: ScaleOut | None = None,
                 python: str = sys.executable, rate_limits: bool = False) -> None:
        self.workdir = workdir
        self.python = python  # the interpreter (and so the installed dependencies) it runs on
        self.port = free_port()
        self.scale_out = scale_out
        self.config = workdir / "tollway.toml"
        self.config.write_text(render_config(workdir, self.port, upstream_port,
                                             scale_out.url if scale_out else None,
                                             scale_out.REDIS_URL if scale_out else "memory://", rate_limits))
        self.log_path = workdir / "gateway.log"
        # A clean environment: nothing of the caller's Tollway settings leaks in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLWAY_", "PROMETHEUS_"))}
        self.env[PROVIDER_KEY_ENV] = "sk-bench-" + os.urandom(12).hex()
        if scale_out:  # PostgreSQL needs the key secret from the environment (no file next to a database)
            self.env["TOLLWAY_KEY_SECRET"] = os.urandom(24).hex()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> dict[str, Any]:
        cmd = [self.python, "-m", "tollway", *args, "--config", str(self.config), "--json"]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"tollway {' '.join(args[:2])} failed: {done.stderr.strip()}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def setup(self) -> Setup:
        """A tenant, a key and a wallet large enough for any run (1,000,000 USD)."""
        if self.scale_out:
            self.cli("migrate")
        tenant = self.cli("tenants", "create", "--name", "bench")["tenant_id"]
        key = self.cli("keys", "create", "--tenant", tenant, "--name", "bench")["key"]
        self.cli("wallet", "credit", "--tenant", tenant, "--amount", "1000000.00", "--reference", "bench")
        return Setup(tenant, key)

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "tollway", "serve", "--config", str(self.config), "--workers", "1"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "tollway serve")
        with urllib.request.urlopen(f"{self.url}/readyz", timeout=10) as resp:
            if resp.status != 200:
                raise RuntimeError(f"gateway not ready: HTTP {resp.status}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the lifespan closes the store
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def billing_summary(self, tenant_id: str) -> dict[str, Any]:
        """After stop: what the ledger says about the run (read-only)."""
        wallet = self.cli("wallet", "show", "--tenant", tenant_id)
        verify = subprocess.run([self.python, "-m", "tollway", "ledger", "verify", "--config", str(self.config),
                                 "--json"], env=self.env, capture_output=True, text=True, check=False, timeout=120)
        if self.scale_out:
            rows = self.scale_out.usage()
        else:
            db = sqlite3.connect(f"file:{self.workdir / 'bench.db'}?mode=ro", uri=True)
            try:
                rows = db.execute(_USAGE_SQL).fetchall()
            finally:
                db.close()
        return {"wallet": wallet, "ledger_verify": json.loads(verify.stdout) if verify.stdout else verify.stderr,
                "usage": [{"model": m, "status": s, "estimated": bool(e), "count": n, "cost_micros": c}
                          for m, s, e, n, c in rows]}
