"""How `tollway serve` runs uvicorn: the drain on SIGTERM, and a guard on every connection.

The drain (docs/operations.md, "Stopping"). uvicorn's own shutdown stops accepting (it
closes the listener), closes idle keep-alive connections, lets the requests in flight run
for up to `timeout_graceful_shutdown` (= server.drain_timeout_seconds) and then cancels
what still runs. The /v1 pipeline takes that cancellation as the drain's deadline: a
stream ends with an error event in its wire format and is settled by the conservative
rule, a call still waiting for its provider gets a 503 and its hold is released
(relay.py, pipeline.py), and the app's lifespan waits for those settles before it closes
the database (app.py). Two changes to uvicorn, both here:
  * `DrainingServer` exits 0 after its drain; uvicorn re-raises the signal once shut down,
    so the process would end "killed by SIGTERM" however cleanly it drained.
  * With --workers N, `_Supervisor` closes its own copy of the listening socket before it
    signals the workers: the socket stays open while any process holds it, and the kernel
    would go on queueing new connections that no worker accepts any more. Each worker runs
    a `DrainingServer` (`_Worker`); the supervisor exits 0 when every worker did.

The guard (`GuardedHttpTools`, the httptools protocol with four bounds; uvicorn has none
of them for httptools, docs/design.md says why they live here): a request's line and
headers must arrive within `header_timeout` of the connection opening or of the
request's first byte (slowloris: 408, closed; a connection that sent nothing is just
closed), and its body within `body_timeout` of the headers (408, closed); line plus
headers at most `max_header_bytes` (431, closed: llhttp buffers an unfinished header
without a limit); at most `max_connections` open connections per worker, refused at
accept (503, closed). Idle keep-alive connections close after `keepalive_timeout`
(uvicorn's timeout_keep_alive). Each bound costs a connection one timer and a few
integer updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import multiprocess

from tollway.config import ServerConfig
from tollway.telemetry import log

APP = "tollway.app:app_from_env"


@dataclass(frozen=True, slots=True)
class Guard:
    header_timeout: float
    body_timeout: float
    max_header_bytes: int
    max_connections: int

    @classmethod
    def of(cls, server: ServerConfig) -> Guard:
        return cls(server.header_timeout_seconds, server.body_timeout_seconds, server.max_header_bytes,
                   server.max_connections)


class ServeConfig(uvicorn.Config):
    """uvicorn's Config carrying the guard to every connection (pickled to each worker)."""

    def __init__(self, guard: Guard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = guard


def serve(host: str, port: int, workers: int, server: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT, drain, and return the exit status."""
    config = ServeConfig(
        Guard.of(server), app=APP, factory=True, host=host, port=port, workers=workers,
        # log_config=None: uvicorn installs no handlers of its own, its records reach the
        # allow-listed JSON handler (telemetry.configure_logging) like every other logger's.
        log_level="warning", access_log=False, log_config=None, loop="uvloop", http=GuardedHttpTools,
        timeout_keep_alive=server.keepalive_timeout_seconds,
        timeout_graceful_shutdown=server.drain_timeout_seconds)
    if workers == 1:
        one = DrainingServer(config)
        one.run()
        return 0 if one.started else 3  # 3: uvicorn's start-up failure
    sock = config.bind_socket()
    try:
        with _workers_drain():
            supervisor = _Supervisor(config, sockets=[sock])
            supervisor.run()
    finally:
        sock.close()
    return supervisor.status


class DrainingServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()  # drained: exit 0, not by re-raising the signal

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("drain_started", count=len(self.server_state.tasks))
        await super().shutdown(sockets)
        log.info("drain_finished")


class _Worker(multiprocess.Process):
    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(config=self.config)
        return self._server


class _Supervisor(multiprocess.Multiprocess):
    status = 0

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()  # new connections are refused from now on, not queued for nobody
        super().terminate_all()

    def join_all(self) -> None:
        super().join_all()
        failed = [p.exitcode for p in self.processes if p.exitcode != 0]
        if failed:
            log.error("drain_failed", count=len(failed), status=failed[0])
            self.status = 1


@contextlib.contextmanager
def _workers_drain() -> Iterator[None]:
    """uvicorn's supervisor makes its workers as `multiprocess.Process`; for as long as it
    runs (the whole `serve`), that name is `_Worker`, which runs a DrainingServer."""
    original = multiprocess.Process
    setattr(multiprocess, "Process", _Worker)  # noqa: B010 (a module attribute, swapped back below)
    try:
        yield
    finally:
        setattr(multiprocess, "Process", original)  # noqa: B010


def _refusal(status: int, reason: bytes, message: str, code: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                   else "server_error", "param": None, "code": code}})
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body)) + body)


_SLOW_HEAD = _refusal(408, b"Request Timeout", "The request headers did not arrive in time.", "header_timeout")
_SLOW_BODY = _refusal(408, b"Request Timeout", "The request body did not arrive in time.", "body_timeout")
_BIG_HEAD = _refusal(431, b"Request Header Fields Too Large", "The request line and headers are too large.",
                     "headers_too_large")
_TOO_MANY = _refusal(503, b"Service Unavailable", "This gateway has too many open connections; retry shortly.",
                     "too_many_connections")


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module docstring.

    Per request on the hot path: no timer is made or cancelled (one per connection is
    moved to the next deadline only when it fires), and the headers are measured only
    when the read that completed them was larger than the limit."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard: Guard = getattr(config, "guard", None) or Guard.of(ServerConfig())
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # when the current head or body must be in; None: no bound running
        self.in_head = True  # what arrives next is a request's line and headers
        self.unfinished = 0  # bytes of reads that ended inside a head (llhttp holds them all)
        self.last_read = 0
        self.heads = 0  # heads completed on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.guard.max_connections:
            self._refuse(_TOO_MANY)
            return
        self._arm(self.guard.header_timeout)  # a connection that sends nothing is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads, in_head = self.heads, self.in_head
        self.last_read = len(data)
        super().data_received(data)
        # This read began and ended inside one head (not a body's end and the next head).
        if in_head and self.heads == heads and self.in_head and not self.transport.is_closing():
            self.unfinished += len(data)
            if self.unfinished > self.guard.max_header_bytes:
                self._refuse(_BIG_HEAD)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.deadline is None:
            self._arm(self.guard.header_timeout)

    def on_headers_complete(self) -> None:
        self.deadline = None
        self.heads += 1
        head = self.unfinished + self.last_read  # at least the head's size
        self.in_head, self.unfinished = False, 0
        if head > self.guard.max_header_bytes and self._head_size() > self.guard.max_header_bytes:
            self._refuse(_BIG_HEAD)
            return
        super().on_headers_complete()
        if not self.pipeline:  # a queued request's body is not read until its turn
            self._arm(self.guard.body_timeout)

    def on_message_complete(self) -> None:
        self.deadline = None
        self.in_head, self.unfinished = True, 0
        super().on_message_complete()

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _arm(self, seconds: float) -> None:
        self.deadline = deadline = self.loop.time() + seconds
        if self.timer is not None and self.timer.when() > deadline:
            self.timer.cancel()
            self.timer = None
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < self.deadline:  # moved on since this timer was set
            self.timer = self.loop.call_at(self.deadline, self._expired)
        elif not self.in_head:
            self._refuse(_SLOW_BODY)
        elif self.unfinished or self.last_read:
            self._refuse(_SLOW_HEAD)
        else:
            self.transport.close()  # not one byte of a request came: nobody to answer

    def _refuse(self, response: bytes) -> None:
        """Answer `response` unless one is under way already, and close the connection."""
        self.deadline = None
        cycle: Any = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.response_started:
            self.transport.close()
            return
        self.transport.write(response)
        self.transport.close()
