"""Scale-out acceptance: `tollway serve --workers 4` on PostgreSQL + Redis keeps the
guarantees of one process, through revocations, request bursts and service restarts.

One gateway (4 worker processes, a fresh database) serves the whole module; each test
brings its own tenant and keys. Every test needs PostgreSQL and Redis (skipped with the
reason locally, a failure in CI) and leaves both running, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import (
    DEMO_MODELS,
    REDIS_URL,
    REQUIRE_SERVICES,
    _reachable,
    free_port,
    fresh_pg_database,
    need_postgres,
    need_redis,
    run_aside,
    to_toml,
)
from tollway.auth.workers import STALE

pytestmark = pytest.mark.slow

TOKEN = "scaleout-admin-token-0123456789"
WORKERS = 4

# Prompt tokens free, output $100 per million (100 micro-USD a token). The echo upstream
# repeats the prompt, so 400 bytes with max_tokens=100 come back as exactly 100 tokens:
# the reservation (max_tokens x output price) equals the charge, one cent per request.
EXACT_MODEL = {"id": "load/exact", "provider": "echo", "upstream": "echo-1",
               "input_usd_per_mtok": "0", "output_usd_per_mtok": "100"}
EXACT_REQUEST = {"model": "load/exact", "max_tokens": 100, "messages": [{"role": "user", "content": "x" * 400}]}
EXACT_COST_MICROS = 10_000


# --- the gateway under test ---------------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    port: int
    db_url: str
    config: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(method, f"{self.url}/admin{path}", headers={"authorization": f"Bearer {TOKEN}"},
                          timeout=30, **kw)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def tenant_with_keys(self, usd: str, keys: int = 1) -> tuple[str, list[dict[str, Any]]]:
        tid = self.admin("POST", "/tenants", json={"name": "load"})["tenant_id"]
        if usd != "0":
            self.admin("POST", f"/tenants/{tid}/wallet/credit", json={"amount_usd": usd, "reference": "seed"})
        return tid, [self.admin("POST", f"/tenants/{tid}/keys", json={}) for _ in range(keys)]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tollway", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=60, env=gateway_env())

    def sql(self, query: str, *args: Any) -> list[Any]:
        async def run() -> list[Any]:
            conn = await asyncpg.connect(self.db_url)
            try:
                return list(await conn.fetch(query, *args))
            finally:
                await conn.close()

        return run_aside(run())

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def gateway_env() -> dict[str, str]:
    return {**os.environ, "TOLLWAY_ADMIN_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    need_postgres()
    need_redis()
    folder = tmp_path_factory.mktemp("scaleout")
    port = free_port()
    with fresh_pg_database() as db_url:
        config = folder / "tollway.toml"
        config.write_text(to_toml({
            "server": {"host": "127.0.0.1", "port": port},
            "database": {"url": db_url},
            "cache": {"url": REDIS_URL},
            "providers": DEMO_MODELS["providers"],
            "models": [*DEMO_MODELS["models"], EXACT_MODEL],
        }), encoding="utf-8")
        log = folder / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tollway", "serve", "--config", str(config), "--workers", str(WORKERS)],
                stdout=out, stderr=subprocess.STDOUT, env=gateway_env(), start_new_session=True)
        gw = Gateway(f"http://127.0.0.1:{port}", port, db_url, config, proc, log)
        try:
            _wait_until_serving(gw)
            yield gw
        finally:
            _stop(proc)


def _wait_until_serving(gw: Gateway) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise AssertionError(f"tollway serve exited with {gw.proc.returncode}:\n{gw.log_tail()}")
        registered = gw.sql("SELECT count(*) AS n FROM workers")[0]["n"]
        try:
            ready = httpx.get(gw.url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            ready = False
        if registered == WORKERS and ready:
            return
        time.sleep(0.2)
    raise AssertionError(f"{WORKERS} workers did not come up:\n{gw.log_tail()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session we started: uvicorn and its workers
            proc.wait(timeout=10)


# --- load: several connections, every request timed and recorded ------------------------------------


@dataclass
class Shot:
    start: float   # time.monotonic() just before the request was sent
    end: float
    key: int       # index of the key used
    status: int    # 0: no HTTP response at all
    body: Any
    request_id: str | None


@dataclass
class Load:
    gw: Gateway
    keys: list[str]
    path: str = "/v1/chat/completions"
    shots: list[Shot] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def request(self) -> dict[str, Any]:
        return {"model": "demo/echo", "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]}

    async def connection(self, key_index: int, pause: float = 0.0) -> None:
        """One keep-alive connection sending requests back to back until stopped."""
        headers = {"authorization": f"Bearer {self.keys[key_index]}"}
        async with httpx.AsyncClient(base_url=self.gw.url, timeout=30, headers=headers,
                                     limits=httpx.Limits(max_connections=1)) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    if self.path == "/v1/models":
                        r = await client.get(self.path)
                    else:
                        r = await client.post(self.path, json=self.request())
                    body = _json(r)
                    status, rid = r.status_code, r.headers.get("x-request-id")
                except httpx.TransportError as exc:
                    status, body, rid = 0, repr(exc), None
                self.shots.append(Shot(start, time.monotonic(), key_index, status, body, rid))
                if pause:
                    await asyncio.sleep(pause)

    def run(self, per_key: int, pause: float = 0.0) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.connection(k, pause)) for k in range(len(self.keys)) for _ in range(per_key)]

    async def until_each_key_answered(self, n: int, limit: float = 30.0) -> None:
        """Wait for n 200s per key: a loaded machine may need a while to warm 4 workers up."""
        deadline = time.monotonic() + limit
        while any(sum(s.key == k and s.status == 200 for s in self.shots) < n for k in range(len(self.keys))):
            assert time.monotonic() < deadline, f"keys not answered {n} times: {self.statuses()}"
            await asyncio.sleep(0.05)

    def statuses(self) -> Counter[int]:
        return Counter(s.status for s in self.shots)


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


def outage_summary(what: str, shots: list[Shot], down: float, up: float) -> str:
    """One line of measured numbers (shown with pytest -s, and on failure)."""
    failed = [s for s in shots if s.status != 200]
    last_failure = max((s.start for s in failed), default=down) - up
    slowest = max((s.end - s.start for s in shots), default=0.0)
    line = (f"{what}: {len(shots)} requests {dict(Counter(s.status for s in shots))}; down for {up - down:.2f}s; "
            f"last failed request started {last_failure:+.2f}s after it was back; slowest request {slowest:.2f}s")
    print(line)
    return line


def assert_openai_error(shot: Shot, status: int, code: str) -> None:
    assert shot.status == status, shot
    err = shot.body["error"]
    assert err["code"] == code and err["type"] and err["message"], shot.body


# --- revocation --------------------------------------------------------------------------------------


async def test_revoke_under_load_admits_nothing_after_it_returns(gateway: Gateway) -> None:
    """Three keys in use from 3 connections each, revoked one after another through the
    admin API (served by any of the 4 workers): any 200 whose request started after the
    revoke call returned is a failure."""
    _, created = gateway.tenant_with_keys("100.00", keys=3)
    load = Load(gateway, [k["key"] for k in created])
    tasks = load.run(per_key=3)
    sent: list[float] = []
    returned: list[float] = []
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"authorization": f"Bearer {TOKEN}"}) as admin:
        await load.until_each_key_answered(3)  # every key now sits in the shared verification cache
        for k in created:
            sent.append(time.monotonic())
            r = await admin.post(f"/admin/keys/{k['key_id']}/revoke")
            returned.append(time.monotonic())
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.4)
    await asyncio.sleep(0.3)
    load.stop.set()
    await asyncio.gather(*tasks)

    print(f"revoke under load: {len(load.shots)} requests {dict(load.statuses())}; revoke calls took "
          f"{', '.join(f'{(r - s) * 1000:.0f}ms' for s, r in zip(sent, returned, strict=True))}")
    for i, revoked_at in enumerate(returned):
        mine = [s for s in load.shots if s.key == i]
        before = [s for s in mine if s.end < revoked_at]
        after = [s for s in mine if s.start > revoked_at]
        assert sum(s.status == 200 for s in before) >= 3, Counter(s.status for s in before)
        assert len(after) >= 5, "the load loop must keep using the key after the revoke"
        admitted = [s for s in after if s.status != 401]
        assert not admitted, f"key {i}: {len(admitted)} requests admitted after revoke returned: {admitted[:3]}"
        for s in after:
            assert_openai_error(s, 401, "invalid_api_key")
    assert set(load.statuses()) <= {200, 401}, load.statuses()


# --- 200 concurrent requests against a wallet that covers 20 --------------------------------------


def connections_per_worker(gw: Gateway) -> Counter[int]:
    """Established client connections on the gateway port, by worker PID (from /proc):
    proof that a burst really was spread over the worker processes."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == gw.proc.pid:
            children.append(int(stat.parent.name))
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == gw.port and cols[3] == "01":
                established.add(cols[9])  # socket inode
    by_worker: Counter[int] = Counter()
    for pid in children:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in established:
                by_worker[pid] += 1
    return by_worker


