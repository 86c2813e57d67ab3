"""One exception tree for everything a client can be told.

Each class carries its HTTP status and OpenAI-style `type` and `code`; `render_json`
and `render_sse` (`render_anthropic_sse` for /v1/messages clients) are the only ways an
error reaches a client. Messages are written
by Tollway, never copied from a request body, so they cannot leak prompt text.
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from starlette.responses import Response

from tollway.money import format_usd


class TollwayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.instance_code = code or self.code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.instance_code}}


class BadRequest(TollwayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(TollwayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"

    def __init__(self, message: str = "Invalid API key. Check the key you sent (Authorization: Bearer ak_...)."
                 ) -> None:
        super().__init__(message, headers={"www-authenticate": 'Bearer realm="tollway"'})


class Forbidden(TollwayError):
    status, type, code = 403, "permission_error", "forbidden"


class InsufficientFunds(TollwayError):
    status, type, code = 402, "insufficient_quota", "insufficient_quota"

    def __init__(self, message: str = "Your wallet balance does not cover this request. Top up to continue.") -> None:
        # The official SDKs retry anything they do not recognise unless told not to.
        super().__init__(message, headers={"x-should-retry": "false"})

    @classmethod
    def to_reserve(cls, amount_micros: int) -> InsufficientFunds:
        return cls(f"Your wallet balance does not cover this request (up to {format_usd(amount_micros)} USD "
                   f"must be reserved). Top up to continue.")


class NotFound(TollwayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(TollwayError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(TollwayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimited(TollwayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class SpendLimitExceeded(RateLimited):
    code = "spend_limit_exceeded"

    @classmethod
    def for_key(cls, limit_micros: int, amount_micros: int) -> SpendLimitExceeded:
        return cls(f"This API key's spend limit of {format_usd(limit_micros)} USD for this period would be "
                   f"exceeded (this request may cost up to {format_usd(amount_micros)} USD). Raise the key's "
                   f"limit or wait for the next period.")

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"x-should-retry": "false"})


class UpstreamError(TollwayError):
    status, type, code = 502, "upstream_error", "upstream_error"


class UpstreamRateLimited(UpstreamError):
    status, type, code = 429, "rate_limit_error", "upstream_rate_limited"


class UpstreamTimeout(UpstreamError):
    status, type, code = 504, "upstream_error", "upstream_timeout"


class ServiceUnavailable(TollwayError):
    status, type, code = 503, "server_error", "service_unavailable"


# Anthropic's error types by status (its API reference, "Errors").
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_body(exc: TollwayError) -> dict[str, object]:
    """Anthropic's error shape, for /v1/messages clients; `code` and `param` are kept
    beside Anthropic's fields, so both SDKs and a script reading either shape find them."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(exc.status, "api_error"),
                                       "message": exc.message, "code": exc.instance_code, "param": exc.param}}


def render_json(exc: TollwayError, request_id: str | None = None, *, anthropic: bool = False) -> Response:
    headers = dict(exc.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(orjson.dumps(anthropic_body(exc) if anthropic else exc.body()), status_code=exc.status,
                    headers=headers, media_type="application/json")


def render_sse(exc: TollwayError) -> bytes:
    """An error event for a stream that already started (openai-python raises on it)."""
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"


def render_anthropic_sse(exc: TollwayError) -> bytes:
    """The same for an Anthropic stream: the SDKs raise on `event: error` (an unnamed
    event would be ignored)."""
    return b"event: error\ndata: " + orjson.dumps(anthropic_body(exc)) + b"\n\n"
