"""Where the gateway's CPU goes: each step of one /v1 request, timed alone, in-process.

    python bench/components.py [-n 2000] [--translation-only]
    python bench/components.py --rate-limits [--scale-out] [--rounds 9]

Uses the same config as bench/run.py (nginx upstream, SQLite + memory cache, auth and
billing on) and the same functions the pipeline calls, each in a loop of N, reporting
process CPU (utime + stime of every thread, aiosqlite's included) per call. The last
two lines run the whole ASGI app in-process (no HTTP server, no sockets on the client
side): bench/run.py's CPU per request minus that is uvicorn, httptools and the kernel.

--rate-limits runs the whole app twice, each on its own database, with [limits] on (never
reached) and off, taking turns request by request, and prints each side's median CPU per request
and their ratio: what checking per-key rate limits costs, without the HTTP server's and
wrk's noise. With --scale-out both run on a throw-away PostgreSQL database + Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from gateway import JSON_MODEL, PROVIDER_KEY_ENV, RATE_LIMITS, SSE_MODEL, ScaleOut, render_config, request_body
from upstream import Nginx, chat_json, chat_sse, free_port

from tollway import config as config_mod
from tollway import telemetry
from tollway.accesslog import AccessLogWriter
from tollway.app import create_app
from tollway.edge import Edge
from tollway.ledger.holds import MemoryHolds
from tollway.ledger.transactions import Ledger
from tollway.money import Usage, cost, format_usd
from tollway.privacy import forwarded_headers
from tollway.providers import ADAPTERS
from tollway.providers.base import CHAT, Target, merge_headers
from tollway.providers.echo import EchoResponse
from tollway.providers.translate import CHAT_TO_MESSAGES, MESSAGES_TO_CHAT
from tollway.proxy.inbound import header_map, model_slug, parse_json, shape
from tollway.proxy.pipeline import Pipeline
from tollway.proxy.relay import Relay, RelayLimits, StreamEnd
from tollway.services import build

Step = Callable[[int], Awaitable[None]]


async def timed(name: str, n: int, step: Step, results: list[tuple[str, float, float]],
                counter: Callable[[], int] | None = None) -> None:
    for i in range(min(50, n)):  # warm-up: caches, pools, compiled statements
        await step(-1 - i)
    q0 = counter() if counter else 0
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        await step(i)
    c1, w1 = time.process_time(), time.perf_counter()
    per = 1e6 * (c1 - c0) / n
    extra = f"  ({(counter() - q0) / n:.1f} SQL statements each)" if counter else ""
    # sys.__stdout__: sys.stdout is /dev/null meanwhile, swallowing the log lines.
    print(f"  {name:<58} {per:9.1f} us CPU  {1e6 * (w1 - w0) / n:9.1f} us wall{extra}", file=sys.__stdout__,
          flush=True)
    results.append((name, per, 1e6 * (w1 - w0) / n))


def asgi_scope(path: str, key: str, body: bytes) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"authorization", b"Bearer " + key.encode()),
                        (b"content-length", str(len(body)).encode()), (b"user-agent", b"bench")],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080), "state": {}}


async def call_app(app: Any, key: str, body: bytes) -> None:
    """One request through the ASGI app; raises unless it answered 200 and finished."""
    sent = {"status": 0, "done": False}
    first = True
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client never goes away
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            sent["done"] = True

    await app(asgi_scope("/v1/chat/completions", key, body), receive, send)
    if sent["status"] != 200 or not sent["done"]:
        raise RuntimeError(f"in-process request failed: {sent}")


async def lifespan(app: Any) -> Callable[[], Awaitable[None]]:
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()
    await events.put({"type": "lifespan.startup"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"].startswith("lifespan.startup"):
            started.set()

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, events.get, send))
    await started.wait()

    async def stop() -> None:
        await events.put({"type": "lifespan.shutdown"})
        await task

    return stop


async def measure(workdir: Path, nginx: Nginx, n: int, app_only: bool) -> list[tuple[str, float, float]]:
    cfg_path = workdir / "tollway.toml"
    cfg_path.write_text(render_config(workdir, free_port(), nginx.port))
    cfg = config_mod.load(cfg_path)
    svc = build(cfg, worker_id="wk_bench")
    await svc.store.migrate()
    tenant = (await svc.tenants.create("bench"))["tenant_id"]
    key = (await svc.keys.create(tenant, name="bench"))["key"]
    await svc.ledger.credit_manual(tenant, 10**15, "bench")
    # As in app.py's lifespan: a registered, heart-beating worker trusts its key cache.
    max_ms = cfg.server.request_timeout_seconds * 1000 + 60_000
    await svc.workers.start(svc.ledger, max_ms)
    registry = asyncio.create_task(svc.workers.run(svc.ledger, max_ms))
    pipeline = Pipeline(svc, config_mod.provider_secrets(cfg))
    await pipeline.start()
    route, sse_route = pipeline.routes[JSON_MODEL], pipeline.routes[SSE_MODEL]
    req, sse_req = request_body(JSON_MODEL, stream=False), request_body(SSE_MODEL, stream=True)
    scope = asgi_scope("/v1/chat/completions", key, req)
    resp_body, sse_body = chat_json(), chat_sse()
    usage = Usage(prompt_tokens=19, completion_tokens=10)
    results: list[tuple[str, float, float]] = []
    counter = lambda: svc.store.queries  # noqa: E731

    async def auth(_: int) -> None:
        await svc.keys.authenticate(key)

    async def request_json(_: int) -> None:
        headers = header_map(scope)
        body = parse_json(req)
        r = pipeline.routes[model_slug(body)]
        sh = shape(CHAT, body, len(req), r.model, headers, r.target.output_field)
        out = merge_headers(forwarded_headers(headers.items()), r.target.headers, {"cf-aig-metadata": orjson.dumps(
            {"tenant_id": tenant, "key_id": "key_x", "request_id": "req_x"}).decode()})
        r.adapter.prepare(r.target, CHAT, body, sh.stream, out)

    async def response_json(_: int) -> None:
        data = orjson.loads(resp_body)
        u = route.adapter.read_response(route.target, data)
        assert u is not None
        format_usd(cost(u, route.prices))
        orjson.dumps(data)

    def reserve_settle(ledger: Ledger) -> Callable[[int], Awaitable[None]]:
        async def step(i: int) -> None:
            rid = f"req_bench_{os.getpid()}_{i}_{time.perf_counter_ns()}"
            await ledger.reserve(tenant, rid, 5000, key_id="key_x", worker_id="wk_bench")
            await ledger.settle(rid, cost(usage, route.prices), usage={
                "key_id": "key_x", "model": JSON_MODEL, "provider": "nginx_json", "prompt_tokens": 19,
                "completion_tokens": 10, "cached_tokens": 0, "reasoning_tokens": 0, "estimated": False,
                "status": 200, "error_type": None, "latency_ms": 1})
        return step

    async def select_one(_: int) -> None:
        async with svc.store.read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def upstream_json(_: int) -> None:
        r = route.adapter.prepare(route.target, CHAT, parse_json(req), False, dict(route.target.headers))
        resp = await pipeline.upstream.send(r)
        await resp.read(pipeline.max_response)
        resp.release()

    async def upstream_sse(_: int) -> None:
        r = sse_route.adapter.prepare(sse_route.target, CHAT, parse_json(sse_req), True,
                                      dict(sse_route.target.headers))
        resp = await pipeline.upstream.send(r)
        while await resp.chunk():
            pass
        resp.release()

    async def sse_meter(_: int) -> None:
        meter = sse_route.adapter.meter(sse_route.target, strip_usage=True)
        for ev in sse_body.split(b"\n\n"):
            if ev:
                meter.feed(ev)
        assert meter.usage() is not None

    events = [ev + b"\n\n" for ev in sse_body.split(b"\n\n") if ev]

    async def no_disconnect() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def discard(_: Any) -> None:
        pass

    async def settled(_: StreamEnd) -> None:
        pass

    def relay_step(parts: list[bytes]) -> Callable[[int], Awaitable[None]]:
        async def step(_: int) -> None:
            meter = sse_route.adapter.meter(sse_route.target, strip_usage=True)
            relay = Relay(EchoResponse(parts, "text/event-stream"), meter, [], sse_route.adapter.error_event,
                          (), settled, asyncio.get_running_loop().time() + 600, RelayLimits(60, 8_388_608))
            await relay({}, no_disconnect, discard)
            assert meter.usage() is not None
        return step

    async def log_line(_: int) -> None:
        telemetry.record_request(
            request_id="req_x", tenant_id=tenant, key_id="key_x", model=JSON_MODEL, provider="nginx_json",
            method="POST", path="/v1/chat/completions", stream=False, status=200, error_type=None,
            error_code=None, upstream_status=200, prompt_tokens=19, completion_tokens=10, cached_tokens=0,
            reasoning_tokens=0, estimated=False, cost_micros=17, cost_usd="0.000017", latency_ms=1)

    writer = AccessLogWriter(svc.store, batch_rows=10**9)
    edge = Edge(lambda *_: None, writer)  # type: ignore[arg-type]
    scope_done = {**scope, "state": {"request_id": "req_x", "tenant_id": tenant}}

    async def access_row(i: int) -> None:
        edge._record(scope_done, "/v1/chat/completions", 200, 0, 0.001)
        if writer.pending >= 500:  # the writer's default batch
            await writer.flush()

    telemetry.configure_metrics([m.id for m in cfg.models], cfg.providers, cfg.metrics.tenant_labels)
    print(f"{n} calls each; process CPU (all threads) and wall time per call:", file=sys.__stdout__)
    if app_only:
        registry.cancel()
        await pipeline.close()
        await svc.close()
        return await whole_app(cfg, key, req, sse_req, n, results)
    await timed("auth: cached key (HMAC + memory cache)", n, auth, results)
    await timed("request: headers, parse JSON, resolve, shape, patch, dumps", n, request_json, results)
    await timed("response: parse JSON, usage, cost, restore slug, dumps", n, response_json, results)
    await timed("SSE: split + meter 13 events (usage read, model rewritten)", n, sse_meter, results)
    await timed(f"relay: {len(events)} events in one read (ASGI sends discarded)", n,
                relay_step([b"".join(events)]), results)
    await timed(f"relay: {len(events)} events, one per read (token by token)", n,
                relay_step(events), results)
    await translation(n, sse_route.target, req, resp_body, sse_body, results)
    await timed("ledger: reserve + settle with usage row (SQLite, holds committed)", n, reserve_settle(svc.ledger),
                results, counter)
    await timed("ledger: the same, holds in memory (one serving process)", n,
                reserve_settle(Ledger(svc.store, MemoryHolds())), results, counter)
    await timed("  for scale: one SQLite read transaction, SELECT 1", n, select_one, results, counter)
    await timed("upstream: aiohttp POST to nginx, read JSON body", n, upstream_json, results)
    await timed("upstream: aiohttp POST to nginx, read SSE body", n, upstream_sse, results)
    await timed("log line + metrics (telemetry.record_request)", n, log_line, results)
    await timed("access log: row + batched insert (500 per flush)", n, access_row, results)
    await writer.flush()
    registry.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await registry
    await svc.workers.unregister()
    await pipeline.close()
    await svc.close()
    return await whole_app(cfg, key, req, sse_req, n, results)


def anthropic_sse_events(words: list[str]) -> list[bytes]:
    """A Messages stream as Anthropic sends it: start, one text block, a delta per word, the
    usage in message_delta, stop."""
    def event(name: str, **data: Any) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data})

    usage = {"input_tokens": 19, "output_tokens": 1, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    return [event("message_start", message={"id": "msg_bench", "type": "message", "role": "assistant",
                                            "model": "bench-upstream-model", "content": [], "stop_reason": None,
                                            "stop_sequence": None, "usage": usage}),
            event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            *(event("content_block_delta", index=0, delta={"type": "text_delta", "text": w}) for w in words),
            event("content_block_stop", index=0),
            event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                  usage={"output_tokens": 10}),
            event("message_stop")]


async def translation(n: int, target: Target, chat_req: bytes, chat_resp: bytes, chat_sse: bytes,
                      results: list[tuple[str, float, float]]) -> None:
    """What OpenAI <-> Anthropic translation adds (providers/translate): per request, the
    body both ways; per stream event, the converter behind the provider format's meter."""
    words = ["Hello", " there", ",", " this", " is", " a", " fixed", " answer", "."]
    anthropic, openai = ADAPTERS["anthropic"], ADAPTERS["openai"]
    a_events = anthropic_sse_events(words)
    c_events = [ev for ev in chat_sse.split(b"\n\n") if ev]
    a_resp = orjson.dumps({"id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-upstream-model",
                           "content": [{"type": "text", "text": "".join(words)}], "stop_reason": "end_turn",
                           "stop_sequence": None, "usage": {"input_tokens": 19, "output_tokens": 10}})
    m_req = orjson.dumps({"model": target.slug, "max_tokens": 64, "system": "You are a terse assistant.",
                          "messages": [{"role": "user", "content": "Say hello in one short sentence."}]})

    async def chat_request(_: int) -> None:
        orjson.dumps(CHAT_TO_MESSAGES.request(parse_json(chat_req), target))  # dumps: the bound's size

    async def messages_request(_: int) -> None:
        orjson.dumps(MESSAGES_TO_CHAT.request(parse_json(m_req), target))

    async def chat_answer(_: int) -> None:
        data = orjson.loads(a_resp)
        u = anthropic.read_response(target, data)
        assert u is not None
        orjson.dumps(CHAT_TO_MESSAGES.response(data, u, target.slug))

    async def messages_answer(_: int) -> None:
        data = orjson.loads(chat_resp)
        u = openai.read_response(target, data)
        assert u is not None
        orjson.dumps(MESSAGES_TO_CHAT.response(data, u, target.slug))

    def stream(adapter: Any, events: list[bytes], tr: Any) -> Callable[[int], Awaitable[None]]:
        async def step(_: int) -> None:
            meter = adapter.meter(target, strip_usage=True)
            if tr is not None:
                meter = tr.stream(meter, target, True)
            for ev in events:
                meter.feed(ev)
            assert meter.usage() is not None
        return step

    await timed("translate: chat request -> Anthropic body (+ its size)", n, chat_request, results)
    await timed("translate: Anthropic answer -> chat.completion (+ usage)", n, chat_answer, results)
    await timed("translate: Messages request -> chat body (+ its size)", n, messages_request, results)
    await timed("translate: chat.completion -> Anthropic answer (+ usage)", n, messages_answer, results)
    for name, adapter, events, tr in (("Anthropic events -> chat chunks", anthropic, a_events, CHAT_TO_MESSAGES),
                                      ("chat chunks -> Anthropic events", openai, c_events, MESSAGES_TO_CHAT)):
        await timed(f"SSE: {len(events)} events, provider format's meter only", n, stream(adapter, events, None),
                    results)
        await timed(f"SSE: the same, translated ({name})", n, stream(adapter, events, tr), results)
        extra = (results[-1][1] - results[-2][1]) / len(events)
        print(f"  {'  = translation per stream event':<58} {extra:9.1f} us CPU", file=sys.__stdout__, flush=True)


