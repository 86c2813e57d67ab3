"""Time the dashboard's usage page for a tenant with 1,000,000 usage rows.

    python bench/dashboard_usage.py                       # SQLite in a temporary folder
    python bench/dashboard_usage.py --database postgresql://postgres@127.0.0.1:5432/bench

Fills the rows straight through the driver (spread over the default 30-day range, so
every row is inside what the page shows: the worst case), folds the finished days as the
serving process does in the background (dashboard/rollup.py), serves the gateway under
uvicorn on loopback, signs in with a one-time link, and fetches /dashboard/usage (and the
CSV) several times. Prints each time and the median; the target is <= 300 ms.
The PostgreSQL database must exist and be empty; it is migrated here. With PostgreSQL set
TOLLWAY_KEY_SECRET and TOLLWAY_SESSION_SECRET (no secret files are generated for it).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from tollway import config as config_mod
from tollway import dashboard
from tollway.app import create_app
from tollway.dashboard.sessions import Sessions
from tollway.services import build

DAY_MS = 86_400_000
MODELS = ["deepseek/deepseek-chat", "openai/gpt-4o-mini", "groq/llama-3.3-70b", "anthropic/claude-haiku"]


def write_config(folder: Path, database: str | None) -> Path:
    url = database or f"sqlite:///{folder / 'bench.db'}"
    path = folder / "tollway.toml"
    path.write_text(f'[database]\nurl = "{url}"\n[dashboard]\npublic_url = "http://127.0.0.1:8080"\n'
                    '[providers.echo]\ntype = "echo"\n[[models]]\nid = "demo/echo"\nprovider = "echo"\n'
                    'upstream = "echo-1"\ninput_usd_per_mtok = "1"\noutput_usd_per_mtok = "2"\n', encoding="utf-8")
    return path


def rows(tenant_id: str, count: int, now_ms: int) -> list[tuple[object, ...]]:
    start = (now_ms // DAY_MS - 29) * DAY_MS  # the default range's first day, 00:00 UTC
    span = now_ms - 1_000 - start
    out: list[tuple[object, ...]] = []
    for i in range(count):
        at = start + (span * i) // count   # ascending, like request ids
        rid = f"req_{at:012x}{secrets.token_hex(8)}"
        out.append((rid, tenant_id, "key_bench", MODELS[i % len(MODELS)], "p", 500 + i % 300, 200 + i % 150, 0, 0,
                    1_000 + i % 977, False, 200, None, 300, at))
    return out


async def fill(cfg: config_mod.Config, count: int) -> str:
    svc = build(cfg)
    try:
        await svc.store.migrate()
        tenant = await svc.tenants.create(name="Bench", email="bench@example.org")
        tenant_id = str(tenant["tenant_id"])
        data = rows(tenant_id, count, int(time.time() * 1000))
        started = time.perf_counter()
        if svc.store.is_sqlite:
            import sqlite3

            assert svc.store.sqlite_file is not None
            with sqlite3.connect(svc.store.sqlite_file) as db:
                db.executemany("INSERT INTO usage_events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", data)
        else:
            import asyncpg

            conn = await asyncpg.connect(cfg.database.url)
            try:
                await conn.copy_records_to_table("usage_events", records=data, columns=[
                    "request_id", "tenant_id", "key_id", "model", "provider", "prompt_tokens", "completion_tokens",
                    "cached_tokens", "reasoning_tokens", "cost_micros", "estimated", "status", "error_type",
                    "latency_ms", "created_at"])
                await conn.execute("ANALYZE usage_events")
            finally:
                await conn.close()
        print(f"filled {count:,} usage rows in {time.perf_counter() - started:.1f} s", flush=True)
        # What a serving process does in the background at start-up and every 10 minutes.
        started = time.perf_counter()
        folded = await dashboard.rollup(svc).fold()
        print(f"folded the finished days into {folded} daily totals in {time.perf_counter() - started:.1f} s "
              "(background, once)", flush=True)
        return tenant_id
    finally:
        await svc.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--database", default=None, help="postgresql://... (default: SQLite in a temporary folder)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_mod.load(write_config(Path(tmp), args.database))
        tenant_id = asyncio.run(fill(cfg, args.rows))
        app = create_app(cfg, provider_keys={}, migrate=False)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        assert cfg.dashboard is not None
        store = app.state.services.store
        sessions = Sessions.from_config(cfg.dashboard, store.sqlite_file, store)[0]
        link = sessions.link(tenant_id).removeprefix(cfg.dashboard.public_url)
        with httpx.Client(base_url=base, timeout=120) as http:
            page = http.get(link)
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token is not None
            cookie = page.headers["set-cookie"].split(";")[0]
            signed = http.post(link, data={"csrf": token.group(1)}, headers={"cookie": cookie})
            session_cookie = signed.headers["set-cookie"].split(";")[0]
            for path in ("/dashboard/usage", "/dashboard/usage.csv"):
                times = []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    r = http.get(path, headers={"cookie": session_cookie})
                    times.append((time.perf_counter() - started) * 1000)
                    assert r.status_code == 200, r.status_code
                print(f"{path:<22} " + " ".join(f"{t:.0f}" for t in times)
                      + f" ms  median {statistics.median(times):.0f} ms", flush=True)
                assert f"{args.rows:,}" in r.text or path.endswith(".csv"), "the page does not count every row"
        server.should_exit = True
        thread.join(10)


if __name__ == "__main__":
    sys.exit(main())
