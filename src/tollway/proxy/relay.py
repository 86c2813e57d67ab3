"""The streaming relay: an ASGI response that passes an upstream SSE stream through.

Per upstream read: split complete events, let the adapter's meter rewrite the model
name and read usage (byte searches; a JSON parse only for the usage event), send
everything in one ASGI message. No task and no buffer per chunk: one watcher task per
stream listens for the client going away, one timer per stream bounds it, and only the
unfinished tail of an event is kept between reads, at most EVENT_CAP (1 MiB).

The deadline. The whole relay, the sends to the client included, ends by `deadline`
(server.request_timeout_seconds after the call started): a client that stops reading
leaves the server's send waiting on a full socket with no limit of its own, and the
upstream client's total timeout does not cover that wait. Its request stays served
(Ledger.live) until it settles, so the sweep never releases its hold meanwhile. A relay
waiting on the provider at the deadline is left to the upstream client's own total
timeout (`upstream_timeout`): the provider is the late one, not the client.

Endings, each settled exactly once by `on_end` (shielded from cancellation):
  normal end              -> usage from the stream (or an estimate when none came); a
                             translated stream's closing events (`Ending`) are written
                             after the settle, with the usage it billed
  upstream stall / error  -> an SSE error event to the client, then an estimate (the
  / event over EVENT_CAP     conservative rule for a stall or the total timeout); an
                             event the body's end cut in half is dropped, not relayed
  client disconnect, or   -> the rest of the stream is read without forwarding it, within
  the deadline passed        `RelayLimits`, for the provider's own usage (the drain); the
                             pipeline bills that usage, or else its conservative rule
                             (docs/proxy.md). Past the deadline the client gets an error
                             event if it reads again within ERROR_EVENT_GRACE, or the
                             connection is closed after what was already sent.
  the server's drain      -> (a cancellation not the relay's own: serving.py) nothing is
  deadline                   read on, the pipeline bills the conservative rule, and the
                             client gets a `server_shutting_down` error event.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from starlette.types import Message, Receive, Scope, Send

from tollway.errors import TollwayError, UpstreamError
from tollway.money import Usage
from tollway.privacy import scrub
from tollway.providers.base import StreamMeter, UpstreamResponse, sse_data

_ERROR_KEY = b'"error"'
# An error object or an error event; not `"error":null`, which every Responses lifecycle
# event carries (scrubbing those would mask the response and item ids the client matches).
_ERROR = re.compile(rb'"error"\s*:\s*[^n\s]|"type"\s*:\s*"error"')
DRAIN_SECONDS = 1.0  # after the end marker, for the body's terminator
ERROR_EVENT_GRACE = 1.0  # past the deadline: how long the error event may wait for a stalled client
DRAIN_EVENT_CAP = 262_144  # draining, a longer unfinished event is skipped (usage events are small)
# The longest event relayed: a provider's events are deltas of a few hundred bytes; one
# that runs on past this (a line with no end, a body that is not SSE) stops the stream
# rather than being held in memory whole (docs/proxy.md, the fault matrix).
EVENT_CAP = 1_048_576
T = TypeVar("T")


class StreamDeadline(TollwayError):
    status, type, code = 504, "timeout_error", "stream_deadline"


class ShuttingDown(TollwayError):
    status, type, code = 503, "server_error", "server_shutting_down"


SHUTDOWN_MESSAGE = "The gateway is restarting and stopped this request before it finished; retry it."


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """After a client left (or the deadline passed): how long and how much of the
    provider's stream is still read for its usage (server.disconnect_drain_*)."""

    drain_seconds: float
    drain_bytes: int


class Ending(Protocol):
    """The end of a stream the gateway translates: the client's format has closing events
    of its own, which carry usage, so the relay writes them after the settle, with the
    usage billed (the estimate when the provider reported none: docs/proxy.md)."""

    def finished(self) -> bool:
        """The provider's answer came to its finish, whether or not its end marker followed."""
        ...

    def closing(self, billed: Usage | None) -> bytes:
        """The client's closing events, each with its blank line."""
        ...


@dataclass(slots=True)
class StreamEnd:
    meter: StreamMeter
    error: TollwayError | None = None  # the upstream failed mid-stream
    client_gone: bool = False
    timed_out: bool = False  # the deadline passed before the stream was delivered
    stopped: bool = False  # the server's drain deadline passed before the stream was delivered
    complete: bool = False  # the provider's stream was read to its end marker or its end
    # Cancelling the relay's task (watcher, deadline) is allowed only while it sends or
    # reads the stream: never while it drains or settles.
    cancellable: bool = True
    cancel_pending: bool = False  # a cancel() of ours not yet received by the task
    settled: bool = False
    billed: Usage | None = None  # what the settle charged for (on_end sets it)


