"""The floor: the least a Python gateway on this stack can cost per request.

    python bench/floor.py --port P --upstream http://127.0.0.1:N

A bare ASGI app under uvicorn with the settings `tollway serve` uses (uvloop, httptools,
no access log) that forwards each POST body to the upstream with one pooled aiohttp
session and relays the answer: no auth, no JSON parsing, no billing, no logging. run.py
measures it like the gateway, so the gap between the two is what Tollway's own work
costs, and the floor shows how much of a CPU target the HTTP stack alone takes.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

Scope = dict[str, Any]


class Forwarder:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.session is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        # The same path layout as the gateway's providers: /json/v1/..., /sse/v1/... or /tok/v1/...
        if b'"bench/tok"' in body:
            kind = "tok"
        else:
            kind = "sse" if b'"stream": true' in body or b'"stream":true' in body else "json"
        async with self.session.post(f"{self.upstream}/{kind}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"}) as resp:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": [(b"content-type", resp.headers.get("content-type", "").encode())]})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of bench nginx")
    args = ap.parse_args()
    if not args.upstream.startswith("http://127.0.0.1:"):
        raise SystemExit("the floor only forwards to 127.0.0.1")
    uvicorn.run(Forwarder(args.upstream), host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", lifespan="on")


if __name__ == "__main__":
    main()
