"""Property-based fuzzing of /v1 against a real gateway (Hypothesis).

Hostile and broken clients: arbitrary JSON bodies, wrong types in every field the gateway
reads, deep nesting, huge numbers, non-UTF-8 bytes, duplicate keys, odd Content-Type and
Content-Encoding, odd header sizes. The upstream here accepts anything and answers well,
so every 5xx is Tollway's own fault. After every example: no 5xx, every error an
OpenAI-style JSON body, nothing left reserved, no charge for a refused request, and the
process still answers.

Budget: TOLLWAY_FUZZ_EXAMPLES examples per test (default 150; .ci/run sets more).
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import ServerThread
from tests.fakes.harness import Gateway, launcher
from tollway.config import Config

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("TOLLWAY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/responses",
             "/v1/messages/count_tokens"]
MODELS = ["acme/chat", "acme/embed", "anthropic/sonnet", "nope/none", ""]
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
A_USAGE = {"input_tokens": 11, "output_tokens": 7}
R_USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 7,
           "output_tokens_details": {"reasoning_tokens": 1}}


class TolerantUpstream:
    """Answers any body well: the right shape per path, streaming when the body asks."""

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/{path:path}", self.answer, methods=["POST"])])

    async def answer(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = {}
        stream = isinstance(body, dict) and body.get("stream") is True
        path = request.url.path
        if path.endswith("/count_tokens"):
            return Response(b'{"input_tokens": 3}', media_type="application/json")
        if path.endswith("/responses"):
            response = {"id": "resp_1", "object": "response", "status": "completed", "model": "m", "error": None,
                        "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                                    "content": [{"type": "output_text", "text": "ok", "annotations": []}]}],
                        "usage": R_USAGE}
            if stream:
                return StreamingResponse(self._responses_stream(response), media_type="text/event-stream")
            return Response(orjson.dumps(response), media_type="application/json")
        if path.endswith("/messages"):
            if stream:
                return StreamingResponse(self._anthropic_stream(), media_type="text/event-stream")
            return Response(orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                          "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                          "usage": A_USAGE}), media_type="application/json")
        if path.endswith("/embeddings"):
            return Response(orjson.dumps({"object": "list", "model": "m", "usage": {"prompt_tokens": 3,
                                          "total_tokens": 3}, "data": [{"object": "embedding", "index": 0,
                                                                         "embedding": [0.5, 0.25]}]}),
                            media_type="application/json")
        if stream:
            return StreamingResponse(self._openai_stream(), media_type="text/event-stream")
        return Response(orjson.dumps({"id": "c1", "object": "chat.completion", "model": "m", "usage": USAGE,
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                   "finish_reason": "stop"}]}), media_type="application/json")

    async def _openai_stream(self) -> AsyncIterator[bytes]:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}
        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        yield b"data: " + orjson.dumps({**chunk, "choices": [], "usage": USAGE}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def _responses_stream(self, response: dict[str, Any]) -> AsyncIterator[bytes]:
        def event(name: str, **data: Any) -> bytes:
            return f"event: {name}\ndata: ".encode() + orjson.dumps({"type": name, **data}) + b"\n\n"

        yield event("response.created", response={**response, "status": "in_progress", "output": [], "usage": None})
        yield event("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta="ok")
        yield event("response.completed", response=response)

    async def _anthropic_stream(self) -> AsyncIterator[bytes]:
        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: ".encode() + orjson.dumps({"type": name, **data}) + b"\n\n"

        yield event("message_start", {"message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                  "model": "m", "content": [], "usage": A_USAGE}})
        yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "ok"}})
        yield event("content_block_stop", {"index": 0})
        yield event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}})
        yield event("message_stop", {})


@pytest.fixture
def gw(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> Iterator[Gateway]:
    upstream = serve_app(TolerantUpstream().app).url
    prices = {"input_usd_per_mtok": "1.00", "output_usd_per_mtok": "2.00"}
    models = [{"id": "acme/chat", "provider": "fake", "upstream": "m", **prices},
              {"id": "acme/embed", "provider": "fake", "upstream": "e", "kind": "embedding", **prices},
              {"id": "anthropic/sonnet", "provider": "claude", "upstream": "s", **prices}]
    for launch in launcher(make_config, serve_app):
        yield launch(upstream, models=models, anthropic_url=upstream, credit_micros=1_000_000_000,
                     fake_provider={"responses_api": "on"})


# --- strategies ---------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False,
                                                                                      allow_infinity=False) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
FIELDS = ["model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens",
          "max_completion_tokens", "n", "system", "tools", "user", "temperature", "metadata",
          # the Responses API's
          "instructions", "max_output_tokens", "store", "background", "previous_response_id", "reasoning"]


def base_body(endpoint: str, model: str) -> dict[str, Any]:
    if endpoint.endswith("embeddings"):
        return {"model": model, "input": "hello"}
    if endpoint.endswith("/completions") and "chat" not in endpoint:
        return {"model": model, "prompt": "hello", "max_tokens": 16}
    if endpoint.endswith("/responses"):
        return {"model": model, "input": [{"role": "user", "content": "hello"}], "max_output_tokens": 16}
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    return body


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A well-formed body for some endpoint with up to three fields replaced by anything or removed."""
    endpoint = draw(st.sampled_from(ENDPOINTS))
    body = base_body(endpoint, draw(st.sampled_from(MODELS)))
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=0, max_size=3, unique=True)):
        if draw(st.booleans()):
            body[name] = draw(json_values)
        else:
            body.pop(name, None)
    if draw(st.booleans()):
        body["stream"] = True
    return endpoint, orjson.dumps(body)


