"""When a failed upstream attempt is tried again, and how long to wait first.

Only what failed before any byte reached the client is ever retried (pipeline.py's
`_recover` is called only then): a connection error or timeout (proxy/upstream.py), or
an answer with status 408, 429 or 5xx. Any other 4xx says the request itself is wrong and
would fail again, except 401/403: the provider refused the gateway's credentials, so the
next fallback is tried (the same model is not retried). A provider's `x-should-retry:
false` stops retries of that model (its fallbacks are still tried).

Waits: before retry n (0-based) of one model, `retry_backoff_ms` x 2^n, jittered between
half and all of it so that many clients failing together do not come back together; or
the provider's own `retry-after-ms` / `retry-after` (seconds or an HTTP date) when it sent
one, up to `retry_after_cap_seconds`: above the cap that model is given up at once and the
next fallback is tried. A client that leaves during a wait ends it (`pause`).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import time

from starlette.types import Receive

_SECONDS = ("retry-after-ms", 0.001), ("retry-after", 1.0)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # retries of one model after its first try
    backoff: float  # seconds before the first retry
    after_cap: float  # longest provider retry-after honoured, seconds

    def delay(self, retry: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number `retry` of a model, or None: give it up."""
        if retry >= self.attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.after_cap else None
        full: float = self.backoff * 2.0 ** retry
        return full / 2 + random.uniform(0, full / 2)  # jitter, not a secret


def retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def moves_on(status: int) -> bool:
    """A failure after which the next fallback is tried: a retryable one, or the provider
    refusing the gateway's own credentials (401/403: that provider is down for us, and the
    client's request is not at fault)."""
    return retryable(status) or status in (401, 403)


def should_retry(headers: list[tuple[str, str]]) -> bool:
    """False when the provider said not to (`x-should-retry: false`, as OpenAI sends it)."""
    return not any(k.lower() == "x-should-retry" and v.strip().lower() == "false" for k, v in headers)


def retry_after(headers: list[tuple[str, str]]) -> float | None:
    """The provider's requested wait in seconds, from retry-after-ms or retry-after; None
    when it sent none that can be read."""
    found = {k.lower(): v for k, v in headers if k.lower() in ("retry-after-ms", "retry-after")}
    for name, unit in _SECONDS:
        value = found.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * unit
        except ValueError:
            if name != "retry-after":
                continue
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time()
            except (TypeError, ValueError):
                continue
        if seconds == seconds and seconds != float("inf"):  # not NaN, finite
            return max(seconds, 0.0)
    return None


async def pause(seconds: float, receive: Receive) -> bool:
    """Wait `seconds`; True if the client disconnected meanwhile (the wait ends then). The
    request body was read in full, so the next message a client can send is its disconnect."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        waiter = asyncio.ensure_future(receive())
        try:
            done, _ = await asyncio.wait((waiter,), timeout=left)
        finally:
            if not waiter.done():
                waiter.cancel()
        if not done:
            return False
        if waiter.result().get("type") == "http.disconnect":
            return True
    return False
