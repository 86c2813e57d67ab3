"""Structured logs and Prometheus metrics, fed only through privacy.py.

Logs: one JSON object per line on stdout. Tollway's own events pass through
privacy.loggable(), so a field that is not allow-listed is dropped, and an event name
must look like an identifier (a sentence built from request text cannot pass). Records
from other libraries (uvicorn, asyncio, SQLAlchemy) keep their logger name, level and
message *template* only: their arguments, which is where a request value would be, are
never rendered, and only the first line of the template is kept (asyncio joins a task's
repr, exception value included, into the lines below it). An exception is recorded by
type and place (file:line), never by its message, which may quote the request body.

Metrics: one registry per process. Labels come from bounded sets only: route templates
from the route table, configured model slugs and provider names, status codes. A tenant
label exists only when metrics.tenant_labels is set. With `serve --workers N` the CLI
points PROMETHEUS_MULTIPROC_DIR at a private folder before the workers start, so any
worker answering /metrics reports the sum over all of them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from tollway.log_output import LOG_FLUSH_SECONDS as LOG_FLUSH_SECONDS
from tollway.log_output import LineWriter, LineWriterHandler, set_log_stream
from tollway.privacy import loggable, scrub

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# --- logs ---------------------------------------------------------------------------------

_EVENT_NAME = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_TEMPLATE_MAX = 160


def exception_fields(exc_info: Any) -> dict[str, str]:
    """exc_info (True, an exception or a sys.exc_info() tuple) -> {exc_type, exc_place}.

    The place is the innermost frame of the traceback, as "package/module.py:line"; the
    message and the local values are never read.
    """
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or len(exc_info) != 3 or exc_info[0] is None:
        return {}
    exc_type, _, tb = exc_info
    return {"exc_type": getattr(exc_type, "__qualname__", "Exception"), "exc_place": _place(tb)}


def _place(tb: TracebackType | None) -> str:
    """Innermost frame, plus the innermost Tollway frame when the error came from a library."""
    if tb is None:
        return "unknown"
    frames = traceback.extract_tb(tb)
    here = _short(frames[-1])
    ours = [f for f in frames if f"{os.sep}tollway{os.sep}" in f.filename]
    if ours and ours[-1] is not frames[-1]:
        return f"{here} via {_short(ours[-1])}"
    return here


def _short(frame: traceback.FrameSummary) -> str:
    return f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno}"


def _exceptions_by_type_and_place(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    exc = event.pop("exc_info", None)
    event.pop("exception", None)
    event.pop("stack", None)
    event.pop("stack_info", None)
    if exc:
        event.update(exception_fields(exc))
    return event


def _own_event_name(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    name = event.get("event")
    if not isinstance(name, str) or not _EVENT_NAME.fullmatch(name):
        event["event"] = "event_name_redacted"
    return event


def _foreign_record(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stdlib record from another library: keep its template, never its arguments."""
    record: logging.LogRecord | None = event.get("_record")
    if record is not None:
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        first = template.strip().splitlines()[0] if template.strip() else ""
        event["event"] = scrub(first[:_TEMPLATE_MAX])
        event["logger"] = record.name
        if record.exc_info:
            event["exc_info"] = record.exc_info
    return event


def _allow_listed(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return loggable(event)


_TIMESTAMP = structlog.processors.TimeStamper(fmt="iso", utc=True)
_SHARED: list[Any] = [
    structlog.processors.add_log_level,
    _TIMESTAMP,
    _exceptions_by_type_and_place,
]


def _orjson_text(obj: Any, **_: Any) -> str:
    # orjson writes the same JSON as json.dumps at a fraction of its cost per line; values
    # it has no encoding for (none of the allow-listed fields) become their str().
    return orjson.dumps(obj, default=str).decode()


_JSON = structlog.processors.JSONRenderer(serializer=_orjson_text)
_LINES = LineWriter()


class _Level:
    """The level structlog filters at, for the request line written without it."""

    value = logging.INFO


def _structlog_config(level: int) -> None:
    _Level.value = level
    structlog.configure(
        processors=[*_SHARED, _own_event_name, _allow_listed, _JSON],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: LineWriter(),
        cache_logger_on_first_use=True,
    )


# Configured at import, so no code path can log through structlog's permissive defaults.
_structlog_config(logging.INFO)


def configure_logging(level: int = logging.INFO, stream: Literal["stdout", "stderr"] = "stdout") -> None:
    """Route structlog and every stdlib logger (uvicorn included) through the allow-list.

    Idempotent: called by `serve` and by every worker's app factory.
    """
    set_log_stream(stream)
    _structlog_config(level)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_foreign_record, *_SHARED],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _allow_listed,
            _JSON,
        ],
        pass_foreign_args=False,
        use_get_message=False,  # never interpolate a foreign record's arguments
    )
    handler = LineWriterHandler()
    handler.setFormatter(formatter)
    handler.set_name("tollway")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "tollway"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # Uvicorn's access log would print request lines with query strings; the access log
    # lives in the database (accesslog.py) with the route template only. A logger with no
    # handler anywhere up its chain also spares uvicorn formatting each line's arguments
    # (it asks hasHandlers() per connection).
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
    # Alembic narrates every start-up at INFO in templates whose arguments we never print.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)


log = structlog.get_logger("tollway")


