"""The upstream fault matrix (issue 28): every way a provider fails, for a JSON and a
streamed call, on both wire formats, against a real gateway under uvicorn and the
fault-injecting provider of tests/fakes/fault_upstream.py.

MATRIX is the one table of what a client gets and what it is charged; docs/proxy.md's
table is rendered from it (`test_the_docs_table_is_the_matrix`), so a change of outcome
(retries, fallbacks) is a change of one row here. For every cell the test asserts:
  * the client's answer: the status, the OpenAI-style error body or, for a stream that
    started, the error event in the stream's own format, and no end marker after it;
  * the charge, exactly, in micro-dollars, by the row's rule (CHARGES): in the balance,
    the usage row, the request's log line and `x-tollway-cost-usd`;
  * nothing held afterwards and `ledger verify` clean;
  * neither provider key, nor any 8 characters of one, in the answer or any log line;
  * for the faults of tens of MiB, the process's peak of allocated memory (tracemalloc:
    the gateway runs in this process) stays far below the fault's size.
"""

from __future__ import annotations

import contextlib
import re
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import REDIS_URL, ServerThread, free_port, fresh_pg_database, need_redis, to_toml
from tests.fakes.fault_upstream import FAULTS, LINE_BYTES, REPORTED, FaultUpstream
from tests.fakes.harness import ANTHROPIC_KEY, PROVIDER_KEY, Gateway, start_gateway
from tollway import config as config_mod
from tollway.config import Secret
from tollway.money import Prices, Usage, cost, format_usd
from tollway.proxy.pipeline import _is_event_stream

DOCS = Path(__file__).resolve().parents[1] / "docs" / "proxy.md"

# --- the matrix -----------------------------------------------------------------------------

# The charge rules (docs/proxy.md, Money): nothing; the provider's reported usage; the
# estimate (prompt from its text, or Anthropic's message_start count; completion from the
# text delivered); the conservative rule (prompt at the reservation's bound unless counted).
NOTHING, USAGE, ESTIMATE, CONSERVATIVE = "0", "usage", "estimate", "conservative"
CHARGES = (NOTHING, USAGE, ESTIMATE, CONSERVATIVE)


@dataclass(frozen=True)
class Outcome:
    status: int  # the HTTP status the client gets
    code: str | None = None  # the error code: of the JSON error body, or of the stream's error event
    event: bool = False  # the stream had started: the error is its last event
    charge: str = NOTHING

    def cell(self) -> str:
        said = f"{self.status}" + (f" `{self.code}`" if self.code and not self.event else "")
        if self.event:
            said += f", then event `{self.code}`"
        return f"{said}; {self.charge}"


@dataclass(frozen=True)
class Case:
    fault: str  # what the provider does (docs table)
    json: Outcome
    stream: Outcome
    bounded: bool = False  # a fault of tens of MiB: the gateway's peak memory is measured

    def outcome(self, wire: str, stream: bool) -> Outcome:
        return self.stream if stream else self.json


def answered(charge: str) -> Outcome:
    return Outcome(200, charge=charge)


def refused(status: int, code: str) -> Outcome:
    return Outcome(status, code)


def cut(code: str, charge: str) -> Outcome:
    return Outcome(200, code, event=True, charge=charge)


