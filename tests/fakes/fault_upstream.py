"""A fault-injecting provider on loopback, for the upstream fault matrix
(tests/test_fault_matrix.py, docs/proxy.md "When the provider fails").

Raw asyncio sockets, not an ASGI app: a fault must land at an exact byte (a reset
before the status line, silence after the headers, a cut inside an event) and a
framework would finish or frame the response itself. Both wire formats are served:
POST /v1/chat/completions answers as OpenAI, POST /v1/messages as Anthropic, JSON or
streamed as the request's `stream` asks. The model the gateway sends, `fault-<case>`,
picks the fault (FAULTS). Every answer is the same two words, "Hello" " there", with
the usage REPORTED unless the case drops it; a stream's fault comes after its PREFIX
(the opening events and both words). Each connection serves one request and is then
closed, so no fault leaks into the gateway's next request through its pool.

`served` records, per request, what was sent and whether the gateway hung up before
the fake had written all it meant to (a body it stopped reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import socket
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

WORDS = ("Hello", " there")
REPORTED = (12, 34)  # the usage a provider reports: prompt, completion tokens
LINE_BYTES = 32 << 20  # the SSE line "over 1 MiB" (and the huge bodies): far over any cap
JSON_LONG_TEXT = 3 << 19  # a valid 1.5 MiB JSON answer: over 1 MiB, under the matrix's response cap
SLOW_INTERVAL = 0.4  # under the stream idle limit, so only the total timeout can stop it
PIECE = 1 << 16
_PIECE_OF_X = b"x" * PIECE


@dataclass
class Served:
    case: str
    wire: str  # "openai" or "anthropic"
    stream: bool
    headers: dict[str, str]
    body: dict[str, Any]
    sent: int = 0  # body bytes written (before compression)
    cut_short: bool = False  # the gateway closed the connection before the fake was done


class Conn:
    """One accepted connection: the request read, helpers to answer it byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served,
                 model: str, key: str) -> None:
        self.reader = reader
        self.writer = writer
        self.served = served
        self.wire, self.stream, self.model, self.key = served.wire, served.stream, model, key
        self.chunked = False
        self.gz: Any = None  # a zlib compressor when the body is gzip-encoded

    async def head(self, status: int, content_type: str, *, length: int | None = None, chunked: bool = False,
                   gzip_body: bool = False, extra: dict[str, str] | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}", f"content-type: {content_type}"]
        if length is not None:
            lines.append(f"content-length: {length}")
        if chunked:
            lines.append("transfer-encoding: chunked")
            self.chunked = True
        if gzip_body:
            lines.append("content-encoding: gzip")
            self.gz = zlib.compressobj(6, zlib.DEFLATED, 31)
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        lines.append("connection: close")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()

    async def send(self, data: bytes, *, flush: bool = True) -> None:
        """Write body bytes (compressed and chunk-framed as the head said)."""
        self.served.sent += len(data)
        if self.gz is not None:
            data = self.gz.compress(data) + (self.gz.flush(zlib.Z_SYNC_FLUSH) if flush else b"")
            if not data:
                return
        if self.chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.writer.write(data)
        await self.writer.drain()

    async def send_many(self, opening: bytes, size: int, closing: bytes) -> None:
        """`opening`, `size` bytes of "x", `closing`, in pieces, each drained (an OSError
        once the gateway hangs up). Nothing of that size is ever held here: the fake's
        memory must not hide the gateway's in the matrix's measurements."""
        await self.send(opening, flush=False)
        for _ in range(size // PIECE):
            await self.send(_PIECE_OF_X, flush=False)
        await self.send(closing)

    async def end(self) -> None:
        """The clean end of the body: the gzip trailer, the last chunk, then FIN."""
        if self.gz is not None:
            tail, self.gz = self.gz.flush(), None
            if tail:
                await self.send(tail)
                self.served.sent -= len(tail)
        if self.chunked:
            self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        self.writer.close()

    async def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0) once what was written has left."""
        while self.writer.transport.get_write_buffer_size():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def hang(self) -> None:
        """Send nothing more until the gateway hangs up (at most 30 s)."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(30):
                while await self.reader.read(PIECE):
                    pass
        self.served.cut_short = True


# --- what an answer looks like in each wire format ------------------------------------------


def _openai_chunk(model: str, delta: dict[str, Any], finish: str | None = None, **more: Any) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1,
                                     "model": model, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}], **more}) + b"\n\n"