def log_startup(host: str, port: int, workers: int, notices: list[str]) -> None:
    for notice in notices:
        log.warning("startup_notice", notice=notice)
    log.info("serving", host=host, port=port, count=workers)


# --- metrics ------------------------------------------------------------------------------

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

HTTP_REQUESTS = Counter("tollway_http_requests", "HTTP requests by route template, method and status.",
                        ["route", "method", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("tollway_http_request_duration_seconds",
                         "Time from request start to the last response byte, by route template.",
                         ["route"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
V1_REQUESTS = Counter("tollway_requests", "/v1 requests by model, provider, status and error type.",
                      ["model", "provider", "status", "error_type"], registry=REGISTRY)
TOKENS = Counter("tollway_tokens", "Tokens billed by model and kind (prompt includes cached; "
                 "completion includes reasoning).", ["model", "kind"], registry=REGISTRY)
COST = Counter("tollway_cost_micros", "Amount charged in micro-USD (integer-valued), by model.",
               ["model"], registry=REGISTRY)
UPSTREAM_ERRORS = Counter("tollway_upstream_errors", "Failed upstream calls by provider and error type.",
                          ["provider", "error_type"], registry=REGISTRY)
ACCESS_LOG_DROPPED = Counter("tollway_access_log_dropped_rows",
                             "Access-log rows dropped because the database was unavailable.",
                             registry=REGISTRY)
TENANT_REQUESTS = Counter("tollway_tenant_requests", "/v1 requests by tenant (metrics.tenant_labels only).",
                          ["tenant_id"], registry=REGISTRY)
TENANT_COST = Counter("tollway_tenant_cost_micros", "Micro-USD charged by tenant (metrics.tenant_labels only).",
                      ["tenant_id"], registry=REGISTRY)

_TOKEN_KINDS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
_OTHER = "other"


class _Labels:
    """The bounded label values this process may use, from the config."""

    models: frozenset[str] = frozenset()
    providers: frozenset[str] = frozenset()
    tenant_labels: bool = False


def configure_metrics(models: Iterable[str], providers: Iterable[str], tenant_labels: bool) -> None:
    _Labels.models = frozenset(models)
    _Labels.providers = frozenset(providers)
    _Labels.tenant_labels = tenant_labels


def _bounded(value: Any, allowed: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in allowed else _OTHER


def _error_label(value: Any) -> str:
    # Error types are class-like identifiers written by Tollway; anything else is folded.
    if value is None or value == "":
        return ""
    return value if isinstance(value, str) and _EVENT_NAME.fullmatch(value.lower()) else _OTHER


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def record_request(**fields: Any) -> None:
    """One line per /v1 request: the metadata allow-listed in privacy.py, nothing else.

    Also feeds the metrics: model and provider only when configured (others count as
    "other", in the log line too), token counts and cost_micros as integers.
    """
    model = _bounded(fields.get("model"), _Labels.models)
    provider = _bounded(fields.get("provider"), _Labels.providers)
    if fields.get("model") is not None:
        # The slug a client sent is text it chose: only configured slugs are written down.
        fields["model"] = model
    _request_line(fields)
    status = fields.get("status")
    status_label = str(status) if isinstance(status, int) and 100 <= status <= 599 else _OTHER
    error_type = _error_label(fields.get("error_type"))
    _child(V1_REQUESTS, model, provider, status_label, error_type).inc()
    for kind in _TOKEN_KINDS:
        n = _int(fields.get(kind))
        if n:
            _child(TOKENS, model, kind.removesuffix("_tokens")).inc(n)
    cost = _int(fields.get("cost_micros"))
    if cost:
        _child(COST, model).inc(cost)
    upstream_status = fields.get("upstream_status")
    failed_upstream = isinstance(upstream_status, int) and upstream_status >= 400
    if error_type and (failed_upstream or "upstream" in error_type.lower()):
        _child(UPSTREAM_ERRORS, provider, error_type).inc()
    tenant = fields.get("tenant_id")
    if _Labels.tenant_labels and isinstance(tenant, str) and tenant:
        TENANT_REQUESTS.labels(tenant).inc()
        if cost:
            TENANT_COST.labels(tenant).inc(cost)


def _request_line(fields: dict[str, Any]) -> None:
    """The line `log.info("request", **fields)` writes, byte for byte but the time, built
    here without structlog's chain: it is written once per /v1 request and the chain cost
    twice the line itself (docs/performance-history.md). Same allow-list (loggable), same key order
    (the fields, then event, level, timestamp), same renderer; the fields hold no
    exception and "request" is a valid event name, so the other processors have nothing
    to do. test_telemetry compares the two lines."""
    if _Level.value > logging.INFO:
        return
    line = loggable(fields)
    line.update(event="request", level="info")
    _LINES.msg(_orjson_text(_TIMESTAMP(None, "info", line)))


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """metric.labels(*labels), cached: labels() costs ~4 us a call, and every label set
    passed here is bounded, so the cache is too."""
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def record_http(route: str, method: str, status: int, seconds: float) -> None:
    """Called by the access-log middleware for every HTTP request (labels already bounded)."""
    _child(HTTP_REQUESTS, route, method, str(status)).inc()
    _child(HTTP_LATENCY, route).observe(seconds)


def metrics_text() -> bytes:
    if os.environ.get(MULTIPROC_ENV):
        merged = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
    return generate_latest(REGISTRY)


async def metrics_endpoint(_: Request) -> Response:
    return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST)