MATRIX: dict[str, Case] = {
    "refused": Case("connection refused (nothing listens)",
                    refused(502, "upstream_unreachable"), refused(502, "upstream_unreachable")),
    "reset_before_headers": Case("TCP reset before the status line",
                                 refused(502, "upstream_error"), refused(502, "upstream_error")),
    "headers_then_silence": Case("200 and its headers, then silence",
                                 refused(504, "upstream_timeout"), cut("upstream_stalled", CONSERVATIVE)),
    "reset_mid_body": Case("TCP reset half-way through the JSON / after two words of the stream",
                           refused(502, "upstream_error"), cut("upstream_error", ESTIMATE)),
    "truncated": Case("the body ends cleanly mid-JSON / mid-event, no end marker",
                      refused(502, "upstream_invalid_response"), cut("upstream_stream_cut", ESTIMATE)),
    "garbage": Case("JSON followed by binary junk / garbage events (cut JSON, binary, HTML) among good ones",
                    refused(502, "upstream_invalid_response"), answered(USAGE)),
    "long_line": Case("one line over 1 MiB: a valid 1.5 MiB JSON answer / a 32 MiB SSE event",
                      answered(USAGE), cut("upstream_invalid_response", ESTIMATE), bounded=True),
    "huge_body": Case("32 MiB that is neither JSON nor SSE (a stream: after two words), over "
                      "`max_response_bytes` and the 1 MiB event cap",
                      refused(502, "upstream_invalid_response"), cut("upstream_invalid_response", ESTIMATE),
                      bounded=True),
    "gzip_bomb": Case("the same, gzip-encoded (32 KiB on the wire)",
                      refused(502, "upstream_invalid_response"), cut("upstream_invalid_response", ESTIMATE),
                      bounded=True),
    "non_json_200": Case("200 with an HTML page (`text/html`)",
                         refused(502, "upstream_invalid_response"), refused(502, "upstream_invalid_response")),
    "no_usage": Case("a complete answer without usage", answered(ESTIMATE), answered(ESTIMATE)),
    "gzip": Case("a complete answer, gzip-encoded (a stream flushed per event)", answered(USAGE), answered(USAGE)),
    "slow": Case("never silent for the idle limit, not done within the request timeout",
                 refused(504, "upstream_timeout"), cut("upstream_timeout", CONSERVATIVE)),
    "rate_limited": Case("429 with `retry-after: 7`, the key echoed in its message",
                         refused(429, "upstream_rate_limited"), refused(429, "upstream_rate_limited")),
}
WIRES = ("openai", "anthropic")