def _anthropic_event(name: str, **data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


def delta(wire: str, model: str, text: str) -> bytes:
    """One streamed event carrying `text`."""
    if wire == "openai":
        return _openai_chunk(model, {"content": text})
    return _anthropic_event("content_block_delta", index=0, delta={"type": "text_delta", "text": text})


def stream_events(wire: str, model: str, usage: bool = True) -> tuple[list[bytes], list[bytes]]:
    """(PREFIX: the opening events and both words, the rest: closing events, usage, end marker)."""
    prompt, completion = REPORTED
    if wire == "openai":
        prefix = [_openai_chunk(model, {"role": "assistant", "content": ""})]
        prefix += [delta(wire, model, w) for w in WORDS]
        rest = [_openai_chunk(model, {}, "stop")]
        if usage:
            rest.append(b"data: " + orjson.dumps({"id": "chatcmpl-fault", "object": "chat.completion.chunk",
                                                  "created": 1, "model": model, "choices": [], "usage": {
                                                      "prompt_tokens": prompt, "completion_tokens": completion,
                                                      "total_tokens": prompt + completion}}) + b"\n\n")
        return prefix, [*rest, b"data: [DONE]\n\n"]
    message: dict[str, Any] = {"id": "msg_fault", "type": "message", "role": "assistant", "model": model,
                               "content": [], "stop_reason": None}
    if usage:
        message["usage"] = {"input_tokens": prompt, "output_tokens": 1}
    prefix = [_anthropic_event("message_start", message=message),
              _anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""})]
    prefix += [delta(wire, model, w) for w in WORDS]
    closing: dict[str, Any] = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if usage:
        closing["usage"] = {"output_tokens": completion}
    return prefix, [_anthropic_event("content_block_stop", index=0), _anthropic_event("message_delta", **closing),
                    _anthropic_event("message_stop")]


def answer(wire: str, model: str, *, usage: bool = True, text: str = "".join(WORDS)) -> bytes:
    """A whole non-streaming answer."""
    prompt, completion = REPORTED
    if wire == "openai":
        out: dict[str, Any] = {"id": "chatcmpl-fault", "object": "chat.completion", "created": 1, "model": model,
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]}
        if usage:
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion}
    else:
        out = {"id": "msg_fault", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None}
        if usage:
            out["usage"] = {"input_tokens": prompt, "output_tokens": completion}
    return orjson.dumps(out)


def rate_limit_body(wire: str, key: str) -> bytes:
    message = f"Rate limit reached for key {key} (fragment {key[3:15]}); retry later."
    if wire == "openai":
        return orjson.dumps({"error": {"message": message, "type": "requests", "param": None,
                                       "code": "rate_limit_exceeded"}})
    return orjson.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": message}})


# Garbage between good events: a cut JSON object, binary noise, an HTML page, a comment,
# a data line that is not JSON. None of it ends the stream or carries usage.
GARBAGE = [b'data: {"choices": [{"delta": {"content": "brok\n\n', b"\x00\xff\xfe\x80 noise\n\n",
           b"<html><body>502 Bad Gateway</body></html>\n\n", b": keep-alive comment\n\n", b"data: [NOT JSON]\n\n"]
HTML = b"<html><head><title>502</title></head><body>upstream proxy error</body></html>"
SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"


# --- the faults: one script per case, for either wire format, JSON or stream -----------------
# An OSError (the gateway hung up) ends a script; the handler marks the request cut_short.


async def _reset_before_headers(c: Conn) -> None:
    await c.reset()


async def _headers_then_silence(c: Conn) -> None:
    await c.head(200, SSE if c.stream else JSON, chunked=c.stream,
                 length=None if c.stream else len(answer(c.wire, c.model)))
    await c.hang()


