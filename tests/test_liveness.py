"""A stalled worker costs the operator nothing: a real worker of `tollway serve --workers 2`
on PostgreSQL + Redis is stopped (SIGSTOP) while it serves a request, then resumed.

Stopped for longer than a revoke waits for it (STALE) but less than the release threshold
(`server.worker_release_after_seconds`), it keeps its reservation and a revoke does not
wait for it. Stopped for longer than the release threshold, the other worker releases its
reservation (`:swept`); when it resumes, its settle charges the request anyway. Either way
the answered request is charged exactly once and `tollway ledger verify` passes.

uvicorn's supervisor kills a worker that does not answer its health check for 5 s, so
the supervisor is stopped with it, as a paused VM or host would be.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_URL, ServerThread, free_port, fresh_pg_database, need_postgres, need_redis, to_toml
from tests.fakes.harness import PRICES, PROVIDER_KEY
from tests.fakes.openai_upstream import FakeOpenAI
from tests.test_scaleout import Gateway, _stop, debits_by_request, gateway_env
from tollway.auth.workers import STALE

pytestmark = pytest.mark.slow

RELEASE_AFTER = 8  # seconds: the test's release threshold (60 by default)
WORKERS = 2


@pytest.fixture
def upstream(serve_app: Callable[[Any], ServerThread]) -> str:
    fake = FakeOpenAI(key=PROVIDER_KEY, stall_seconds=3.0)  # fake-sleep answers after 3 s
    return serve_app(fake.app).url


@contextmanager
def serving(folder: Path, upstream_url: str) -> Iterator[Gateway]:
    need_postgres()
    need_redis()
    port = free_port()
    with fresh_pg_database() as db_url:
        config = folder / "tollway.toml"
        config.write_text(to_toml({
            "server": {"host": "127.0.0.1", "port": port, "worker_release_after_seconds": RELEASE_AFTER},
            "database": {"url": db_url},
            "cache": {"url": REDIS_URL},
            "providers": {"fake": {"type": "openai", "base_url": upstream_url + "/v1",
                                   "api_key_env": "FAKE_PROVIDER_KEY"}},
            "models": [{"id": "acme/sleep", "provider": "fake", "upstream": "fake-sleep", **PRICES}],
        }), encoding="utf-8")
        log = folder / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tollway", "serve", "--config", str(config), "--workers", str(WORKERS)],
                stdout=out, stderr=subprocess.STDOUT, env={**gateway_env(), "FAKE_PROVIDER_KEY": PROVIDER_KEY},
                start_new_session=True)
        gw = Gateway(f"http://127.0.0.1:{port}", port, db_url, config, proc, log)
        try:
            _until(lambda: registered(gw) == WORKERS and _ready(gw), 60, f"{WORKERS} workers", gw)
            yield gw
        finally:
            with_signal(proc.pid, signal.SIGCONT)
            _stop(proc)


def registered(gw: Gateway) -> int:
    return int(gw.sql("SELECT count(*) AS n FROM workers")[0]["n"])


def _ready(gw: Gateway) -> bool:
    try:
        return httpx.get(gw.url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _until(ok: Callable[[], bool], limit: float, what: str, gw: Gateway) -> None:
    deadline = time.monotonic() + limit
    while not ok():
        if gw.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{gw.log_tail()}")
        time.sleep(0.05)


def with_signal(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def swept(gw: Gateway, request_id: str) -> bool:
    return bool(gw.sql("SELECT 1 FROM ledger_entries WHERE id = $1", f"{request_id}:swept"))


@pytest.mark.parametrize("stall", ["beyond_the_revoke_wait", "beyond_the_release_threshold"])
def test_a_stalled_worker_charges_its_request_exactly_once(tmp_path: Path, upstream: str, stall: str) -> None:
    with serving(tmp_path, upstream) as gw:
        tenant_id, created = gw.tenant_with_keys("10.00", keys=2)
        credit = 10_000_000
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, gw.url + "/v1/chat/completions", timeout=120,
                                 headers={"authorization": f"Bearer {created[0]['key']}"},
                                 json={"model": "acme/sleep", "max_tokens": 50,
                                       "messages": [{"role": "user", "content": "Hello"}]})
            _until(lambda: bool(gw.sql("SELECT 1 FROM reservations WHERE tenant_id = $1", tenant_id)), 20,
                   "the request's reservation", gw)
            row = gw.sql("SELECT r.request_id, w.process FROM reservations r JOIN workers w ON w.id = r.worker_id "
                         "WHERE r.tenant_id = $1", tenant_id)[0]
            request_id, pid = row["request_id"], int(row["process"].split("|")[4])
            stopped = time.monotonic()
            for target in (gw.proc.pid, pid):  # the supervisor too: it would kill a worker silent for 5 s
                with_signal(target, signal.SIGSTOP)
            try:
                if stall == "beyond_the_revoke_wait":
                    time.sleep(STALE + 0.5)
                    started = time.monotonic()
                    gw.admin("POST", f"/keys/{created[1]['key_id']}/revoke")  # served by the other worker
                    revoke_took = time.monotonic() - started
                    time.sleep(max(0.0, stopped + RELEASE_AFTER - 2.0 - time.monotonic()))
                    assert not swept(gw, request_id), "a live worker's reservation was released"
                    assert revoke_took < 3.0, f"the revoke waited {revoke_took:.1f}s for a stopped worker"
                else:
                    _until(lambda: swept(gw, request_id), RELEASE_AFTER + 15, "the sweep of the stopped worker", gw)
                    assert time.monotonic() - stopped >= RELEASE_AFTER - 1.0  # not before the threshold
                stalled_for = time.monotonic() - stopped
            finally:
                for target in (pid, gw.proc.pid):
                    with_signal(target, signal.SIGCONT)
            response = answer.result(timeout=60)
        print(f"{stall}: worker stopped {stalled_for:.1f}s; answer {response.status_code}")
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == request_id
        cost = round(float(response.headers["x-tollway-cost-usd"]) * 1_000_000)
        assert cost > 0
        assert debits_by_request(gw, tenant_id) == {request_id: 1}
        debit = gw.sql("SELECT amount_micros FROM ledger_entries WHERE id = $1", f"{request_id}:debit")
        assert debit[0]["amount_micros"] == -cost
        assert swept(gw, request_id) == (stall == "beyond_the_release_threshold")
        assert gw.admin("GET", f"/tenants/{tenant_id}/wallet")["balance_micros"] == credit - cost
        assert not gw.sql("SELECT 1 FROM reservations WHERE tenant_id = $1", tenant_id)
        verify = gw.cli("ledger", "verify", "--json")
        assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True, verify.stdout + verify.stderr
        _until(lambda: registered(gw) == WORKERS, 10, "the stopped worker to register again", gw)
