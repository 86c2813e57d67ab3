"""What both directions share: the refusal, the field checks, usage in each format, and
the stream wrapper that puts a converter behind an adapter's meter."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from tollway.errors import BadRequest, TollwayError, UpstreamError
from tollway.money import Usage
from tollway.providers.base import InvalidUsage, StreamMeter, sse_data

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
# What reading a provider's JSON of an unexpected shape raises (its data is untrusted).
_SHAPE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError)


def untranslatable(param: str, why: str) -> BadRequest:
    """The 400 for a field the other wire format cannot carry exactly: named, never dropped."""
    return BadRequest(f"'{param}' cannot be translated for this model's provider: {why}. Remove it, or call the "
                      f"model's own endpoint.", code="unsupported_parameter", param=param)


def invalid_answer(what: str) -> UpstreamError:
    return UpstreamError(f"The model provider returned an answer that cannot be translated ({what}).",
                         code="upstream_invalid_response")


def check_fields(body: dict[str, Any], known: frozenset[str], neutral: dict[str, tuple[Any, ...]],
                 where: str = "") -> None:
    """Refuse every field outside `known`, unless it is null or a value that means the
    default (e.g. `n: 1`): those carry nothing to translate."""
    for name in body.keys() - known:
        value = body[name]
        if value is None or any(type(v) is type(value) and v == value for v in neutral.get(name, ())):
            continue
        if not _FIELD_NAME.fullmatch(name):  # error messages quote no client text (errors.py)
            raise untranslatable(where.rstrip(".") or "body", "it holds a field whose name is not an identifier "
                                                              "and has no equivalent in the provider's API")
        raise untranslatable(f"{where}{name}", "it has no equivalent in the provider's API")


_TEXT_PART = frozenset({"type", "text"})


def text_of(content: Any, where: str, fields: frozenset[str] = _TEXT_PART) -> str:
    """A content that must be text: a string, or a list of text parts (joined), each
    with no field outside `fields` (an empty `citations` list carries nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise untranslatable(f"{where}[{j}]", "only text is accepted here")
            check_fields(part, fields, {"citations": ([],)}, f"{where}[{j}].")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"'{where}' must be a string or an array of text parts.", param=where)


def tool_list(body: dict[str, Any], convert: Callable[[Any, str], dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The body's `tools`, each converted (`convert(tool, "tools[i]")`), or None if absent."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", param="tools")
    return [convert(t, f"tools[{i}]") for i, t in enumerate(tools)]


def strings(value: Any, name: str, *, one: bool = False) -> list[str]:
    """A list of strings (stop sequences); `one`: a lone string is accepted as a list of one."""
    if one and isinstance(value, str):
        return [value]
    if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        raise BadRequest(f"'{name}' must be {'a string or ' if one else ''}an array of strings.", param=name)
    return value


def json_object(arguments: Any, where: str) -> dict[str, Any]:
    """Tool-call arguments (a JSON string in OpenAI's format) as the object Anthropic takes."""
    if isinstance(arguments, str):
        try:
            value = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
    raise BadRequest(f"'{where}' must be a JSON object encoded as a string.", param=where)


# --- usage in each format: what the client sees is what was billed ------------------------

def openai_usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": u.cache_write_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def anthropic_usage(u: Usage) -> dict[str, Any]:
    # Anthropic reports cache reads and writes apart from input_tokens (OpenAI includes them).
    fresh = max(0, u.prompt_tokens - u.cached_tokens - u.cache_write_tokens)
    return {"input_tokens": fresh, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": u.cache_write_tokens}


# --- streams -------------------------------------------------------------------------------

class Converter(Protocol):
    """Turns one upstream event (already rewritten and metered by the adapter's meter)
    into the client's events; `finish` writes the client's closing events (after the
    settle, with the usage billed) once the provider's stream ended: at its end marker,
    or at the end of its body when `finished` (its finish came before it closed)."""

    finished: bool

    def convert(self, data: dict[str, Any]) -> bytes | None: ...

    def finish(self, usage: Usage) -> bytes: ...

    def error(self, exc: TollwayError) -> bytes: ...


class TranslatedStream:
    """A StreamMeter for the relay: the upstream format's meter reads usage and the end
    (so billing is the provider's own report), then the converter writes the client's
    format. Only translated calls pay for it; a same-format stream never sees it.

    It is also the relay's `Ending`: the client's closing events (message_delta and
    message_stop, or the usage chunk and [DONE]) carry usage, and the usage billed is
    known only at the settle (an estimate when the provider reported none), so the relay
    writes them after the settle, in place of the provider's end marker."""

    __slots__ = ("_conv", "_failed", "_inner", "done", "invalid", "text_bytes")

    def __init__(self, inner: StreamMeter, conv: Converter) -> None:
        self._inner = inner
        self._conv = conv
        self._failed = False  # an event could not be read: the client was told, the rest is metered only
        self.done = False
        self.invalid: InvalidUsage | None = None
        self.text_bytes = 0

    def usage(self) -> Usage | None:
        return self._inner.usage()

    def finished(self) -> bool:
        # After its error event the client's stream is over: the body's end is no cut to report.
        return self._failed or self._conv.finished

    def closing(self, billed: Usage | None) -> bytes:
        if self._failed:
            return b""  # the client's stream ended at its error event
        return self._conv.finish(billed or self._inner.usage() or Usage()) + b"\n\n"

    def feed(self, event: bytes) -> bytes | None:
        inner = self._inner
        sent = inner.feed(event)
        self.text_bytes, self.invalid = inner.text_bytes, inner.invalid
        if inner.done:
            self.done = True
            return None  # the provider's end marker: `closing` replaces it, after the settle
        if sent is None or self._failed:
            return None
        payload = sse_data(sent)
        if not payload:
            return None  # a comment or keep-alive: nothing to translate
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            self._failed = True
            return self._conv.error(invalid_answer("an event of its stream is not a JSON object"))
        try:  # Anthropic's data repeats the event's name as its `type`: the data is enough
            return self._conv.convert(data)
        except UpstreamError as exc:
            self._failed = True
            return self._conv.error(exc)
        except _SHAPE_ERRORS:  # an event of a shape the converter does not expect (a list for an index...)
            self._failed = True
            return self._conv.error(invalid_answer("an event of its stream has an unexpected shape"))


def guarded(convert: Callable[[dict[str, Any], Usage, str], dict[str, Any]]
            ) -> Callable[[dict[str, Any], Usage, str], dict[str, Any]]:
    """An answer converter for which a provider's body of an unexpected shape is a 502
    (upstream_invalid_response), never a 500."""
    def run(data: dict[str, Any], usage: Usage, slug: str) -> dict[str, Any]:
        try:
            return convert(data, usage, slug)
        except _SHAPE_ERRORS as exc:
            raise invalid_answer("an unexpected shape") from exc
    return run


def sse(name: str, data: dict[str, Any]) -> bytes:
    """One named SSE event without its blank-line terminator (the relay adds it)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data)


def chunk(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data)
