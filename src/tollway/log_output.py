"""Where log lines go: stdout (the serving process) or stderr (CLI commands), written
in batches by the event loop.

telemetry.py decides what a line holds (the allow-list) and renders it; this module
only writes finished lines out.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
import threading
from typing import Literal, TextIO

_stream = ["stdout"]  # the serving process logs to stdout; CLI commands to stderr


def set_log_stream(name: Literal["stdout", "stderr"]) -> None:
    """CLI commands print their result on stdout, so their log lines go to stderr."""
    _stream[0] = name


# Info lines written on the event loop reach the stream at most this much later, or once
# this many are waiting.
LOG_FLUSH_SECONDS = 0.1
LOG_BATCH_LINES = 256


class _Batch:
    """Info lines waiting for the event loop to write them, and where they go. The lock:
    other threads (the checkpoint thread's warnings) flush too."""

    lines: list[str] = []
    stream: TextIO | None = None
    loop: asyncio.AbstractEventLoop | None = None
    lock = threading.Lock()


class LineWriter:
    """Writes to whatever sys.stdout (or stderr) is at the time (pytest swaps them per test).

    Why not write and flush every line: that was a system call per /v1 request (with
    PYTHONUNBUFFERED, as in most containers, even without the flush). Info lines logged
    while an event loop runs are kept here and written together by the loop within
    LOG_FLUSH_SECONDS; warnings and errors, and every line logged with no loop running
    (CLI commands), are written at once, after whatever was waiting."""

    def msg(self, message: str) -> None:
        out = getattr(sys, _stream[0])
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.msg_now(message)
            return
        stale: tuple[list[str], TextIO | None] | None = None
        with _Batch.lock:
            if _Batch.stream is out and _Batch.loop is loop:
                _Batch.lines.append(message)
                full = len(_Batch.lines) >= LOG_BATCH_LINES
            else:  # the first line of a batch, or another stream (pytest) or loop (maybe gone)
                stale = (_Batch.lines, _Batch.stream)
                _Batch.lines, _Batch.stream, _Batch.loop = [message], out, loop
                full = False
        if stale is not None:
            _write(*stale)
            loop.call_later(LOG_FLUSH_SECONDS, flush_log)
        if full:
            flush_log()

    def msg_now(self, message: str) -> None:
        flush_log()
        out = getattr(sys, _stream[0])
        out.write(message + "\n")
        out.flush()

    debug = info = msg
    log = warn = warning = error = critical = exception = fatal = msg_now


def flush_log() -> None:
    """Write the info lines still waiting (also at exit, so a process that stops
    normally loses none)."""
    with _Batch.lock:
        lines, stream = _Batch.lines, _Batch.stream
        _Batch.lines, _Batch.stream, _Batch.loop = [], None, None
    _write(lines, stream)


def _write(lines: list[str], stream: TextIO | None) -> None:
    if lines and stream is not None:
        with contextlib.suppress(ValueError, OSError):  # closed meanwhile (a test's capture)
            stream.write("\n".join(lines) + "\n")
            stream.flush()


atexit.register(flush_log)


class LineWriterHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if record.levelno >= logging.WARNING:
                LineWriter().msg_now(line)
            else:
                LineWriter().msg(line)
        except Exception:
            self.handleError(record)
