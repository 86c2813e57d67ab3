"""POST /v1/messages/count_tokens with the official anthropic client: answered as the provider
answers, with the operator's key and the provider's model name, and never billed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import ServerThread
from tests.fakes.harness import ANTHROPIC_KEY, Gateway, launcher
from tollway.config import Config

MSG = [{"role": "user", "content": "How many tokens is this?"}]
CLAUDE = {"input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00"}


@dataclass
class FakeCounter:
    """Anthropic's count_tokens: counts 1 token per 4 bytes of the body it got, plus 7 per
    message, and says so; model "claude-broken" fails with a body quoting the key."""

    key: str
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/messages/count_tokens", self.count, methods=["POST"])])

    @staticmethod
    def tokens(body: dict[str, Any]) -> int:
        return len(orjson.dumps(body["messages"])) // 4 + 7 * len(body["messages"])

    async def count(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.requests.append((dict(request.headers), body))
        if request.headers.get("x-api-key") != self.key:
            return Response(b'{"type":"error","error":{"type":"authentication_error","message":"bad key"}}', 401)
        if body["model"] == "claude-broken":
            err = {"type": "error", "error": {"type": "invalid_request_error",
                                              "message": f"model unavailable for key {self.key}"}}
            return Response(orjson.dumps(err), 400, media_type="application/json")
        return Response(orjson.dumps({"input_tokens": self.tokens(body)}), media_type="application/json",
                        headers={"retry-after": "3", "anthropic-organization-id": "org-operator"})


@pytest.fixture
def fake() -> FakeCounter:
    return FakeCounter(ANTHROPIC_KEY)


def models() -> list[dict[str, Any]]:
    return [{"id": "anthropic/sonnet", "provider": "claude", "upstream": "claude-sonnet-x", **CLAUDE},
            {"id": "anthropic/broken", "provider": "claude", "upstream": "claude-broken", **CLAUDE},
            {"id": "acme/chat", "provider": "fake", "upstream": "fake-chat", **CLAUDE}]


@pytest.fixture
def start(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
          fake: FakeCounter) -> Iterator[Callable[..., Gateway]]:
    for launch in launcher(make_config, serve_app):
        yield lambda **kw: launch("http://127.0.0.1:9", models=models(), anthropic_url=serve_app(fake.app).url,
                                  **kw)


@pytest.fixture
def gw(start: Callable[..., Gateway], backend: dict[str, Any]) -> Gateway:
    return start(**backend)


def client(gw: Gateway, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key or gw.key, max_retries=0)


def post(gw: Gateway, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gw.url + "/v1/messages/count_tokens", content=content, timeout=30,
                      headers={"x-api-key": gw.key, "content-type": "application/json", **headers})


def test_count_tokens_is_answered_and_not_billed(gw: Gateway, fake: FakeCounter) -> None:
    before = gw.balance()
    with client(gw) as c:
        raw = c.messages.with_raw_response.count_tokens(model="anthropic/sonnet", messages=MSG, system="Be brief.")
    counted = raw.parse()
    headers, body = fake.requests[-1]
    assert counted.input_tokens == FakeCounter.tokens(body) > 0
    assert body["model"] == "claude-sonnet-x" and body["system"] == "Be brief." and body["messages"] == MSG
    assert headers["x-api-key"] == ANTHROPIC_KEY and headers["anthropic-version"]
    assert "authorization" not in headers and "ak_" not in repr(headers) + repr(body)
    assert raw.headers["retry-after"] == "3" and "anthropic-organization-id" not in raw.headers
    assert "x-tollway-cost-usd" not in raw.headers and raw.headers["x-request-id"]
    # Not billed: the wallet is unchanged, nothing was held, and no usage row was written.
    assert gw.balance() == before and gw.open_reservations() == 0 and gw.held() == 0
    with pytest.raises(AssertionError, match="no usage row"):
        gw.usage_row(raw.headers["x-request-id"], wait=0.3)
    assert gw.verify() == []


def test_count_tokens_carries_the_attribution_header(gw: Gateway, fake: FakeCounter) -> None:
    """As every other upstream call: the tenant's ids for the operator's cost attribution,
    and no part of the customer's key."""
    with client(gw) as c:
        raw = c.messages.with_raw_response.count_tokens(model="anthropic/sonnet", messages=MSG)
    headers, _ = fake.requests[-1]
    meta = orjson.loads(headers["cf-aig-metadata"])
    assert meta == {"tenant_id": gw.tenant_id, "key_id": gw.key_id, "request_id": raw.headers["x-request-id"]}
    assert gw.key not in repr(headers) and gw.key[-12:] not in repr(headers)


def test_count_tokens_needs_a_valid_key(gw: Gateway, fake: FakeCounter) -> None:
    r = httpx.post(gw.url + "/v1/messages/count_tokens", json={"model": "anthropic/sonnet", "messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with client(gw, key="ak_" + "x" * 51) as c, pytest.raises(anthropic.AuthenticationError):
        c.messages.count_tokens(model="anthropic/sonnet", messages=MSG)  # type: ignore[arg-type]
    assert fake.requests == []


def test_count_tokens_refusals_forward_nothing(start: Callable[..., Gateway], fake: FakeCounter) -> None:
    gw = start(server={"max_body_bytes": 2_000})
    with client(gw) as c, pytest.raises(anthropic.NotFoundError):
        c.messages.count_tokens(model="anthropic/nope", messages=MSG)  # type: ignore[arg-type]
    r = post(gw, {"model": "acme/chat", "messages": MSG})
    assert r.status_code == 400 and "Anthropic models only" in r.json()["error"]["message"]
    r = post(gw, {"model": "anthropic/sonnet", "messages": [{"role": "user", "content": "x" * 3_000}]})
    assert r.status_code == 413
    r = post(gw, {"model": "anthropic/sonnet", "messages": MSG}, **{"anthropic-beta": "files-api-2025-04-14"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "anthropic-beta"
    for bad in (b"{", b"[]", b'{"messages": []}'):
        assert post(gw, bad).status_code == 400
    assert fake.requests == [] and gw.open_reservations() == 0


def test_an_empty_wallet_cannot_count(start: Callable[..., Gateway], fake: FakeCounter) -> None:
    gw = start(credit_micros=1)
    assert post(gw, {"model": "anthropic/sonnet", "messages": MSG}).status_code == 200
    gw.run(lambda svc: svc.ledger.debit(gw.tenant_id, 1, "empty-it"))
    r = post(gw, {"model": "anthropic/sonnet", "messages": MSG})
    assert r.status_code == 402 and r.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 1 and gw.balance() == 0


def test_provider_errors_are_mapped_and_scrubbed(gw: Gateway) -> None:
    r = post(gw, {"model": "anthropic/broken", "messages": MSG})
    assert r.status_code == 400 and "model unavailable" in r.json()["error"]["message"]
    assert ANTHROPIC_KEY not in r.text and ANTHROPIC_KEY[-12:] not in r.text
    assert gw.open_reservations() == 0 and gw.verify() == []