def render_matrix() -> str:
    """docs/proxy.md's table, between its fault-matrix markers."""
    lines = ["| case | the provider | OpenAI JSON | OpenAI stream | Anthropic JSON | Anthropic stream |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, case in MATRIX.items():
        cells = [case.outcome(w, s).cell() for w in WIRES for s in (False, True)]
        lines.append(f"| `{name}` | {case.fault} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_the_matrix_covers_every_fault_and_rule() -> None:
    assert set(MATRIX) == {"refused", *FAULTS}
    for case in MATRIX.values():
        for o in (case.json, case.stream):
            assert o.charge in CHARGES and (o.code is None) == (o.status == 200 and not o.event)
            assert not o.event or o.charge != NOTHING  # a stream that started reached the provider


def test_the_docs_table_is_the_matrix() -> None:
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(r"<!-- fault-matrix -->\n(.*?)\n<!-- /fault-matrix -->", text, re.S)
    assert found and found[1] == render_matrix(), "docs/proxy.md's fault matrix should read:\n" + render_matrix()


class _Answer:
    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.headers = headers


@pytest.mark.parametrize(("headers", "relayed"), [
    ([("Content-Type", "text/event-stream; charset=utf-8")], True), ([("content-type", "TEXT/EVENT-STREAM")], True),
    ([], True),  # none said: relayed (some OpenAI-compatible servers omit it)
    ([("Content-Type", "text/html; charset=utf-8")], False), ([("content-type", "application/json")], False)])
def test_a_stream_is_relayed_only_when_its_answer_is_one(headers: list[tuple[str, str]], relayed: bool) -> None:
    assert _is_event_stream(_Answer(headers)) is relayed  # type: ignore[arg-type]


# --- the gateway and the faulty provider ----------------------------------------------------

PRICES = Prices(Decimal("2.50"), Decimal("10.00"))
SERVER = {"request_timeout_seconds": 2, "stream_idle_timeout_seconds": 1, "disconnect_drain_seconds": 1,
          "max_response_bytes": 3 << 20}
MEMORY_BOUND = 12 << 20  # far below LINE_BYTES (32 MiB); the gateway holds at most ~2 caps of it
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def fault() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream({"openai": PROVIDER_KEY, "anthropic": ANTHROPIC_KEY}).start()
    yield upstream
    upstream.stop()


@contextlib.contextmanager
def gateway_on(folder: Path, fault: FaultUpstream, stack: dict[str, Any]) -> Iterator[Gateway]:
    """A gateway on `stack` ({"database": …, "cache": …}) whose providers are the fault
    upstream in both wire formats, and a closed port in both."""
    closed = f"http://127.0.0.1:{free_port()}"
    providers = {"openai": {"type": "openai", "base_url": fault.url + "/v1", "api_key_env": "FAULT_OPENAI_KEY"},
                 "anthropic": {"type": "anthropic", "base_url": fault.url, "api_key_env": "FAULT_ANTHROPIC_KEY"},
                 "openai-closed": {"type": "openai", "base_url": closed + "/v1", "api_key_env": "FAULT_OPENAI_KEY"},
                 "anthropic-closed": {"type": "anthropic", "base_url": closed, "api_key_env": "FAULT_ANTHROPIC_KEY"}}
    keys = {name: Secret(p["api_key_env"], PROVIDER_KEY if p["type"] == "openai" else ANTHROPIC_KEY)
            for name, p in providers.items()}
    prices = {"input_usd_per_mtok": "2.50", "output_usd_per_mtok": "10.00"}
    models = [{"id": f"{wire}/{case}", "provider": wire + ("-closed" if case == "refused" else ""),
               "upstream": f"fault-{case}", **prices} for wire in WIRES for case in MATRIX]
    servers: list[ServerThread] = []

    def make_config(**sections: Any) -> config_mod.Config:
        path = folder / "tollway.toml"
        path.write_text(to_toml({**stack, **sections}), encoding="utf-8")
        return config_mod.load(path)

    def serve(app: Any) -> ServerThread:
        servers.append(ServerThread(app).start())
        return servers[-1]

    gateway = start_gateway(make_config, serve, fault.url, providers=providers, provider_keys=keys, models=models,
                            server=SERVER, credit_micros=100_000_000)
    try:
        yield gateway
    finally:
        gateway.close()
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fault: FaultUpstream) -> Iterator[Gateway]:
    """One gateway for the whole matrix (each cell checks its own charge), embedded stack."""
    folder = tmp_path_factory.mktemp("faults")
    with gateway_on(folder, fault, {"database": {"url": f"sqlite:///{folder / 'tollway.db'}"},
                                    "cache": {"url": "memory://"}}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def gw_scaleout(tmp_path_factory: pytest.TempPathFactory, fault: FaultUpstream) -> Iterator[Gateway]:
    """The same on PostgreSQL and Redis, where holds are rows and settles transactions."""
    need_redis()
    with fresh_pg_database() as url, gateway_on(tmp_path_factory.mktemp("faults-pg"), fault, {
            "database": {"url": url}, "cache": {"url": REDIS_URL}}) as gateway:
        yield gateway


# --- reading what the client got --------------------------------------------------------------


def events_of(body: bytes) -> list[bytes]:
    return [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


def data_of(event: bytes) -> Any:
    payload = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def seen(wire: str, stream: bool, r: httpx.Response) -> tuple[int, tuple[int, int] | None]:
    """(bytes of answer text the client got, Anthropic message_start's counts if it got one)."""
    if not stream:
        data = r.json()
        parts = ([c["message"]["content"] for c in data["choices"]] if wire == "openai"
                 else [b["text"] for b in data["content"]])
        return sum(len(p.encode()) for p in parts), None
    text, start = 0, None
    for ev in events_of(r.content):
        data = data_of(ev)
        if not isinstance(data, dict):
            continue
        if wire == "openai":
            text += sum(len((c.get("delta") or {}).get("content") or "") for c in data.get("choices") or [])
        elif data.get("type") == "content_block_delta":
            text += len(data["delta"].get("text", ""))
        elif data.get("type") == "message_start" and "usage" in data["message"]:
            u = data["message"]["usage"]
            start = (u["input_tokens"], u["output_tokens"])
    return text, start


def expected_charge(rule: str, wire: str, stream: bool, raw: bytes, r: httpx.Response) -> int:
    """The charge by the rules of docs/proxy.md, computed here from what the client got."""
    if rule == NOTHING:
        return 0
    if rule == USAGE:
        return cost(Usage(*REPORTED), PRICES)
    text, start = seen(wire, stream, r)
    # The estimate's prompt: ⌈bytes of the messages' strings ÷ 4⌉ + 4 per message; the
    # conservative rule's: the reservation's bound, the body's size. Anthropic's count wins.
    strings = sum(len(v.encode()) for m in MSG for v in m.values())
    prompt = start[0] if start else (-(-strings // 4) + 4 * len(MSG) if rule == ESTIMATE else len(raw))
    completion = max(start[1] if start else 0, -(-text // 4))
    return cost(Usage(prompt, completion), PRICES)


# What an Anthropic client can tell apart: its error event carries a type and a message.
UPSTREAM_HITS = {"reset_before_headers": 2}
TYPE_OF = {"upstream_rate_limited": "rate_limit_error"}
ANTHROPIC_TYPE_OF = {429: "rate_limit_error", 504: "timeout_error"}
MESSAGE_OF = {"upstream_stalled": "sent nothing for 1 seconds", "upstream_timeout": "did not answer within 2 seconds",
              "upstream_error": "failed before the answer was complete",
              "upstream_stream_cut": "closed the stream before it finished",
              "upstream_invalid_response": "The model provider", "upstream_unreachable": "Could not connect",
              "upstream_rate_limited": "rate limiting"}
END_MARKER = {"openai": b"data: [DONE]", "anthropic": b"event: message_stop"}


def check_client(r: httpx.Response, expected: Outcome, wire: str, stream: bool, slug: str) -> None:
    assert r.status_code == expected.status, r.content[:500]
    assert "content-encoding" not in r.headers  # the gateway decoded what the provider encoded
    if expected.code is not None and not expected.event:
        assert r.headers["content-type"] == "application/json"
        answer = r.json()
        error = answer["error"]
        if wire == "anthropic":  # /v1/messages errors come in Anthropic's shape, by status, code kept
            assert answer["type"] == "error" and error["type"] == ANTHROPIC_TYPE_OF.get(expected.status, "api_error")
        else:
            assert error["type"] == TYPE_OF.get(expected.code, "upstream_error")
        assert error["code"] == expected.code
        assert MESSAGE_OF[expected.code] in error["message"]
        if expected.status == 429:
            assert r.headers["retry-after"] == "7" and "x-ratelimit-remaining-requests" not in r.headers
        return
    if not stream:
        assert r.json()["model"] == slug
        return
    assert r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.content)
    ended = any(e.startswith(END_MARKER[wire]) for e in events)
    if not expected.event:
        assert ended and events[-1].startswith(END_MARKER[wire]), events[-3:]
        assert not any(e.startswith(b"event: error") or b'"error":' in e for e in events)
        return
    assert not ended, "an end marker after a failure: the client would take a cut answer for a whole one"
    last = data_of(events[-1])
    if wire == "openai":
        assert last["error"]["code"] == expected.code, events[-1]
        message = last["error"]["message"]
    else:
        assert events[-1].startswith(b"event: error\n") and last["type"] == "error", events[-1]
        # Anthropic's error type, by the failure's status (errors.anthropic_body); the code is kept.
        timed_out = expected.code in ("upstream_timeout", "upstream_stalled")
        assert last["error"]["type"] == ("timeout_error" if timed_out else "api_error"), events[-1]
        assert last["error"]["code"] == expected.code, events[-1]
        message = last["error"]["message"]
    assert MESSAGE_OF[expected.code or ""] in message


def request_line(capfd: pytest.CaptureFixture[str], request_id: str, logged: list[str]) -> dict[str, Any]:
    """The gateway's log line for the request (written within LOG_FLUSH_SECONDS; the bound is
    generous because a loaded CI machine delays the settle that writes it)."""
    deadline = time.monotonic() + 20
    while True:
        out, err = capfd.readouterr()
        logged += [out, err]
        for line in "".join(logged).splitlines():
            if request_id in line and '"event":"request"' in line:
                found: dict[str, Any] = orjson.loads(line)
                return found
        assert time.monotonic() < deadline, f"no request line for {request_id}"
        time.sleep(0.05)


def fragments(secret: str) -> set[str]:
    return {secret[i:i + 8] for i in range(len(secret) - 7)}


# --- the matrix, cell by cell ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("case", list(MATRIX))
def test_fault(gw: Gateway, fault: FaultUpstream, capfd: pytest.CaptureFixture[str], case: str, wire: str,
               stream: bool) -> None:
    check_cell(gw, fault, capfd, case, wire, stream)


# One cell per charge rule, and a refusal before and after the stream began, on the scale-out stack.
SCALEOUT_CELLS = [("refused", "openai", False), ("reset_mid_body", "anthropic", True),
                  ("headers_then_silence", "openai", True), ("gzip", "anthropic", False),
                  ("no_usage", "openai", True), ("huge_body", "openai", False)]


@pytest.mark.parametrize(("case", "wire", "stream"), SCALEOUT_CELLS)
def test_fault_on_postgres(gw_scaleout: Gateway, fault: FaultUpstream, capfd: pytest.CaptureFixture[str], case: str,
                           wire: str, stream: bool) -> None:
    check_cell(gw_scaleout, fault, capfd, case, wire, stream)


def check_cell(gw: Gateway, fault: FaultUpstream, capfd: pytest.CaptureFixture[str], case: str, wire: str,
               stream: bool) -> None:
    """One cell of MATRIX, every check of the module docstring."""
    row = MATRIX[case]
    expected = row.outcome(wire, stream)
    slug = f"{wire}/{case}"
    body: dict[str, Any] = {"model": slug, "max_tokens": 50, "messages": MSG, **({"stream": True} if stream else {})}
    raw = orjson.dumps(body)
    path = "/v1/chat/completions" if wire == "openai" else "/v1/messages"
    served_before = len(fault.served)
    before = gw.balance()
    if row.bounded and expected.code is not None:
        tracemalloc.start()
    try:
        r = httpx.post(gw.url + path, content=raw, timeout=30, headers={
            "authorization": f"Bearer {gw.key}", "content-type": "application/json"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rid = r.headers["x-request-id"]

    check_client(r, expected, wire, stream, slug)
    if stream and r.status_code == 200 and case != "garbage":
        # Every event relayed is whole: a cut one would fail the client's SDK as it parses it.
        assert all(e == b"data: [DONE]" or data_of(e) is not None for e in events_of(r.content)), r.content[-300:]

    want = expected_charge(expected.charge, wire, stream, raw, r)
    usage_row = gw.usage_row(rid)
    assert (usage_row["cost_micros"], usage_row["status"]) == (want, expected.status), usage_row
    assert usage_row["estimated"] is (expected.charge in (ESTIMATE, CONSERVATIVE))
    assert gw.balance() == before - want
    if r.status_code == 200 and not stream:
        assert r.headers["x-tollway-cost-usd"] == format_usd(want)
    assert gw.held() == 0 and gw.open_reservations() == 0 and gw.verify() == []

    logged: list[str] = []
    line = request_line(capfd, rid, logged)
    assert line["cost_micros"] == want and line.get("error_code") == expected.code, line

    seen_by_client = r.text + repr(r.headers.raw)
    for secret in (PROVIDER_KEY, ANTHROPIC_KEY):
        for part in fragments(secret):
            assert part not in seen_by_client and all(part not in text for text in logged), part

    if row.bounded and expected.code is not None:
        assert peak < MEMORY_BOUND, f"peak {peak} bytes while the provider sent {LINE_BYTES}"
    if case != "refused":
        served = fault.served[served_before:]
        # A reset before headers is retried once (server.retry_attempts = 1, docs/proxy.md);
        # the rest either answered or, like the 429 whose retry-after passes the cap, are not.
        assert len(served) == UPSTREAM_HITS.get(case, 1) and all(s.stream is stream for s in served)
        if row.bounded and case != "gzip_bomb" and expected.code is not None:
            assert served[0].cut_short, "the gateway read the whole fault instead of hanging up"
