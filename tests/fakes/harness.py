"""A gateway wired to fake upstreams on loopback, with a funded tenant and key.

The gateway runs in its own thread and event loop (serve_app); the test reads and
writes the same database through a second Services object built from the same config,
one short event loop per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
import sqlalchemy as sa

from tollway.app import create_app
from tollway.config import Config, Secret
from tollway.services import Services, build
from tollway.store.schema import reservations, usage_events

T = TypeVar("T")

PROVIDER_KEY = "sk-fk-9Qz7xW2mLp4Rt8Vn3Bc6Hd1Jf5Kg0YsUe"
ANTHROPIC_KEY = "sk-ant-api03-Zr4Tq8Wm2Xn6Bv1Cy5Du9Ep3Fa7Gk0"
PRICES = {"input_usd_per_mtok": "2.50", "output_usd_per_mtok": "10.00",
          "cached_input_usd_per_mtok": "1.25", "reasoning_usd_per_mtok": "12.00"}


def fake_models(provider: str = "fake") -> list[dict[str, Any]]:
    names = ["chat", "usage-on-choice", "nousage", "groq", "stall", "slow", "cut", "sleep", "onewrite",
             "big", "think", "think-endless", "running",
             "400", "401", "429", "500", "503"]
    models = [{"id": f"acme/{n}", "provider": provider, "upstream": f"fake-{n}", **PRICES} for n in names]
    models.append({"id": "acme/embed", "provider": provider, "upstream": "fake-embed", "kind": "embedding",
                   "input_usd_per_mtok": "0.10", "output_usd_per_mtok": "0"})
    models.append({"id": "demo/echo", "provider": "echo", "upstream": "echo-1",
                   "input_usd_per_mtok": "1.00", "output_usd_per_mtok": "2.00"})
    return models


@dataclass
class Gateway:
    url: str
    cfg: Config
    tenant_id: str
    key_id: str
    key: str
    clients: list[openai.OpenAI] = field(default_factory=list)
    served: Services | None = None  # the serving app's own services (its holds in memory)
    server: Any = None  # its ServerThread (conftest.py), to run coroutines on its loop

    def on_server(self, fn: Callable[[Services], Awaitable[T]]) -> T:
        """fn(the serving app's services), run on the server's loop: what the gateway itself sees."""
        assert self.served is not None and self.server is not None

        async def go() -> T:
            assert self.served is not None
            return await fn(self.served)

        return self.server.call(go())  # type: ignore[no-any-return]

    def run(self, fn: Callable[[Services], Awaitable[T]]) -> T:
        async def go() -> T:
            svc = build(self.cfg)
            try:
                return await fn(svc)
            finally:
                await svc.close()

        return asyncio.run(go())

    def client(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", self.key), **kw)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def balance(self) -> int:
        """What the gateway says the tenant can spend (its own charges not yet applied included)."""
        if self.served is not None and self.server is not None:
            return self.on_server(lambda svc: svc.ledger.balance(self.tenant_id))
        return self.run(lambda svc: svc.ledger.balance(self.tenant_id))

    def verify(self) -> list[str]:
        return self.run(lambda svc: svc.ledger.verify(3_600_000))

    def usage_row(self, request_id: str, wait: float = 5.0) -> dict[str, Any]:
        async def read(svc: Services) -> dict[str, Any] | None:
            async with svc.store.read() as conn:
                row = (await conn.execute(sa.select(usage_events).where(
                    usage_events.c.request_id == request_id))).mappings().first()
            return dict(row) if row else None

        deadline = time.monotonic() + wait
        while True:
            row = self.run(read)
            if row is not None or time.monotonic() > deadline:
                assert row is not None, f"no usage row for {request_id}"
                return row
            time.sleep(0.05)

    def held(self) -> int:
        """Micro-USD the tenant has on hold now: committed holds plus the serving process's."""
        async def committed(svc: Services) -> int:
            async with svc.store.read() as conn:
                return int((await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(reservations.c.amount_micros), 0))
                                               .where(reservations.c.tenant_id == self.tenant_id))).scalar_one())

        holds = self.served.ledger.holds if self.served is not None else None
        return self.run(committed) + (holds.reserved(self.tenant_id) if holds is not None else 0)

    def open_reservations(self) -> int:
        """Holds still open: committed ones and those the serving process keeps in memory."""
        async def count(svc: Services) -> int:
            async with svc.store.read() as conn:
                return int((await conn.execute(sa.select(sa.func.count()).select_from(reservations))).scalar_one())

        in_memory = len(self.served.ledger.held_in_memory()) if self.served is not None else 0
        return self.run(count) + in_memory