RAW_BODIES = [
    b"", b"null", b"[]", b"\"just a string\"", b"123", b"{", b"{\"model\":", b"\xff\xfe\x00garbage",
    b"{\"model\": \"acme/chat\", \"messages\": [{\"role\": \"user\", \"content\": \"\xe9\xff\"}]}",  # not UTF-8
    b"[" * 100_000 + b"]" * 100_000,                                                         # deep nesting
    b"{\"model\": \"acme/chat\", \"max_tokens\": 1e999999, \"messages\": []}",               # huge float
    b"{\"model\": \"acme/chat\", \"max_tokens\": 123456789012345678901234567890, \"messages\": []}",
    b"{\"model\": \"acme/chat\", \"n\": -99999999999999999999, \"messages\": []}",
    b"{\"model\": \"nope\", \"model\": \"acme/chat\", \"messages\": [], \"stream\": true, \"stream\": 1}",
    b"{\"model\": \"acme/chat\", \"messages\": [], \"max_tokens\": NaN}",
    b"{\"model\": \"acme/chat\", \"messages\": [], \"max_tokens\": -1}",
    b"{\"model\": \"acme/chat\", \"messages\": [], \"max_tokens\": 0}",
    b"{\"model\": \"acme/chat\", \"messages\": [], \"max_tokens\": 1.5}",
    b"{\"model\": \"acme/chat\", \"messages\": [], \"max_tokens\": true}",
    b"{\"model\": \"\\ud800\", \"messages\": []}",                                             # lone surrogate
    b"{\"model\": \"acme/chat\"}\x00\x00",
    b"\xef\xbb\xbf{\"model\": \"acme/chat\", \"messages\": []}",                            # BOM
    # Lists and objects where the price checks expect a string (once a 500: unhashable).
    b'{"model": "acme/chat", "messages": [{"role": "user", "content": [{"type": ["x"]}]}]}',
    b'{"model": "acme/chat", "messages": [], "tools": [{"type": {"a": 1}}]}',
    b'{"model": "acme/chat", "messages": [], "service_tier": ["x"]}',
    b'{"model": "anthropic/sonnet", "max_tokens": 9, "messages": [{"role": "user", "content": [{"type": ["x"]}]}]}',
    b'{"model": "anthropic/sonnet", "max_tokens": 9, "messages": [], "service_tier": {"a": 1}}',
    # Responses input items of every wrong shape.
    b'{"model": "acme/chat", "input": [1, "x", null, [], {"type": ["x"]}, {"type": {"a": 1}}]}',
    b'{"model": "acme/chat", "input": [{"type": "reasoning", "encrypted_content": ["x"]}]}',
    b'{"model": "acme/chat", "input": [{"type": "function_call_output", "output": {"type": ["x"]}}]}',
    b'{"model": "acme/chat", "input": [{"role": "user", "content": [{"type": ["input_image"]}]}]}',
    b'{"model": "acme/chat", "input": "x", "tools": [{"type": ["web_search"]}], "store": null}',
]
raw_bodies = st.sampled_from(RAW_BODIES) | st.binary(max_size=512)
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "",
                                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                 "application/json; charset=latin-1", "\u00e9/\u00e9"])
