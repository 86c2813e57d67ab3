"""Schema fuzzing of /admin with Schemathesis, against a real gateway on loopback.

The document the gateway publishes at /admin/openapi.json is the contract: Schemathesis
generates requests from it (schema-valid and schema-invalid ones), for every operation,
with the operator token and without it (missing or wrong), and checks each answer: no
5xx, a status code the document lists, a body and headers the document describes,
schema-valid input accepted and schema-invalid input refused, 405s naming the methods the
path really has. Path parameters are often swapped for the ids of a seeded live tenant
and key, a deleted tenant and a revoked key, so the handlers run past their lookups.
A refused call (any 4xx) must change nothing: the business tables are compared whole
before and after it.

Budget: TOLLWAY_FUZZ_EXAMPLES examples per test run, shared by the operations (default
150; .ci/run sets more).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import ServerThread
from tollway.app import create_app
from tollway.config import Config
from tollway.services import Services
from tollway.store import schema as tables

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("TOLLWAY_FUZZ_EXAMPLES", "150"))
_FRAMING = frozenset({"transfer-encoding", "content-length", "connection", "host", "te", "upgrade", "expect"})
TOKEN = "admin-token-for-schema-fuzzing-0123456789"
# Every table an admin call may write; access_log and workers change on their own.
WATCHED = [tables.tenants, tables.api_keys, tables.key_spend, tables.wallets, tables.ledger_entries,
           tables.reservations, tables.set_aside_charges, tables.revocations, tables.topups,
           tables.deletion_requests, tables.usage_events]


def admin(server: ServerThread, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    return httpx.request(method, server.url + "/admin" + path, headers=headers, timeout=30, **kw)


async def _digest(svc: Services) -> str:
    h = hashlib.sha256()
    async with svc.store.read() as conn:
        for table in WATCHED:
            rows = (await conn.execute(sa.select(table))).all()
            h.update(table.name.encode() + b"\0" + repr(sorted(repr(tuple(r)) for r in rows)).encode())
    return h.hexdigest()


class Target:
    """The gateway under fuzzing, its seeded objects and the published document."""

    def __init__(self, server: ServerThread, svc: Services) -> None:
        self.server, self.svc = server, svc
        live = admin(server, "POST", "/tenants", json={"name": "Live", "email": "live@example.com"}).json()
        self.live = live["tenant_id"]
        key = admin(server, "POST", f"/tenants/{self.live}/keys", json={"name": "k"}).json()
        self.key = key["key_id"]
        revoked = admin(server, "POST", f"/tenants/{self.live}/keys", json={"name": "r"}).json()["key_id"]
        assert admin(server, "POST", f"/keys/{revoked}/revoke").status_code == 200
        self.revoked = revoked
        assert admin(server, "POST", f"/tenants/{self.live}/wallet/credit",
                     json={"amount_usd": "3.00", "reference": "seed"}).status_code == 200
        gone = admin(server, "POST", "/tenants", json={"name": "Gone"}).json()["tenant_id"]
        assert admin(server, "DELETE", f"/tenants/{gone}").status_code == 200
        self.gone = gone
        self.document = admin(server, "GET", "/openapi.json").json()

    def snapshot(self) -> str:
        return str(self.server.call(_digest(self.svc)))

    @property
    def base_url(self) -> str:
        # The document's own servers entry places its paths: nothing here knows "/admin".
        servers = self.document.get("servers") or [{"url": "/"}]
        return urljoin(self.server.url + "/", str(servers[0]["url"]))


@pytest.fixture
def target(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
           monkeypatch: pytest.MonkeyPatch, backend: dict[str, Any]) -> Target:
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
    app = create_app(make_config(**backend), provider_keys={}, migrate=True)
    server = serve_app(app)
    return Target(server, app.state.services)


def _ids(t: Target, name: str) -> list[str | None]:
    if name == "tenant_id":
        return [None, t.live, t.live, t.gone]
    if name == "key_id":
        return [None, t.key, t.revoked]
    return [None]


def _expiry_passed(case: Case[Any]) -> bool:
    body = case.body
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return False
    if not (isinstance(body, dict) and case.operation.path.endswith("/keys") and case.method.upper() == "POST"):
        return False
    expires = body.get("expires_at")
    return isinstance(expires, int | float) and not isinstance(expires, bool) and 0 <= expires <= time.time() * 1000


def _fuzz(t: Target, with_token: bool) -> int:
    schema = schemathesis.openapi.from_dict(t.document)
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "the document has operations Schemathesis cannot read"
    assert len(operations) == 12, [op.label for op in operations]
    per_operation = max(EXAMPLES // len(operations), 3)
    ran = 0
    session = httpx.Client(timeout=30)
    auths: list[dict[str, str]] = (
        [{"authorization": f"Bearer {TOKEN}"}] if with_token
        else [{}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}, {"authorization": f"Basic {TOKEN}"}])

    for op in operations:
        names = [p.name for p in op.path_parameters]
        cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))
        seeded = st.fixed_dictionaries({n: st.sampled_from(_ids(t, n)) for n in names})

        @settings(max_examples=per_operation, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases, ids=seeded, auth=st.sampled_from(auths))
        def run(case: Case[Any], ids: dict[str, str | None], auth: dict[str, str]) -> None:
            nonlocal ran
            ran += 1
            if case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE:
                # Only schema-valid cases: a negative case may be negative by its path parameter.
                for name, value in ids.items():
                    if value is not None and case.path_parameters is not None:
                        case.path_parameters[name] = value
            if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
                auth = {}  # the generated, schema-violating Authorization header is what is tested
            elif auth and case.headers:
                # Schemathesis generates a bearer value of its own for the declared scheme.
                for name in [k for k in case.headers if k.lower() == "authorization"]:
                    del case.headers[name]
            for name in [k for k in (case.headers or {}) if k.lower() in _FRAMING]:
                # Message framing is the HTTP server's, not the API's: an empty Transfer-Encoding
                # makes uvicorn's parser refuse the request (a text/plain 400) before the app sees it.
                del case.headers[name]
            before = t.snapshot()
            response = case.call(base_url=t.base_url, headers=auth)
            excluded: list[Any] = []
            if with_token and auth and _expiry_passed(case):
                # The one rule a static document cannot state: expires_at must be in the future.
                assert response.status_code == 400 and "expires_at" in response.text, response.text
                excluded.append(positive_data_acceptance)
            # The token goes in `headers` only: the auth probes resend with transport_kwargs.
            case.validate_response(response, headers=auth, transport_kwargs={"base_url": t.base_url},
                                   excluded_checks=excluded)
            if not auth or not with_token:
                assert response.status_code == 401, (case.as_curl_command(), response.status_code)
            if 400 <= response.status_code < 500:
                assert t.snapshot() == before, ("a refused call changed state", case.as_curl_command(),
                                                response.status_code, response.text[:300])

        run()
    session.close()
    return ran


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_admin_api_conforms_to_its_document(target: Target, with_token: bool) -> None:
    started = time.monotonic()
    ran = _fuzz(target, with_token)
    print(f"schemathesis: {ran} cases in {time.monotonic() - started:.1f}s")
    assert ran >= 11


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_405_names_every_method_of_the_path(target: Target) -> None:
    """Each documented path, asked with a method it does not have: 405 and an Allow header
    listing exactly the document's methods for that path."""
    assert target.document["servers"] == [{"url": "/admin"}]
    for path, item in target.document["paths"].items():
        documented = {m.upper() for m in item}
        concrete = path.replace("{tenant_id}", target.live).replace("{key_id}", target.key)
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - documented:
            r = httpx.request(method, target.base_url + concrete, timeout=30,
                              headers={"authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "method_not_allowed"
            allowed = {m.strip() for m in r.headers["allow"].split(",")}
            assert allowed == documented, (method, path, allowed)


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_deleted_tenant_is_404_on_every_route_but_delete(target: Target) -> None:
    """A deleted tenant answers like an unknown one (404) everywhere; DELETE is idempotent
    (200, already_deleted: true). Its key, revoked by the deletion, can be revoked again."""
    gone = target.gone
    before = target.snapshot()
    for method, path, body in [("GET", f"/tenants/{gone}", None), ("GET", f"/tenants/{gone}/export", None),
                               ("GET", f"/tenants/{gone}/keys", None), ("GET", f"/tenants/{gone}/wallet", None),
                               ("POST", f"/tenants/{gone}/keys", {}),
                               ("POST", f"/tenants/{gone}/wallet/credit", {"amount_usd": "1.00", "reference": "x"}),
                               ("POST", f"/tenants/{gone}/topups", {"amount_usd": "5.00"})]:
        r = admin(target.server, method, path, json=body)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] in ("not_found", "payments_disabled")
    assert target.snapshot() == before
    again = admin(target.server, "DELETE", f"/tenants/{gone}")
    assert again.status_code == 200 and again.json()["already_deleted"] is True
    assert target.snapshot() == before


def test_text_the_database_cannot_store_is_400(target: Target) -> None:
    """Found by the fuzzer on PostgreSQL: a NUL character (and, by the same road, an unpaired
    surrogate) in a body field or a path id reached the driver and came back as a 500."""
    live = target.live
    before = target.snapshot()
    for method, path, raw in [
        ("POST", "/tenants", b'{"name": "a\\u0000b"}'),
        ("POST", "/tenants", b'{"email": "\\ud800@example.com"}'),
        ("POST", f"/tenants/{live}/keys", b'{"name": "k\\u0000"}'),
        ("POST", f"/tenants/{live}/wallet/credit", b'{"amount_usd": "1.00", "reference": "r\\u0000"}'),
        ("POST", f"/tenants/{live}/topups", b'{"amount_usd": "5.00", "idempotency_key": "\\u0000"}'),
        ("GET", "/tenants/tn%00x", None), ("DELETE", "/tenants/tn%00x", None), ("GET", "/tenants/tn%00x/keys", None),
        ("GET", "/tenants/tn%00x/wallet", None), ("GET", "/tenants/tn%00x/export", None),
        ("POST", "/keys/key%00x/revoke", None),
    ]:
        r = admin(target.server, method, path, content=raw)
        assert r.status_code == 400, (method, path, r.status_code, r.text[:200])
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert target.snapshot() == before