def start_gateway(make_config: Callable[..., Config], serve_app: Callable[[Any], Any], upstream_url: str,
                  *, credit_micros: int = 10_000_000, models: list[dict[str, Any]] | None = None,
                  anthropic_url: str | None = None, provider_keys: dict[str, Secret] | None = None,
                  fake_provider: dict[str, Any] | None = None, providers: dict[str, Any] | None = None,
                  extra_providers: dict[str, tuple[dict[str, Any], Secret | None]] | None = None,
                  **sections: Any) -> Gateway:
    """sections: make_config sections; attribution=None leaves [attribution] out;
    `providers` (with `provider_keys`) replaces the fake, echo and claude providers;
    extra_providers: name -> (its [providers.NAME] table, its key)."""
    providers = providers or {
        "fake": {"type": "openai", "base_url": upstream_url + "/v1", "api_key_env": "FAKE_PROVIDER_KEY",
                 "cf_collect_log_payload": False, "extra_headers": {"x-extra": "configured"}},
        "echo": {"type": "echo"},
    }
    if "fake" in providers:
        providers["fake"].update(fake_provider or {})
    keys = {"fake": Secret("FAKE_PROVIDER_KEY", PROVIDER_KEY)}
    if anthropic_url:
        providers["claude"] = {"type": "anthropic", "base_url": anthropic_url, "api_key_env": "FAKE_ANTHROPIC_KEY"}
        keys["claude"] = Secret("FAKE_ANTHROPIC_KEY", ANTHROPIC_KEY)
    if "attribution" not in sections:
        sections["attribution"] = {"header": "cf-aig-metadata"}
    elif sections["attribution"] is None:
        del sections["attribution"]
    if provider_keys is not None:
        keys = provider_keys
    for name, (table, secret) in (extra_providers or {}).items():
        providers[name] = table
        if secret is not None:
            keys[name] = secret
    cfg = make_config(providers=providers, models=models or fake_models(), **sections)
    app = create_app(cfg, provider_keys=keys, migrate=True)
    server = serve_app(app)

    async def fund(svc: Services) -> tuple[str, str, str]:
        tenant = await svc.tenants.create(name="Ada")
        key = await svc.keys.create(tenant["tenant_id"], name="test")
        await svc.ledger.credit(tenant["tenant_id"], credit_micros, "fund-" + tenant["tenant_id"])
        return tenant["tenant_id"], key["key_id"], key["key"]

    gw = Gateway(server.url, cfg, "", "", "", served=app.state.services, server=server)
    gw.tenant_id, gw.key_id, gw.key = gw.run(fund)
    return gw


def launcher(make_config: Callable[..., Config], serve_app: Callable[[Any], Any]
             ) -> Iterator[Callable[..., Gateway]]:
    """Body of a test module's `launch` fixture: start_gateway, closing the SDK clients
    (their connection pools) at teardown."""
    made: list[Gateway] = []

    def launch(upstream_url: str, **kw: Any) -> Gateway:
        gw = start_gateway(make_config, serve_app, upstream_url, **kw)
        made.append(gw)
        return gw

    yield launch
    for gw in made:
        gw.close()
