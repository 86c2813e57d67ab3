"""The streaming relay: an ASGI response that passes an upstream SSE stream through.

Per upstream read: split complete events, let the adapter's meter rewrite the model
name and read usage (byte searches; a JSON parse only for the usage event), send
everything in one ASGI message. No task and no buffer per chunk: one watcher task per
stream listens for the client going away, and only the unfinished tail of an event is
kept between reads.

Endings, each settled exactly once by `on_end` (shielded from cancellation):
  normal end              -> usage from the stream (or an estimate when none came)
  upstream stall / error  -> an SSE error event to the client, then an estimate
  client disconnect       -> the upstream connection is closed (the provider stops
                             generating), the watcher cancels the pump, estimate of
                             what was delivered unless usage already arrived
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.types import Message, Receive, Scope, Send

from tollway.errors import TollwayError, UpstreamError
from tollway.privacy import scrub
from tollway.providers.base import StreamMeter, UpstreamResponse

_ERROR_KEY = b'"error":'
DRAIN_SECONDS = 1.0
T = TypeVar("T")


@dataclass(slots=True)
class StreamEnd:
    meter: StreamMeter
    error: TollwayError | None = None  # the upstream failed mid-stream
    client_gone: bool = False


class Relay:
    def __init__(self, resp: UpstreamResponse, meter: StreamMeter, headers: list[tuple[bytes, bytes]],
                 error_event: Callable[[TollwayError], bytes], secrets: Iterable[str],
                 on_end: Callable[[StreamEnd], Awaitable[None]]) -> None:
        self.resp = resp
        self.meter = meter
        self.headers = headers
        self.error_event = error_event
        self.secrets = tuple(secrets)
        self.on_end = on_end
        self.tail = b""  # the end marker ([DONE], message_stop), held back until settled
        self.held = b""  # events that arrived in the same read as the end marker: sent with it
        self.drained = False  # the upstream body was read to its end: the connection is reusable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        end = StreamEnd(self.meter)
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(_watch(receive, task, end))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            end.error = await self._pump(send)
        except asyncio.CancelledError:
            if not end.client_gone:
                raise  # server shutdown: settle below, then let it propagate
            task.uncancel()
        except OSError:
            end.client_gone = True  # a server that reports a closed socket on send
        finally:
            watcher.cancel()
            if self.drained:
                self.resp.release()
            else:
                self.resp.close()  # the provider stops generating
            await shielded(self.on_end(end))
        if not end.client_gone:
            # The end marker goes out after the settle, so a client that saw the end of its
            # stream (SDKs stop reading at [DONE]) also sees its charge.
            await send({"type": "http.response.body", "body": self.held + self.tail, "more_body": False})

    async def _pump(self, send: Send) -> TollwayError | None:
        meter = self.meter
        buf = b""
        while True:
            if meter.done:
                await self._drain()
                return None
            try:
                chunk = await self.resp.chunk()
            except UpstreamError as exc:
                return await self._fail(send, exc)
            if not chunk:
                self.drained = True
                break
            buf = buf + chunk if buf else chunk
            if b"\r" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            if b"\n\n" not in buf:
                continue
            *events, buf = buf.split(b"\n\n")
            out = self._feed(events)
            if meter.done:
                # The end marker came in this read: these bytes go out with it, after the
                # settle, in one write (a provider usually sends usage and [DONE] together).
                self.held = out
            elif out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        out = self._feed([buf.strip()]) if buf.strip() else b""
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
        usage = meter.usage()
        if not meter.done and (usage is None or usage.estimated):
            return await self._fail(send, UpstreamError(
                "The model provider closed the stream before it finished.", code="upstream_stream_cut"))
        return None

    async def _drain(self) -> None:
        """After the end marker only the body's terminator should follow; a provider that
        keeps the stream open is not waited for (its connection is closed, not reused)."""
        if self.resp.at_end():  # the usual case, without a timer
            self.drained = True
            return
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while await self.resp.chunk():
                    pass
            self.drained = True
        except (TimeoutError, UpstreamError):
            pass

    def _feed(self, events: list[bytes]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            if not ev or self.tail:
                continue
            sent = self.meter.feed(ev)
            if sent is None:
                continue
            if self.meter.done:
                self.tail = sent + b"\n\n"
                continue
            if _ERROR_KEY in sent:
                # A provider's error event may echo the operator's key.
                sent = scrub(sent.decode("utf-8", "replace"), self.secrets).encode()
            out.append(sent)
            out.append(b"\n\n")
        return b"".join(out)

    async def _fail(self, send: Send, exc: TollwayError) -> TollwayError:
        await send({"type": "http.response.body", "body": self.error_event(exc), "more_body": True})
        return exc


async def _watch(receive: Receive, task: asyncio.Task[Any], end: StreamEnd) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            end.client_gone = True
            task.cancel()
            return


async def shielded(aw: Awaitable[T]) -> T:
    """Run `aw` (a settle) to completion even if this task is cancelled meanwhile; a
    cancellation that arrived in between is re-raised afterwards."""
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break  # fut is done; its error is raised below
    if cancelled:
        raise asyncio.CancelledError
    return fut.result()
