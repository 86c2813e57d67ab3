"""The single pooled HTTP client to providers.

One aiohttp ClientSession per worker process (its connector costs less CPU per request
than httpx's). Transport failures become UpstreamError here and nowhere else; their
messages are Tollway's own and never quote the exception, which names hosts (a
Cloudflare AI Gateway URL holds the operator's account id).

Timeouts: every call has `request_timeout_seconds` in total (a retry or a fallback gets
what is left of it: UpstreamRequest.timeout); a stream also has
`stream_idle_timeout_seconds` between two reads, enforced by aiohttp's socket-read timer
(reset on each read, no task or timer object per chunk). A non-streaming body is read
up to server.max_response_bytes, counted after decoding (a gzip bomb stops there too).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from tollway.errors import UpstreamError, UpstreamTimeout
from tollway.providers.base import UpstreamRequest, UpstreamResponse

# Streams are long-lived: the pool must not queue the 101st concurrent stream behind
# the others (aiohttp's default limit is 100).
POOL_LIMIT = 1024
CONNECT_TIMEOUT = 10.0


class HttpResponse:
    """An aiohttp response whose read errors are already UpstreamErrors."""

    __slots__ = ("_idle", "_resp", "_total", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, total: float, idle: float | None) -> None:
        self._resp = resp
        self._total = total
        self._idle = idle
        self.status = resp.status
        self.headers = list(resp.headers.items())

    async def read(self, limit: int) -> bytes:
        """The whole body, decoded, refused past `limit` bytes: counted as it arrives,
        so neither a huge body nor a small gzip bomb is ever held whole."""
        parts: list[bytes] = []
        size = 0
        try:
            while part := await self._resp.content.readany():
                size += len(part)
                if size > limit:
                    raise UpstreamError(f"The model provider's response is larger than {limit} bytes; it was "
                                        f"not read further.", code="upstream_invalid_response")
                parts.append(part)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mapped(exc, self._total, self._idle) from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunk(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mapped(exc, self._total, self._idle) from exc

    def at_end(self) -> bool:
        return self._resp.content.at_eof()

    def close(self) -> None:
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


class Upstream:
    def __init__(self, request_timeout: float, idle_timeout: float) -> None:
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self._session: aiohttp.ClientSession | None = None
        self._plain = aiohttp.ClientTimeout(total=request_timeout, sock_connect=CONNECT_TIMEOUT)
        self._stream = aiohttp.ClientTimeout(total=request_timeout, sock_connect=CONNECT_TIMEOUT,
                                             sock_read=idle_timeout)

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=POOL_LIMIT, ttl_dns_cache=300)
            # No cookie jar: a cookie set by a provider must never ride along on the next
            # customer's request.
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                                  auto_decompress=True, trust_env=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: UpstreamRequest) -> HttpResponse:
        if self._session is None:
            raise UpstreamError("The gateway's upstream client is not running.")
        idle = self.idle_timeout if request.stream else None
        timeout = self._stream if request.stream else self._plain
        if request.timeout is not None:  # a retry or a fallback: what is left of the call's time
            timeout = aiohttp.ClientTimeout(total=request.timeout, sock_connect=min(CONNECT_TIMEOUT, request.timeout),
                                            sock_read=idle)
        try:
            resp = await self._session.post(request.url, data=request.body, headers=request.headers,
                                            timeout=timeout, allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mapped(exc, self.request_timeout, idle) from exc
        return HttpResponse(resp, self.request_timeout, idle)


def _mapped(exc: BaseException, total: float, idle: float | None) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return UpstreamError("Could not connect to the model provider. Try again later.",
                             code="upstream_unreachable")
    if isinstance(exc, aiohttp.SocketTimeoutError) and idle is not None:
        return UpstreamTimeout(f"The model provider sent nothing for {idle:g} seconds; the request was stopped.",
                               code="upstream_stalled")
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"The model provider did not answer within {total:g} seconds.")
    return UpstreamError("The connection to the model provider failed before the answer was complete.")


async def json_object(resp: UpstreamResponse, limit: int) -> dict[str, Any]:
    """A whole (non-streamed) 2xx answer, at most `limit` bytes decoded, as the JSON object it
    must be; the connection goes back to the pool once read, or is dropped if reading failed."""
    try:
        raw = await resp.read(limit)
    except BaseException:
        resp.close()
        raise
    resp.release()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamError("The model provider returned a response that is not a JSON object.",
                            code="upstream_invalid_response")
    return data
