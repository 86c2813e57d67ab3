"""The control routes (/admin, /webhooks, everything outside /v1) read no body byte before
the caller is authorised and never more than CONTROL_BODY_LIMIT: a real server on
loopback, raw sockets for the huge bodies, and a count of the body bytes the app pulled."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from tests.conftest import ServerThread
from tollway.app import create_app
from tollway.bodycap import CONTROL_BODY_LIMIT, DRAIN_LIMIT
from tollway.config import Config

TOKEN = "admin-token-for-bodycap-tests-0123"
HUGE = 120 << 20


class Counted:
    """The gateway, with a count of the request-body bytes anything inside it received."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.body_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting() -> Message:
            message = await receive()
            self.body_bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counting if scope["type"] == "http" else receive, send)


@pytest.fixture
def served(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
           monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], tuple[ServerThread, Counted]]:
    def start(token: bool) -> tuple[ServerThread, Counted]:
        if token:
            monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
        else:
            monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
        counted = Counted(create_app(make_config(), provider_keys={}, migrate=True))
        return serve_app(counted), counted

    return start


def push(port: int, head: bytes, body_size: int, *, chunked: bool = False) -> tuple[int, bytes]:
    """Send `head`, then up to `body_size` body bytes for as long as the server reads them;
    stop at its answer. -> (body bytes the socket accepted, the answer)."""
    piece = b"x" * (256 << 10)
    sent, answer, pending = 0, b"", b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        s.setblocking(False)
        while True:
            more = pending or sent < body_size
            readable, writable, _ = select.select([s], [s] if more else [], [], 30)
            if readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer += data
                if b"\r\n\r\n" in answer:
                    head_end = answer.index(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in answer[:head_end].split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), None)
                    if length is not None and len(answer) >= head_end + 4 + length:
                        break
                continue
            if not writable:
                raise AssertionError("neither an answer nor a reading server")
            if not pending:
                out = piece[: body_size - sent]
                pending = b"%x\r\n" % len(out) + out + b"\r\n" if chunked else out
                sent += len(out)
            try:
                pending = pending[s.send(pending):]
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed on an unread body; its answer is already here
        if b"\r\n\r\n" not in answer:
            answer += drain(s)
    return sent, answer


def drain(s: socket.socket) -> bytes:
    s.setblocking(True)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def status_and_json(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def post_head(path: str, *, length: int | None, token: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json"]
    lines.append(f"content-length: {length}" if length is not None else "transfer-encoding: chunked")
    if token:
        lines.append(f"authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("token_set", [True, False])
def test_unauthenticated_huge_admin_post_is_refused_unread(served: Callable[[bool], tuple[ServerThread, Counted]],
                                                           token_set: bool) -> None:
    server, counted = served(token_set)
    for head in (post_head("/admin/tenants", length=HUGE), post_head("/admin/tenants", length=None),
                 post_head("/admin/tenants", length=HUGE, token="wrong-token")):
        sent, answer = push(server.port, head, HUGE, chunked=b"chunked" in head)
        status, body = status_and_json(answer)
        assert status == (401 if token_set else 404), answer[:300]
        assert body["error"]["message"]
        # What the socket buffers hold at most; the body itself was never read.
        assert sent < 32 << 20, sent
    assert counted.body_bytes == 0


def test_authenticated_admin_body_over_the_cap_is_413(served: Callable[[bool], tuple[ServerThread, Counted]]
                                                      ) -> None:
    server, counted = served(True)
    sent, answer = push(server.port, post_head("/admin/tenants", length=HUGE, token=TOKEN), HUGE)
    status, body = status_and_json(answer)
    assert status == 413 and body["error"]["code"] == "request_too_large", answer[:300]
    assert str(CONTROL_BODY_LIMIT) in body["error"]["message"]
    assert sent < 32 << 20 and counted.body_bytes == 0
    # Chunked, no Content-Length: cut off while streaming, just past the cap.
    sent, answer = push(server.port, post_head("/admin/tenants", length=None, token=TOKEN), HUGE, chunked=True)
    status, body = status_and_json(answer)
    assert status == 413 and body["error"]["code"] == "request_too_large", answer[:300]
    assert CONTROL_BODY_LIMIT < counted.body_bytes <= CONTROL_BODY_LIMIT + (1 << 20)
    assert sent < 48 << 20, sent
    # Within the cap, everything works as before.
    r = httpx.post(server.url + "/admin/tenants", json={"name": "Ada"}, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["tenant_id"].startswith("tn_")


def test_routes_that_read_no_body_buffer_none(served: Callable[[bool], tuple[ServerThread, Counted]]) -> None:
    server, counted = served(True)
    for path in ("/healthz", "/nowhere"):
        _, answer = push(server.port, post_head(path, length=HUGE), HUGE)
        assert int(answer.split(b" ")[1]) in (404, 405), answer[:300]
    assert counted.body_bytes == 0


async def test_a_modest_refused_body_still_gets_its_answer(
        served: Callable[[bool], tuple[ServerThread, Counted]]) -> None:
    """Closing on an unread body resets the connection, which can destroy the answer in
    flight: a body up to DRAIN_LIMIT is left for the server to discard instead."""
    server, counted = served(True)
    for _ in range(10):
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            r = await http.post("/admin/tenants", content=b"x" * (CONTROL_BODY_LIMIT + 10),
                                headers={"authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            r = await http.post("/admin/tenants", content=b"x" * (DRAIN_LIMIT - 1),
                                headers={"authorization": "Bearer no"})
            assert r.status_code == 401
    assert counted.body_bytes == 0
