"""Structured logs through the allow-list, exceptions by type and place, bounded metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import ServerThread, free_port
from tollway import telemetry
from tollway.app import create_app
from tollway.config import Config

SECRET = "CANARY-telemetry-7f3e9a"


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _logging() -> None:
    telemetry.configure_logging()


def test_log_lines_are_json_with_allow_listed_fields_only(capsys: pytest.CaptureFixture[str]) -> None:
    telemetry.log.info("request", request_id="req_1", tenant_id="tn_1", prompt=SECRET, messages=[SECRET],
                       authorization=f"Bearer {SECRET}", latency_ms=12)
    out = capsys.readouterr().out
    assert SECRET not in out
    (line,) = lines(out)
    assert line["event"] == "request" and line["level"] == "info" and "timestamp" in line
    assert set(line) == {"event", "level", "timestamp", "request_id", "tenant_id", "latency_ms"}


def test_event_names_must_be_identifiers(capsys: pytest.CaptureFixture[str]) -> None:
    telemetry.log.warning(f"could not parse {SECRET}")
    out = capsys.readouterr().out
    assert SECRET not in out
    assert lines(out)[0]["event"] == "event_name_redacted"


def test_exceptions_are_logged_by_type_and_place_not_value(capsys: pytest.CaptureFixture[str]) -> None:
    def parse(body: str) -> None:
        raise ValueError(f"bad body: {body}")

    try:
        parse(SECRET)
    except ValueError:
        telemetry.log.exception("body_rejected", request_id="req_2")
        line_no = sys.exc_info()[2].tb_next.tb_lineno  # type: ignore[union-attr]
    out = capsys.readouterr().out
    assert SECRET not in out and "Traceback" not in out
    (line,) = lines(out)
    assert line["exc_type"] == "ValueError"
    assert line["exc_place"] == f"tests/test_telemetry.py:{line_no}"


def test_library_exception_place_names_the_tollway_frame_too() -> None:
    try:
        json.loads("{" + SECRET)
    except ValueError as exc:
        fields = telemetry.exception_fields(exc)
    assert fields["exc_type"] == "JSONDecodeError"
    assert fields["exc_place"].startswith("json/decoder.py:")  # innermost: the library
    assert SECRET not in json.dumps(fields)


def test_foreign_records_keep_their_template_never_their_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    other = logging.getLogger("some.library")
    other.warning("could not decode %r", SECRET)
    other.error("Task exception was never retrieved\nfuture: <Task exception=KeyError(%r)>" % SECRET)  # noqa: UP031
    try:
        raise KeyError(SECRET)
    except KeyError:
        other.exception("handler failed for %s", SECRET)
    out = capsys.readouterr().out
    assert SECRET not in out
    first, second, third = lines(out)
    assert first == {**first, "event": "could not decode %r", "logger": "some.library", "level": "warning"}
    assert second["event"] == "Task exception was never retrieved"
    assert third["exc_type"] == "KeyError" and third["exc_place"].startswith("tests/test_telemetry.py:")


def test_uvicorn_error_log_carries_no_request_content(capsys: pytest.CaptureFixture[str]) -> None:
    async def boom(request: Request) -> Response:
        body = (await request.body()).decode()
        raise RuntimeError(f"cannot handle {body}")

    server = ServerThread(Starlette(routes=[Route("/boom", boom, methods=["POST"])]))
    telemetry.configure_logging()  # as `serve` does: after uvicorn's own setup, which it replaces
    server.start()
    try:
        r = httpx.post(server.url + "/boom", content=SECRET)
        assert r.status_code == 500
    finally:
        server.stop()  # waits for the request task, so its error line is written
    captured = capsys.readouterr()
    assert SECRET not in captured.out and SECRET not in captured.err
    errors = [line for line in lines(captured.out) if line.get("logger") == "uvicorn.error"]
    assert errors and errors[0]["exc_type"] == "RuntimeError"
    assert errors[0]["event"] == "Exception in ASGI application"


def _sample(name: str, **labels: str) -> float:
    return telemetry.REGISTRY.get_sample_value(name, labels) or 0.0


def test_request_line_is_the_line_structlog_writes(capsys: pytest.CaptureFixture[str]) -> None:
    # record_request writes its line without structlog's chain (telemetry._request_line):
    # it must be the same line, key order included, but for the time.
    telemetry.configure_metrics(["acme/m1"], ["p1"], tenant_labels=False)
    fields: dict[str, Any] = {
        "request_id": "req_x", "tenant_id": "tn_1", "key_id": "key_1", "model": "acme/m1", "provider": "p1",
        "method": "POST", "path": "/v1/chat/completions", "stream": False, "status": 200, "error_type": None,
        "error_code": None, "upstream_status": 200, "prompt_tokens": 3, "completion_tokens": 4,
        "cached_tokens": 0, "reasoning_tokens": 0, "estimated": False, "cost_micros": 12,
        "cost_usd": "0.000012", "latency_ms": 5, "messages": [SECRET], "prompt": SECRET}
    telemetry.record_request(**fields)
    telemetry.log.info("request", **fields)
    out = capsys.readouterr().out
    assert SECRET not in out
    ours, structlogs = lines(out)
    assert list(ours) == list(structlogs)
    assert {k: v for k, v in ours.items() if k != "timestamp"} == {
        k: v for k, v in structlogs.items() if k != "timestamp"}
    assert ours["timestamp"].endswith("Z") and ours["timestamp"][:16] == structlogs["timestamp"][:16]
    telemetry.configure_logging(logging.WARNING)
    try:
        telemetry.record_request(**fields)
        assert capsys.readouterr().out == ""  # below the level: no line, as with structlog
    finally:
        telemetry.configure_logging()


def test_record_request_feeds_bounded_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    telemetry.configure_metrics(["acme/m1"], ["p1"], tenant_labels=False)
    before = {
        "req": _sample("tollway_requests_total", model="acme/m1", provider="p1", status="200", error_type=""),
        "other": _sample("tollway_requests_total", model="other", provider="p1", status="404",
                         error_type="model_not_found"),
        "prompt": _sample("tollway_tokens_total", model="acme/m1", kind="prompt"),
        "completion": _sample("tollway_tokens_total", model="acme/m1", kind="completion"),
        "cost": _sample("tollway_cost_micros_total", model="acme/m1"),
        "upstream": _sample("tollway_upstream_errors_total", provider="p1", error_type="upstream_error"),
    }
    telemetry.record_request(request_id="req_a", tenant_id="tn_secret1", model="acme/m1", provider="p1", status=200,
                             prompt_tokens=10, completion_tokens=5, cost_micros=123, latency_ms=40)
    telemetry.record_request(request_id="req_b", model=SECRET, provider="p1", status=404, error_type="model_not_found")
    telemetry.record_request(request_id="req_c", model="acme/m1", provider="p1", status=502,
                             error_type="upstream_error", upstream_status=500)
    assert _sample("tollway_requests_total", model="acme/m1", provider="p1", status="200",
                   error_type="") == before["req"] + 1
    assert _sample("tollway_requests_total", model="other", provider="p1", status="404",
                   error_type="model_not_found") == before["other"] + 1
    assert _sample("tollway_tokens_total", model="acme/m1", kind="prompt") == before["prompt"] + 10
    assert _sample("tollway_tokens_total", model="acme/m1", kind="completion") == before["completion"] + 5
    assert _sample("tollway_cost_micros_total", model="acme/m1") == before["cost"] + 123
    upstream = _sample("tollway_upstream_errors_total", provider="p1", error_type="upstream_error")
    assert upstream == before["upstream"] + 1
    text = telemetry.metrics_text().decode()
    assert SECRET not in text and "tn_secret1" not in text
    out = capsys.readouterr().out
    assert SECRET not in out
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert any(line.get("model") == "other" for line in lines)  # an unconfigured slug is not written down
    telemetry.configure_metrics(["acme/m1"], ["p1"], tenant_labels=True)
    try:
        telemetry.record_request(tenant_id="tn_labelled", model="acme/m1", provider="p1", status=200, cost_micros=7)
        assert _sample("tollway_tenant_requests_total", tenant_id="tn_labelled") == 1
        assert _sample("tollway_tenant_cost_micros_total", tenant_id="tn_labelled") == 7
    finally:
        telemetry.configure_metrics([], [], tenant_labels=False)


def test_metrics_endpoint_follows_config(make_config: Callable[..., Config],
                                         serve_app: Callable[[Any], ServerThread]) -> None:
    # Two gateways on one database at once, as workers share it (a sole server would refuse).
    on = serve_app(create_app(make_config(), provider_keys={}, migrate=True, sole_server=False))
    assert httpx.get(on.url + "/healthz").status_code == 200
    r = httpx.get(on.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'tollway_http_requests_total{method="GET",route="/healthz",status="200"}' in r.text
    off = serve_app(create_app(make_config(metrics={"enabled": False}), provider_keys={}, migrate=True,
                               sole_server=False))
    assert httpx.get(off.url + "/metrics").status_code == 404


def _healthz_count(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('tollway_http_requests_total{') and 'route="/healthz"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_serve_with_workers_reports_metrics_summed_over_processes(make_config: Callable[..., Config],
                                                                  tmp_path: Path) -> None:
    cfg = make_config()
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOLLWAY_ADMIN_TOKEN": "short-admin-token"}
    env.pop(telemetry.MULTIPROC_ENV, None)
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tollway", "serve", "--config", cfg.source, "--port",
                                 str(port), "--workers", "2"], stdout=out, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    health_calls = 0
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health_calls += 1
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                health_calls -= 1  # never reached the app
            assert time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.1)
        for _ in range(30):  # a new connection each time: the kernel spreads them over both workers
            assert httpx.get(url + "/healthz", headers={"connection": "close"}).status_code == 200
            health_calls += 1
        time.sleep(0.2)
        counts = {_healthz_count(httpx.get(url + "/metrics", headers={"connection": "close"}).text)
                  for _ in range(6)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert counts == {float(health_calls)}, (counts, health_calls)
    records = lines(out_path.read_text())  # every stdout line is one JSON object
    assert any(r["event"] == "serving" for r in records)
    assert "Traceback" not in err_path.read_text()
    # An exposure warning (surface.warnings) is logged once per `serve`, not once per worker.
    notices = [r["notice"] for r in records if r["event"] == "startup_notice"]
    assert len([n for n in notices if "TOLLWAY_ADMIN_TOKEN is 17 bytes" in n]) == 1, notices
    assert "short-admin-token" not in out_path.read_text() + err_path.read_text()


def test_info_lines_are_flushed_by_the_loop_warnings_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request line is not a system call of its own: on the event loop, info lines wait
    in the stream's buffer for at most LOG_FLUSH_SECONDS; warnings, and lines written
    with no loop running, reach the file at once."""
    path = tmp_path / "log"
    with path.open("w", encoding="utf-8") as out:  # block-buffered, as when stdout is a file or pipe
        monkeypatch.setattr(sys, "stdout", out)

        async def on_the_loop() -> tuple[str, str, str]:
            telemetry.log.info("request", status=200)
            telemetry.log.info("request", status=201)
            buffered = path.read_text()
            telemetry.log.warning("something_odd")
            at_once = path.read_text()
            telemetry.log.info("request", status=202)
            await asyncio.sleep(telemetry.LOG_FLUSH_SECONDS * 2)
            return buffered, at_once, path.read_text()

        buffered, at_once, later = asyncio.run(on_the_loop())
        assert buffered == ""
        assert [x.get("status", x["event"]) for x in lines(at_once)] == [200, 201, "something_odd"]
        assert [x.get("status") for x in lines(later)][-1] == 202
        telemetry.log.info("cli_line")  # no loop: at once
        assert lines(path.read_text())[-1]["event"] == "cli_line"
    # Lines still waiting when a process ends normally are written at exit.
    script = ("import asyncio\nfrom tollway import telemetry\n"
              "async def main():\n    telemetry.log.info('last_words')\nasyncio.run(main())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert lines(done.stdout)[-1]["event"] == "last_words", done.stderr


def test_uvicorn_access_log_is_off_where_uvicorn_looks() -> None:
    """uvicorn formats an access line's arguments whenever its access logger has a handler
    anywhere up the chain; it must have none (the access log is the database's). In a
    child process: pytest hangs capture handlers on loggers."""
    script = ("import logging\nfrom tollway import telemetry\ntelemetry.configure_logging()\n"
              "print(logging.getLogger('uvicorn.access').hasHandlers(), "
              "logging.getLogger('uvicorn.error').hasHandlers())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "True"], done.stderr  # errors still reach the JSON handler