# --- restarts under load ----------------------------------------------------------------------------


def _need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (needed to restart the service under test)"
        if REQUIRE_SERVICES:
            pytest.fail(msg + "; TOLLWAY_REQUIRE_SERVICES=1 forbids skipping")
        pytest.skip(msg)
    return path


def _wait(what: str, ok: Any, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _redis_answers() -> bool:
    done = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "ping"], capture_output=True, text=True)
    return done.stdout.strip() == "PONG"


def stop_redis() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    _wait("Redis to stop", lambda: not _reachable("127.0.0.1", 6379))


def start_redis() -> None:
    if not _redis_answers():
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
                        "--save", "", "--appendonly", "no"], check=True, capture_output=True)
    _wait("Redis to start", _redis_answers)


def _pg_cluster() -> list[str]:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir()) if Path("/etc/postgresql").is_dir() else []
    if not versions:
        pytest.skip("no local PostgreSQL cluster to restart (/etc/postgresql is empty)")
    return [versions[-1], "main"]


def restart_postgres(down_for: float) -> None:
    """Stop, stay down `down_for` seconds (longer than a worker may be silent before it is
    presumed dead), start again."""
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *_pg_cluster(), "stop", "--", "-m", "fast"],
                   check=True, capture_output=True, timeout=60)
    time.sleep(down_for)
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *_pg_cluster(), "start"],
                   check=True, capture_output=True, timeout=60)
    _wait("PostgreSQL to accept connections", lambda: _reachable("127.0.0.1", 5432))