class Relay:
    def __init__(self, resp: UpstreamResponse, meter: StreamMeter, headers: list[tuple[bytes, bytes]],
                 error_event: Callable[[TollwayError], bytes], secrets: Iterable[str],
                 on_end: Callable[[StreamEnd], Awaitable[None]], deadline: float, limits: RelayLimits,
                 ending: Ending | None = None) -> None:
        self.resp = resp
        self.meter = meter
        self.headers = headers
        self.error_event = error_event
        self.secrets = tuple(secrets)
        self.on_end = on_end
        self.deadline = deadline  # the event loop's time by which the relay ends
        self.limits = limits
        self.ending = ending  # a translated stream's: its closing events replace the end marker
        self.ended = False  # the provider's stream reached its end: what ends the client's follows the settle
        self.tail = b""  # the end marker ([DONE], message_stop), held back until settled
        self.held = b""  # events that arrived in the same read as the end marker: sent with it
        self.buf = b""  # the unfinished event the pump was stopped in (set only then)
        self.drained = False  # the upstream body was read to its end: the connection is reusable
        self.awaiting_provider = False  # the pump waits on the provider's next bytes, not on the client
        self.timer: asyncio.TimerHandle | None = None  # the deadline's (`_at_deadline`)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        end = StreamEnd(self.meter)
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(_watch(receive, task, end))
        self.timer = asyncio.get_running_loop().call_at(self.deadline, self._at_deadline, task, end)
        try:
            await self._run(send, task, end)
        finally:
            if self.timer is not None:
                self.timer.cancel()
            watcher.cancel()
            # A cancellation `_run` could not take back (during the read-on, or a second one):
            # settle what is known as a stream the drain cut, then let it propagate.
            if not end.settled:
                self.resp.close()
                end.settled, end.stopped = True, True
                await shielded(self.on_end(end))

    async def _run(self, send: Send, task: asyncio.Task[Any], end: StreamEnd) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            end.error = await self._pump(send)
        except asyncio.CancelledError:
            _absorb(task, end)
        except OSError:
            end.client_gone = True  # a server that reports a closed socket on send
        end.cancellable = False
        if end.cancel_pending:  # rare: asked for just as the pump returned; it lands at the next await
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                _absorb(task, end)
        if (end.client_gone or end.timed_out) and not end.stopped:
            await self._read_on_for_usage()
        end.complete = self.meter.done or self.drained
        if self.drained:
            self.resp.release()
        else:
            self.resp.close()  # the provider stops generating
        end.settled = True
        try:
            await shielded(self.on_end(end))
        except asyncio.CancelledError:
            _absorb(task, end)  # the drain's deadline came during the settle: the answer still goes out
        if end.client_gone:
            return
        if end.stopped and not self.ended and not end.complete:
            last = self.error_event(ShuttingDown(SHUTDOWN_MESSAGE))
        elif end.timed_out and not self.ended:  # the client never got to the end marker
            last = self.error_event(StreamDeadline(
                "The stream was not read within the gateway's request timeout; it was stopped."))
        else:
            # The end marker goes out after the settle, so a client that saw the end of its
            # stream (SDKs stop reading at [DONE]) also sees its charge.
            if self.ending is not None and self.ended:
                self.tail = self.ending.closing(end.billed)
            last = self.held + self.tail
        loop = asyncio.get_running_loop()
        late = (loop.call_later(ERROR_EVENT_GRACE, _expire, task, end)
                if end.stopped or loop.time() >= self.deadline else None)
        end.cancellable = True
        try:
            await send({"type": "http.response.body", "body": last, "more_body": False})
        except asyncio.CancelledError:
            # Never read: return with the response unfinished, and the server closes the
            # connection once what was already sent has gone out.
            _absorb(task, end)
        finally:
            end.cancellable = False
            if late is not None:
                late.cancel()

    def _at_deadline(self, task: asyncio.Task[Any], end: StreamEnd) -> None:
        """The deadline: a relay sending to its client is stopped (`_expire`). One waiting on
        the provider is not: that provider is the late one, and the upstream client's total
        timeout (the same request_timeout, begun a moment later) ends its read with
        `upstream_timeout`, an error event and the rule for a stream the gateway cut; past
        ERROR_EVENT_GRACE more, the relay is stopped whatever it waits on."""
        if self.awaiting_provider:
            self.timer = asyncio.get_running_loop().call_later(ERROR_EVENT_GRACE, _expire, task, end)
        else:
            _expire(task, end)

    async def _read_on_for_usage(self) -> None:
        """The drain: the client is gone (or past the deadline), the provider's usage is not
        known yet. Read on, forwarding nothing and keeping only an unfinished event (at
        most DRAIN_EVENT_CAP), to the stream's end or until `limits` are reached."""
        meter = self.meter
        if meter.done:
            return
        # On to the end even when a usage came: some providers report a running one.
        buf, read, skipping = self.buf, 0, False
        self.buf = b""
        try:
            async with asyncio.timeout(self.limits.drain_seconds):
                while not meter.done:
                    chunk = await self.resp.chunk()
                    if not chunk:
                        self.drained = True
                        if buf.strip() and not skipping:
                            meter.feed(buf.strip())
                        return
                    read += len(chunk)
                    if read > self.limits.drain_bytes:
                        return  # the caps are the operator's: past them, the conservative rule
                    buf = buf + chunk if buf else chunk
                    if b"\r" in buf:
                        buf = buf.replace(b"\r\n", b"\n")
                    if b"\n\n" not in buf:
                        if len(buf) > DRAIN_EVENT_CAP:
                            buf, skipping = b"", True
                        continue
                    *events, buf = buf.split(b"\n\n")
                    for ev in events[1:] if skipping else events:
                        if ev:
                            meter.feed(ev)
                    skipping = False
                await self._drain()
        except (TimeoutError, UpstreamError):
            pass  # the usage stays unknown: the pipeline's conservative rule

    async def _pump(self, send: Send) -> TollwayError | None:
        meter = self.meter
        buf = b""
        try:
            while True:
                if meter.done:
                    await self._drain()
                    return None
                self.awaiting_provider = True
                try:
                    chunk = await self.resp.chunk()
                except UpstreamError as exc:
                    self.awaiting_provider = False
                    return await self._fail(send, exc)
                self.awaiting_provider = False
                if not chunk:
                    self.drained = True
                    break
                buf = buf + chunk if buf else chunk
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                if b"\n\n" not in buf:
                    if len(buf) > EVENT_CAP:
                        return await self._fail(send, UpstreamError(
                            "The model provider sent an event over 1 MiB; the stream was stopped.",
                            code="upstream_invalid_response"))
                    continue
                *events, buf = buf.split(b"\n\n")
                out = self._feed(events)
                if meter.done:
                    # The end marker came in this read: these bytes go out with it, after the
                    # settle, in one write (a provider usually sends usage and [DONE] together).
                    self.held = out
                elif out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except (asyncio.CancelledError, OSError):
            self.buf = buf  # the drain after a disconnect goes on from this unfinished event
            self.awaiting_provider = False
            raise
        # Per the SSE spec an event cut by the end of the stream is discarded; one that only
        # lacks its blank line (`data: [DONE]` and the connection closed) is taken.
        tail = buf.strip()
        out = self._feed([tail]) if tail and _complete(tail) else b""
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
        if self._cut():
            return await self._fail(send, UpstreamError(
                "The model provider closed the stream before it finished.", code="upstream_stream_cut"))
        if self.ending is not None:
            self.ended = True  # its answer is whole: the client's closing events follow the settle
        return None

    def _cut(self) -> bool:
        """The body ended before the answer did (no end marker). A same-format stream is
        whole when its final usage came (it follows the finish; telling the finish apart
        would take a parse per event); a translated one when its finish came, which its
        converter, parsing every event, knows (issue #27)."""
        meter = self.meter
        if meter.done:
            return False
        if self.ending is not None:
            return not self.ending.finished()
        usage = meter.usage()
        return usage is None or usage.estimated

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
            if not ev or self.ended:
                continue
            sent = self.meter.feed(ev)
            if self.meter.done:
                self.ended = True
                if sent is not None:  # None: a translated stream's, whose `ending` writes it
                    self.tail = sent + b"\n\n"
                continue
            if sent is None:
                continue
            if _ERROR_KEY in sent and _ERROR.search(sent):
                # A provider's error event may echo the operator's key.
                sent = scrub(sent.decode("utf-8", "replace"), self.secrets).encode()
            out.append(sent)
            out.append(b"\n\n")
        return b"".join(out)

    async def _fail(self, send: Send, exc: TollwayError) -> TollwayError:
        await send({"type": "http.response.body", "body": self.error_event(exc), "more_body": True})
        return exc


