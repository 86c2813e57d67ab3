"""A body cap for every route outside /v1: the admin API, the Stripe webhook, health and
anything unknown.

FastAPI reads and parses a whole body before its dependencies run, and Starlette's
`request.body()` keeps whatever arrives, so without this anyone could make the process
buffer a body of any size. The cap is enforced on the ASGI messages themselves: a declared
`Content-Length` over it is answered 413 before one byte is read, and a chunked body is cut
off while it streams, the moment it passes the cap. The /v1 endpoints are not wrapped: the
proxy reads their bodies itself against `server.max_body_bytes` (proxy/inbound.py).

The check is lazy, on the app's first `receive`: a route that refuses the caller first
(the admin token gate, admin.py) answers without the body being looked at.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway.errors import PayloadTooLarge, TollwayError, render_json

# Admin calls and Stripe events are a few kB; 1 MiB leaves room and bounds the buffer.
CONTROL_BODY_LIMIT = 1 << 20
# A refused body declared up to this size is left to the server, which reads and discards
# it after the answer (nothing is kept), so the client reliably gets the answer: closing a
# connection with unread data resets it, and the reset can destroy the answer in flight.
# A larger or open-ended (chunked) body closes the connection instead, unread.
DRAIN_LIMIT = 4 * CONTROL_BODY_LIMIT


async def refuse(exc: TollwayError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer `exc` without reading the body; close the connection when the body left
    unread may be large, so the client cannot stream it into a kept-alive connection."""
    response = render_json(exc)
    declared = declared_length(scope)
    chunked = declared is None and any(name == b"transfer-encoding" for name, _ in scope["headers"])
    if chunked or (declared or 0) > DRAIN_LIMIT:
        response.headers["connection"] = "close"
    await response(scope, receive, send)


def declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before the app runs
    return None


class ControlBodyCap:
    def __init__(self, app: ASGIApp, limit: int = CONTROL_BODY_LIMIT) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        limit = self.limit
        received = 0
        answered = False   # our 413 went out: what the app sends after it is dropped
        started = False    # the app began its own answer: too late for a 413

        async def capped_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = True
            await send(message)

        async def capped_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            if received == 0 and (declared := declared_length(scope)) is not None and declared > limit:
                return await cut_off()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    return await cut_off()
            return message

        async def cut_off() -> Message:
            nonlocal answered
            if not started:
                await refuse(PayloadTooLarge(f"Request body too large: this route accepts at most {limit} bytes."),
                             scope, receive, send)
            answered = True
            # To the app the client is gone: it stops reading and its answer goes nowhere.
            return {"type": "http.disconnect"}

        try:
            await self.app(scope, capped_receive, capped_send)
        except Exception:
            if not answered:
                raise
            # The app failed on the body it was denied (ClientDisconnect); the 413 stands.