encodings = st.sampled_from([None, "gzip", "br", "deflate", "identity", "x-garbage", "gzip, gzip"])


# --- the invariants ---------------------------------------------------------------------------


def check(gw: Gateway, r: httpx.Response, balance_before: int, *, in_hypothesis: bool = True) -> None:
    if in_hypothesis:
        event(f"status {r.status_code}")  # --hypothesis-show-statistics: what the inputs reached
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]  # an OpenAI-style JSON error, whatever went wrong
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
        assert gw.balance() == balance_before, "a refused request was charged"
    deadline = time.monotonic() + 5
    while gw.open_reservations() and time.monotonic() < deadline:
        time.sleep(0.01)  # a stream's settle may still be running after its last byte
    assert gw.open_reservations() == 0, "a reservation was left behind"


def post(gw: Gateway, client: httpx.Client, endpoint: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    sent = {"authorization": f"Bearer {gw.key}", **headers}
    # Header values as latin-1 bytes: a client may send any octet there, not only ASCII.
    return client.post(gw.url + endpoint, content=body, headers={k: v.encode("latin-1") for k, v in sent.items()})


@FUZZ
@given(case=mutated_bodies())
def test_wrong_types_in_every_field_never_cause_a_5xx(gw: Gateway, case: tuple[str, bytes]) -> None:
    endpoint, body = case
    with httpx.Client(timeout=30) as client:
        before = gw.balance()
        check(gw, post(gw, client, endpoint, body, {"content-type": "application/json"}), before)


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), body=st.one_of(raw_bodies, json_values.map(orjson.dumps)),
       content_type=content_types, encoding=encodings, compress=st.booleans())
def test_garbage_bytes_types_and_encodings_never_cause_a_5xx(gw: Gateway, endpoint: str, body: bytes,
                                                             content_type: str, encoding: str | None,
                                                             compress: bool) -> None:
    headers = {"content-type": content_type}
    if encoding is not None:
        headers["content-encoding"] = encoding
        if compress and encoding == "gzip":
            body = gzip.compress(body)
    with httpx.Client(timeout=30) as client:
        before = gw.balance()
        check(gw, post(gw, client, endpoint, body, headers), before)


@FUZZ
@given(name=st.from_regex(r"\Ax-[a-z0-9-]{1,40}\Z"), size=st.sampled_from([0, 1, 1_000, 8_000, 60_000]),
       auth=st.sampled_from(["", "Bearer", "Basic abc", "Bearer ak_", "Bearer ak_" + "A" * 5000,
                             "bearer {key}", "Bearer {key}", "Bearer  {key}", "Bearer {key}x"]))
def test_odd_headers_never_cause_a_5xx(gw: Gateway, name: str, size: int, auth: str) -> None:
    body = orjson.dumps(base_body("/v1/chat/completions", "acme/chat"))
    headers = {"content-type": "application/json", name: "v" * size, "authorization": auth.format(key=gw.key)}
    with httpx.Client(timeout=30) as client:
        before = gw.balance()
        r = client.post(gw.url + "/v1/chat/completions", content=body, headers=headers)
        if r.status_code == 431 or (r.status_code == 400 and "json" not in r.headers.get("content-type", "")):
            return  # refused by the HTTP server itself before Tollway saw it: nothing reserved, nothing charged
        check(gw, r, before)


def test_the_gateway_still_serves_after_the_fuzzing(gw: Gateway) -> None:
    """The same gateway fixture answers normally after a burst of the worst inputs above."""
    with httpx.Client(timeout=30) as client:
        for raw in RAW_BODIES:
            for endpoint in ENDPOINTS:
                before = gw.balance()
                check(gw, post(gw, client, endpoint, raw, {"content-type": "application/json"}), before,
                      in_hypothesis=False)
        r = post(gw, client, "/v1/chat/completions", orjson.dumps(base_body("/v1/chat/completions", "acme/chat")),
                 {"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
        assert client.get(gw.url + "/healthz").status_code == 200
    assert gw.verify() == []