async def _reset_mid_body(c: Conn) -> None:
    body = b"".join(stream_events(c.wire, c.model)[0]) if c.stream else answer(c.wire, c.model)
    await c.head(200, SSE if c.stream else JSON, chunked=c.stream, length=None if c.stream else len(body))
    await c.send(body if c.stream else body[:len(body) // 2])
    await c.reset()


async def _truncated(c: Conn) -> None:
    if c.stream:  # the body ends cleanly inside an event, before the end marker
        cut = delta(c.wire, c.model, " and then")
        await c.head(200, SSE, chunked=True)
        await c.send(b"".join(stream_events(c.wire, c.model)[0]) + cut[:len(cut) // 2])
    else:  # no length: the body ends where the connection does, mid-object
        body = answer(c.wire, c.model)
        await c.head(200, JSON)
        await c.send(body[:len(body) // 2])
    await c.end()


async def _garbage(c: Conn) -> None:
    prefix, rest = stream_events(c.wire, c.model)
    body = (b"".join([*prefix, *GARBAGE, *rest]) if c.stream
            else answer(c.wire, c.model) + b"\x00\xff<html>trailing garbage</html>")
    await c.head(200, SSE if c.stream else JSON, chunked=c.stream, length=None if c.stream else len(body))
    await c.send(body)
    await c.end()


async def _long_line(c: Conn) -> None:
    if c.stream:  # one event of LINE_BYTES, then the rest as if nothing happened
        prefix, rest = stream_events(c.wire, c.model)
        opening, closing = delta(c.wire, c.model, "@@").split(b"@@")
        await c.head(200, SSE, chunked=True)
        await c.send(b"".join(prefix))
        await c.send_many(opening, LINE_BYTES, closing)
        await c.send(b"".join(rest))
    else:  # a valid answer, one line of JSON over 1 MiB
        body = answer(c.wire, c.model, text="x" * JSON_LONG_TEXT)
        await c.head(200, JSON, length=len(body))
        await c.send(body)
    await c.end()


async def _huge_body(c: Conn) -> None:
    """LINE_BYTES of bytes that are neither JSON nor SSE, with no blank line."""
    await c.head(200, SSE if c.stream else JSON, chunked=c.stream, length=None if c.stream else LINE_BYTES)
    await c.send_many(b"".join(stream_events(c.wire, c.model)[0]) if c.stream else b"", LINE_BYTES, b"")
    await c.end()


async def _gzip_bomb(c: Conn) -> None:
    """_huge_body gzip-encoded: LINE_BYTES of one byte is about 32 KiB of gzip."""
    body = _bomb(b"".join(stream_events(c.wire, c.model)[0]) if c.stream else b"")
    await c.head(200, SSE if c.stream else JSON, length=len(body), extra={"content-encoding": "gzip"})
    c.writer.write(body)
    c.served.sent = LINE_BYTES
    await c.end()


@functools.cache
def _bomb(prefix: bytes) -> bytes:
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [gz.compress(prefix)]
    out += [gz.compress(_PIECE_OF_X) for _ in range(LINE_BYTES // PIECE)]
    return b"".join([*out, gz.flush()])


async def _non_json_200(c: Conn) -> None:
    await c.head(200, "text/html; charset=utf-8", length=len(HTML))
    await c.send(HTML)
    await c.end()


async def _whole(c: Conn, *, usage: bool = True, compressed: bool = False) -> None:
    """A complete, valid answer (gzip-encoded: each event flushed on its own, as a server
    compressing a stream does)."""
    if c.stream:
        prefix, rest = stream_events(c.wire, c.model, usage)
        await c.head(200, SSE, chunked=True, gzip_body=compressed)
        for ev in (*prefix, *rest):
            await c.send(ev)
    else:
        body = answer(c.wire, c.model, usage=usage)
        wire = gzip.compress(body) if compressed else body
        await c.head(200, JSON, length=len(wire), extra={"content-encoding": "gzip"} if compressed else None)
        c.served.sent = len(body)
        c.writer.write(wire)
    await c.end()


async def _no_usage(c: Conn) -> None:
    await _whole(c, usage=False)


async def _gzip(c: Conn) -> None:
    await _whole(c, compressed=True)


async def _slow(c: Conn) -> None:
    """Never silent for a whole idle limit, never done within the request timeout."""
    if c.stream:
        await c.head(200, SSE, chunked=True)
        await c.send(b"".join(stream_events(c.wire, c.model)[0]))
        while True:
            await asyncio.sleep(SLOW_INTERVAL)
            await c.send(delta(c.wire, c.model, " w"))
    body = answer(c.wire, c.model)
    await c.head(200, JSON, length=len(body))
    for i in range(len(body)):
        await asyncio.sleep(SLOW_INTERVAL)
        await c.send(body[i:i + 1])
    await c.end()


async def _rate_limited(c: Conn) -> None:
    body = rate_limit_body(c.wire, c.key)
    await c.head(429, JSON, length=len(body), extra={"retry-after": "7", "x-ratelimit-remaining-requests": "0"})
    await c.send(body)
    await c.end()


FAULTS: dict[str, Callable[[Conn], Awaitable[None]]] = {
    "reset_before_headers": _reset_before_headers,
    "headers_then_silence": _headers_then_silence,
    "reset_mid_body": _reset_mid_body,
    "truncated": _truncated,
    "garbage": _garbage,
    "long_line": _long_line,
    "huge_body": _huge_body,
    "gzip_bomb": _gzip_bomb,
    "non_json_200": _non_json_200,
    "no_usage": _no_usage,
    "gzip": _gzip,
    "slow": _slow,
    "rate_limited": _rate_limited,
}


@dataclass
class FaultUpstream:
    """The fake provider, serving on its own thread and event loop: start() / stop()."""

    keys: dict[str, str]  # wire -> the provider key it expects (and echoes in its errors)
    served: list[Served] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
            body = orjson.loads(await reader.readexactly(int(headers.get("content-length", "0"))))
            wire = "anthropic" if request_line.split()[1].endswith("/messages") else "openai"
            model = str(body.get("model", ""))
            served = Served(model.removeprefix("fault-"), wire, bool(body.get("stream")), headers, body)
            self.served.append(served)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            return
        try:
            await FAULTS[served.case](Conn(reader, writer, served, model, self.keys[wire]))
        except OSError:
            served.cut_short = True
        finally:
            writer.close()