async def whole_app(cfg: config_mod.Config, key: str, req: bytes, sse_req: bytes, n: int,
                    results: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    app = create_app(cfg)
    stop = await lifespan(app)
    try:
        await timed("WHOLE APP in-process (ASGI, no server): non-streaming", n, lambda _: call_app(app, key, req),
                    results)
        await timed("WHOLE APP in-process (ASGI, no server): streaming", n, lambda _: call_app(app, key, sse_req),
                    results)
    finally:
        await stop()
    return results


async def rate_limit_cost(workdir: Path, nginx: Nginx, n: int, rounds: int, databases: dict[str, ScaleOut]) -> None:
    """`databases`: side -> its PostgreSQL database (scale-out), or empty: each side its own SQLite file."""
    apps: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for side in ("off", "on"):
        folder = workdir / side
        folder.mkdir()
        db = databases.get(side)
        (folder / "tollway.toml").write_text((RATE_LIMITS if side == "on" else "") + render_config(
            folder, free_port(), nginx.port, db.url if db else None, ScaleOut.REDIS_URL if db else "memory://"))
        cfg = config_mod.load(folder / "tollway.toml")
        svc = build(cfg, worker_id="wk_setup")
        await svc.store.migrate()
        tenant = (await svc.tenants.create("bench"))["tenant_id"]
        keys[side] = (await svc.keys.create(tenant, name="bench"))["key"]
        await svc.ledger.credit_manual(tenant, 10**15, "bench")
        await svc.close()
        apps[side] = create_app(cfg)
    stops = [await lifespan(app) for app in apps.values()]
    bodies = {"json": request_body(JSON_MODEL, stream=False), "sse": request_body(SSE_MODEL, stream=True)}
    cpu: dict[tuple[str, str], list[float]] = {}
    wall: dict[tuple[str, str], list[float]] = {}
    try:
        for body in bodies.values():
            for side, app in apps.items():  # warm-up: key caches, pools, compiled statements
                for _ in range(50):
                    await call_app(app, keys[side], body)
        for _ in range(rounds):
            for kind, body in bodies.items():
                # The two sides take turns request by request, so a slower moment of the
                # machine falls on both alike (a round of each in turn measured ±15%).
                spent = {"off": 0.0, "on": 0.0}
                waited = {"off": 0.0, "on": 0.0}
                for i in range(2 * n):
                    side = ("off", "on")[(i + i // 2) % 2]  # off on on off off on ...: neither always first
                    c0, w0 = time.process_time(), time.perf_counter()
                    await call_app(apps[side], keys[side], body)
                    spent[side] += time.process_time() - c0
                    waited[side] += time.perf_counter() - w0
                for side, seconds in spent.items():
                    cpu.setdefault((kind, side), []).append(1e6 * seconds / n)
                    wall.setdefault((kind, side), []).append(1e6 * waited[side] / n)
    finally:
        for stop in stops:
            await stop()
    stack = "PostgreSQL + Redis" if databases else "SQLite + memory"
    print(f"rate limits off/on, whole app in-process ({stack}), {rounds} rounds x {n} calls, one at a time; "
          f"median CPU per request:", file=sys.__stdout__)
    for kind in bodies:
        off, on = (statistics.median(cpu[(kind, s)]) for s in ("off", "on"))
        ratios = sorted(b / a for a, b in zip(cpu[(kind, "off")], cpu[(kind, "on")], strict=True))
        print(f"  {kind:<5} off {off:8.1f} us  on {on:8.1f} us  +{on - off:6.1f} us  ratio {on / off:.3f}  "
              f"(per round {statistics.median(ratios):.3f}, {ratios[0]:.3f}-{ratios[-1]:.3f});  wall "
              f"{statistics.median(wall[(kind, 'off')]):.0f} / {statistics.median(wall[(kind, 'on')]):.0f} us",
              file=sys.__stdout__, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="calls per step (default 2000)")
    ap.add_argument("--app-only", action="store_true", help="only the whole-app lines (e.g. under py-spy)")
    ap.add_argument("--translation-only", action="store_true",
                    help="only the OpenAI <-> Anthropic translation lines (pure functions: no nginx, no database)")
    ap.add_argument("--rate-limits", action="store_true", help="the whole app with [limits] on vs off (above)")
    ap.add_argument("--scale-out", action="store_true", help="with --rate-limits: on PostgreSQL + Redis")
    ap.add_argument("--rounds", type=int, default=9, help="with --rate-limits: alternating rounds per side")
    args = ap.parse_args()
    if args.translation_only:
        import uvloop

        target = Target(SSE_MODEL, "bench-upstream-model", "bench", "http://127.0.0.1:1", {})
        print(f"{args.n} calls each; process CPU and wall time per call:")
        uvloop.run(translation(args.n, target, request_body(SSE_MODEL, stream=True), chat_json(), chat_sse(), []))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="tollway-components-"))
    os.environ[PROVIDER_KEY_ENV] = "sk-bench-" + os.urandom(12).hex()
    for name in [k for k in os.environ if k.startswith("TOLLWAY_")]:
        del os.environ[name]
    nginx = Nginx(workdir)
    databases = {side: ScaleOut() for side in ("off", "on")} if args.rate_limits and args.scale_out else {}
    try:
        nginx.start()
        import uvloop

        # Log lines (one per request, as in production) go to /dev/null, not the terminal.
        with open(os.devnull, "w") as devnull:
            sys.stdout = devnull
            try:
                if args.rate_limits:
                    for db in databases.values():
                        db.create()
                    if databases:  # PostgreSQL takes the key secret from the environment
                        os.environ["TOLLWAY_KEY_SECRET"] = os.urandom(24).hex()
                    uvloop.run(rate_limit_cost(workdir, nginx, args.n, args.rounds, databases))
                else:
                    uvloop.run(measure(workdir, nginx, args.n, args.app_only))  # the loop `tollway serve` runs on
            finally:
                sys.stdout = sys.__stdout__
    finally:
        for db in databases.values():
            db.drop()
        nginx.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
