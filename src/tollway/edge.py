"""The outermost layer of every HTTP request: its id, its access-log row, and the
short way in for the /v1 POST endpoints.

Every request gets an id (scope["state"]["request_id"], echoed as `x-request-id`) and,
once it ends, one access-log row and its HTTP metrics. Headers an inner layer puts in
scope["state"]["response_headers"] (a rate-limited key's x-ratelimit-*) go on whatever
response it then sends, an error included. The /v1 POST endpoints are
called straight from here: they are plain ASGI callables that render their own
errors, so Starlette's error middleware, exception middleware and router would only
add three wrappers around `send` and a regex walk per request on the hot path
(docs/performance-history.md). Everything else, including a /v1 path with another method, goes
through the Starlette app as usual.
"""

from __future__ import annotations

import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway import telemetry
from tollway.accesslog import AccessLogWriter, route_template
from tollway.errors import TollwayError, render_json
from tollway.store.db import now_ms

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection first"


def new_request_id() -> str:
    """req_ + milliseconds since the epoch (12 hex digits) + 64 random bits (16 hex digits).

    The id keys the reservation, ledger and usage rows; ids that grow with time are
    inserted at the right edge of those indexes instead of at a random leaf, which cost
    SQLite 12-20% more CPU per request (docs/performance-history.md). Unique without coordination
    between workers; it tells the client nothing it did not know (when it called)."""
    return f"req_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"


class Edge:
    def __init__(self, app: ASGIApp, writer: AccessLogWriter, shortcuts: dict[str, ASGIApp] | None = None) -> None:
        """`shortcuts`: exact path -> ASGI callable for POST requests (the /v1 endpoints)."""
        self.app = app
        self.writer = writer
        self.shortcuts = shortcuts or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_wall = now_ms()
        started = time.perf_counter()
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        id_header = (b"x-request-id", rid.encode())
        status = 0
        completed = False
        disconnected = False

        async def send_watched(message: Message) -> None:
            nonlocal status, completed
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                if not any(k == b"x-request-id" for k, _ in headers):
                    headers.append(id_header)
                headers += scope["state"].get("response_headers", ())  # a limited key's rate limits
                message["headers"] = headers
            elif kind == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        async def receive_watched() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not completed:
                disconnected = True
            return message

        shortcut = self.shortcuts.get(scope["path"]) if scope["method"] == "POST" else None
        try:
            if shortcut is None:
                await self.app(scope, receive_watched, send_watched)
            else:
                try:
                    await shortcut(scope, receive_watched, send_watched)
                except Exception:
                    # What Starlette's error middleware does for the other routes: a 500 if
                    # nothing was sent yet, then the exception goes on to the server's log.
                    if not status:
                        await render_json(TollwayError("The gateway failed to handle this request."),
                                          rid)(scope, receive, send_watched)
                    raise
        except BaseException:
            status = _CLIENT_CLOSED if status and not completed else 500
            raise
        finally:
            if disconnected and not completed:
                status = _CLIENT_CLOSED
            template = scope["path"] if shortcut is not None else route_template(scope)
            self._record(scope, template, status or 500, started_wall, time.perf_counter() - started)

    def _record(self, scope: Scope, route: str, status: int, started_wall: int, seconds: float) -> None:
        state = scope["state"]
        method = scope.get("method", "")
        method = method if method in _METHODS else "OTHER"
        client = scope.get("client")
        tenant = state.get("tenant_id")
        self.writer.add({
            "created_at": started_wall,
            "request_id": state["request_id"],
            "method": method,
            "path": route,
            "status": status,
            "client_ip": str(client[0])[:64] if client else None,
            "latency_ms": int(seconds * 1000),
            "tenant_id": tenant[:40] if isinstance(tenant, str) else None,
        })
        telemetry.record_http(route, method, status, seconds)