def _complete(event: bytes) -> bool:
    data = sse_data(event)
    if data == b"[DONE]":
        return True
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


async def _watch(receive: Receive, task: asyncio.Task[Any], end: StreamEnd) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            end.client_gone = True
            _cancel(task, end)
            return


def _expire(task: asyncio.Task[Any], end: StreamEnd) -> None:
    """The deadline (or the error event's grace) passed: stop the send or read in progress.
    Passing while the relay drains or settles, it changes nothing: those have their own bounds."""
    if end.cancellable:
        end.timed_out = True
        _cancel(task, end)


def _cancel(task: asyncio.Task[Any], end: StreamEnd) -> None:
    if end.cancellable and not end.cancel_pending:
        end.cancel_pending = True
        task.cancel()


def _absorb(task: asyncio.Task[Any], end: StreamEnd) -> None:
    """Take back a cancellation: ours (watcher, deadline), or the server's, which cancels
    what still runs at its drain deadline: the stream is then `stopped` (it ends with an
    error event and is settled, unless cancelled once more: `__call__`)."""
    if end.cancel_pending:
        end.cancel_pending = False
        if not task.uncancel():
            return
    if end.stopped:
        raise asyncio.CancelledError  # a second one: the process is going away
    end.stopped = True
    while task.uncancel():
        pass


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