def ensure_postgres() -> None:
    if not _reachable("127.0.0.1", 5432):
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *_pg_cluster(), "start"],
                       capture_output=True, timeout=60)
    _wait("PostgreSQL to accept connections", lambda: _reachable("127.0.0.1", 5432))


def debits_by_request(gw: Gateway, tenant_id: str) -> Counter[str]:
    rows = gw.sql("SELECT reference FROM ledger_entries WHERE tenant_id = $1 AND kind = 'debit'", tenant_id)
    return Counter(r["reference"] for r in rows)


def open_reservations(gw: Gateway, tenant_id: str, limit: float = 5.0) -> set[str]:
    """Reservations still open once in-flight settles had `limit` seconds to finish."""
    def ids() -> set[str]:
        return {r["request_id"] for r in gw.sql("SELECT request_id FROM reservations WHERE tenant_id = $1",
                                                tenant_id)}

    with contextlib.suppress(AssertionError):
        _wait("every reservation to be settled", lambda: not ids(), limit)
    return ids()


def assert_ledger_exact(gw: Gateway, tenant_id: str, shots: list[Shot]) -> int:
    """`tollway ledger verify` passes; every 200 has exactly one debit, nothing else has one."""
    # A reserve whose COMMIT met the outage may have landed although its client got a 503;
    # the sweep releases such a hold (in full) after the longest request. No answered
    # request may be among them.
    held = open_reservations(gw, tenant_id)
    assert not held & {s.request_id for s in shots if s.status == 200}
    assert len(held) <= sum(s.status == 503 for s in shots)
    verify = gw.cli("ledger", "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["ok"] is True
    debits = debits_by_request(gw, tenant_id)
    ok = [s.request_id for s in shots if s.status == 200]
    assert all(ok) and len(set(ok)) == len(ok)
    assert not [rid for rid, n in debits.items() if n != 1]
    missing = [rid for rid in ok if rid not in debits]
    assert not missing, f"{len(missing)} answered requests were never charged: {missing[:3]}"
    extra = set(debits) - set(ok)
    assert not extra, f"{len(extra)} requests charged without a 200: {sorted(extra)[:3]}"
    return len(ok)


async def test_redis_restart_under_load_serves_known_keys_and_503s_unknown_ones(gateway: Gateway) -> None:
    """Redis holds only the shared key cache. While it is down, keys a worker has verified
    are answered from that worker's memory (revocations reach it through the database),
    and a key no worker has verified gets a quick, clean 503; once Redis is back it is
    served too."""
    _need_tool("redis-server")
    _need_tool("redis-cli")
    tenant_id, created = gateway.tenant_with_keys("100.00", keys=3)
    load = Load(gateway, [k["key"] for k in created[:2]])
    tasks = load.run(per_key=3, pause=0.01)
    unseen: list[httpx.Response] = []
    try:
        await load.until_each_key_answered(5)
        down = time.monotonic()
        await asyncio.to_thread(stop_redis)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            headers = {"authorization": f"Bearer {created[2]['key']}"}
            started = time.monotonic()
            unseen.append(await client.post(load.path, json=load.request(), headers=headers))
            unseen_took = time.monotonic() - started
            await asyncio.sleep(1.0)
            await asyncio.to_thread(start_redis)
            up = time.monotonic()
            await asyncio.sleep(1.0)
            unseen.append(await client.post(load.path, json=load.request(), headers=headers))
        await asyncio.sleep(1.0)
    finally:
        start_redis()
        load.stop.set()
        await asyncio.gather(*tasks)

    outage_summary("Redis restart", load.shots, down, up)
    print(f"  a key no worker had verified, while Redis was down: {unseen[0].status_code} in {unseen_took:.2f}s")
    during = [s for s in load.shots if down + 0.1 < s.start < up]
    assert len(during) >= 10, "the load loop never met the outage"
    assert all(s.status == 200 for s in load.shots), Counter(s.status for s in load.shots)
    assert unseen[0].status_code == 503 and unseen[0].json()["error"]["code"] == "cache_unavailable"
    assert "cache" in unseen[0].json()["error"]["message"] and unseen_took < 3
    assert unseen[1].status_code == 200, unseen[1].text
    answered = [Shot(0.0, 0.0, 2, r.status_code, r.json(), r.headers.get("x-request-id")) for r in unseen]
    assert_ledger_exact(gateway, tenant_id, load.shots + answered)


async def test_postgres_restart_under_load_loses_and_doubles_no_ledger_entry(gateway: Gateway) -> None:
    _need_tool("pg_ctlcluster")
    tenant_id, created = gateway.tenant_with_keys("100.00", keys=2)
    load = Load(gateway, [k["key"] for k in created])
    tasks = load.run(per_key=3, pause=0.01)
    try:
        await load.until_each_key_answered(5)
        down = time.monotonic()
        await asyncio.to_thread(restart_postgres, STALE + 0.5)
        up = time.monotonic()
        await asyncio.sleep(3.0)
    finally:
        ensure_postgres()
        load.stop.set()
        await asyncio.gather(*tasks)

    outage_summary("PostgreSQL restart", load.shots, down, up)
    failed = [s for s in load.shots if s.status != 200]
    assert failed, "the load loop never met the outage"
    for s in failed:
        assert_openai_error(s, 503, "database_unavailable")
        assert "database" in s.body["error"]["message"]
    assert all(s.start >= down - 0.5 for s in failed), "errors before PostgreSQL went down"
    after = [s for s in load.shots if s.start > up + 1.5]
    assert len(after) >= 10 and all(s.status == 200 for s in after), Counter(s.status for s in after)
    answered = assert_ledger_exact(gateway, tenant_id, load.shots)
    assert answered >= 20
    # Every worker was silent during the outage; none may be taken for dead afterwards
    # (that would release the holds of requests still in flight on it).
    swept = gateway.sql("SELECT id FROM ledger_entries WHERE tenant_id = $1 AND id LIKE '%:swept'", tenant_id)
    assert not swept, f"{len(swept)} reservations of live workers were swept"


async def test_200_concurrent_requests_over_4_workers_never_overspend(gateway: Gateway) -> None:
    """A wallet covering exactly 20 requests, 200 requests at once over 4 workers: exactly
    20 are answered (each charged once), the other 180 get 402, the balance ends at zero."""
    tenant_id, created = gateway.tenant_with_keys(f"{20 * EXACT_COST_MICROS / 1_000_000:.2f}")
    key = created[0]["key"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60, headers={"authorization": f"Bearer {key}"},
                                 limits=httpx.Limits(max_connections=200, max_keepalive_connections=200)) as client:
        start = asyncio.Event()

        async def one() -> httpx.Response:
            await start.wait()
            return await client.post("/v1/chat/completions", json=EXACT_REQUEST)

        pending = [asyncio.create_task(one()) for _ in range(200)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        start.set()
        responses = await asyncio.gather(*pending)
        elapsed = time.monotonic() - started
        spread = connections_per_worker(gateway)  # the keep-alive connections are still open

    statuses = Counter(r.status_code for r in responses)
    print(f"200 at once over {WORKERS} workers: {dict(statuses)} in {elapsed:.2f}s; "
          f"connections per worker {sorted(spread.values())}")
    assert statuses == {200: 20, 402: 180}, (statuses, Counter(
        r.text[:300] for r in responses if r.status_code not in (200, 402)))
    for r in responses:
        if r.status_code == 200:
            assert r.headers["x-tollway-cost-usd"] == "0.010000"
        else:
            assert r.json()["error"]["code"] == "insufficient_quota"
            assert r.headers["x-should-retry"] == "false"
    # The kernel hands each connection to whichever worker accepts first; on a loaded
    # machine one worker may get none, so demand several, not all four.
    assert len(spread) >= 2 and sum(spread.values()) >= 150, (
        f"200 connections should be spread over the {WORKERS} workers: {dict(spread)}")
    wallet = gateway.admin("GET", f"/tenants/{tenant_id}/wallet")
    assert wallet["balance_micros"] == 0 and wallet["reserved_micros"] == 0
    shots = [Shot(started, started + elapsed, 0, r.status_code, None, r.headers.get("x-request-id"))
             for r in responses]
    assert assert_ledger_exact(gateway, tenant_id, shots) == 20
