"""TEMPORARY scaffold, replaced by the proxy work: only /v1/models."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tollway.keys import bearer_key
from tollway.services import Services


class Proxy:
    def __init__(self, svc: Services, provider_keys: dict[str, Any]) -> None:
        self.svc = svc
        self.provider_keys = provider_keys

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/models", self.models, methods=["GET"])]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def models(self, request: Request) -> Response:
        await self.svc.keys.authenticate(bearer_key(request.headers))
        data = [{"id": m.id, "object": "model", "created": 0, "owned_by": m.provider} for m in self.svc.config.models]
        return JSONResponse({"object": "list", "data": data})
