"""The /v1 routes: thin ASGI endpoints over the pipeline.

The POST endpoints are plain ASGI callables (no Request object, no per-request
exception wrapper): the hot path reads the scope directly and the pipeline renders
its own errors.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tollway.auth.keys import bearer_key
from tollway.config import ModelConfig
from tollway.errors import ModelNotFound
from tollway.providers.base import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES
from tollway.proxy import count_tokens
from tollway.proxy.pipeline import Pipeline
from tollway.services import Services


class _Endpoint:
    __slots__ = ("endpoint", "pipeline")

    def __init__(self, pipeline: Pipeline, endpoint: str) -> None:
        self.pipeline = pipeline
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.pipeline(self.endpoint, scope, receive, send)


class Proxy:
    """The /v1 data plane; app.create_app builds one per worker process."""

    def __init__(self, svc: Services, provider_keys: dict[str, Any]) -> None:
        self.svc = svc
        self.pipeline = Pipeline(svc, provider_keys)
        p = self.pipeline
        self._posts: dict[str, ASGIApp] = {
            "/v1/chat/completions": _Endpoint(p, CHAT), "/v1/completions": _Endpoint(p, COMPLETIONS),
            "/v1/embeddings": _Endpoint(p, EMBEDDINGS), "/v1/messages": _Endpoint(p, MESSAGES),
            "/v1/responses": _Endpoint(p, RESPONSES), count_tokens.PATH: count_tokens.TokenCounter(p)}

    def shortcuts(self) -> dict[str, ASGIApp]:
        """The POST endpoints by exact path, for the edge to call directly (edge.py)."""
        return dict(self._posts)

    def routes(self) -> list[BaseRoute]:
        # The POST endpoints are routes too (a request the edge does not shortcut, e.g. with a
        # trailing slash redirect or a wrong method, gets Starlette's usual answer).
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            *(Route(path, endpoint, methods=["POST"]) for path, endpoint in self.shortcuts().items()),
        ]

    async def start(self) -> None:
        """Create the one pooled upstream client (inside the serving event loop)."""
        await self.pipeline.start()

    async def close(self) -> None:
        await self.pipeline.close()

    async def models(self, request: Request) -> Response:
        await self.svc.keys.authenticate(bearer_key(request.headers))
        return JSONResponse({"object": "list", "data": [_listed(m) for m in self.svc.config.models]})

    async def model(self, request: Request) -> Response:
        await self.svc.keys.authenticate(bearer_key(request.headers))
        slug = request.path_params["model"]
        found = self.svc.config.model(slug)
        if found is None:
            raise ModelNotFound(f"The model '{slug[:200]}' does not exist or you do not have access to it.",
                                param="model")
        return JSONResponse(_listed(found))


def _listed(m: ModelConfig) -> dict[str, Any]:
    # `created` is required by the OpenAI list format; configured models have no date.
    return {"id": m.id, "object": "model", "created": 0, "owned_by": m.provider}
