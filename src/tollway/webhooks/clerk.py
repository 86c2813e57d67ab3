"""POST /webhooks/clerk: Clerk's events, signed by Svix, that evict keys or delete a tenant.

Only with `[auth] issuer = "clerk"`. A delivery acts only if its `svix-signature` verifies
with the `svix` library under the endpoint secret (auth.clerk_webhook_secret_env) over the
raw body, `svix-id` and `svix-timestamp`, within Svix's ±5 minute tolerance; a missing,
forged or stale signature is a 400 and changes nothing. The body is read against a cap
before anything else (MAX_EVENT_BYTES; the app's control body cap, bodycap.py, is larger).

Once per `svix-id`: a delivery whose id was processed is acknowledged and ignored. The
id is recorded after the action succeeds, so a delivery that failed half-way (Clerk or
the database down: 503) is acted on again when Svix retries; both actions are idempotent.

Actions, each finished on every worker before the 2xx (the revocation bus, auth/workers.py):
  * a type listed in auth.clerk_evict_events: `data.id` is a Clerk key id, evicted from
    every cache (ClerkKeys.evict_key);
  * user.deleted / organization.deleted: `data.id` is the subject; its tenant is deleted
    as `tollway tenants delete` does (tenants.py: keys revoked and evicted, reservations
    released, personal data erased, the books pseudonymised);
  * anything else: acknowledged, recorded, ignored.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from svix.webhooks import Webhook, WebhookVerificationError

from tollway.auth.clerk import SUBJECT_PREFIX, ClerkKeys
from tollway.auth.clerk_api import KEY_ID, SUBJECT
from tollway.config import CLERK_DELETION_EVENTS, ConfigError, resolve_secret
from tollway.errors import BadRequest, PayloadTooLarge, ServiceUnavailable
from tollway.services import Services
from tollway.store.db import now_ms
from tollway.store.schema import clerk_webhook_deliveries, tenants
from tollway.telemetry import log

MAX_EVENT_BYTES = 256 * 1024  # Clerk events are a few kB (a user object at most)
KEEP_IDS_MS = 86_400_000      # far past Svix's 5-minute tolerance: an older id cannot verify again
_HEADERS = ("svix-id", "svix-timestamp", "svix-signature")


class ClerkWebhook:
    def __init__(self, svc: Services, keys: ClerkKeys) -> None:
        self.svc = svc
        self.keys = keys
        self.cfg = svc.config.auth
        self._insert: Any = sqlite.insert if svc.store.is_sqlite else postgresql.insert

    def _verifier(self) -> Webhook:
        try:
            return Webhook(resolve_secret(self.cfg.clerk_webhook_secret_env, path="auth.clerk_webhook_secret_env",
                                          source=self.svc.config.source).reveal())
        except ConfigError:
            problem = "unset"
        except Exception:  # not base64 after "whsec_": the operator pasted something else
            problem = "malformed"
        log.warning("clerk_webhook_rejected", error_code=f"secret_{problem}")
        raise ServiceUnavailable("The Clerk webhook is not configured on this gateway.", code="webhook_unconfigured")

    async def endpoint(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_EVENT_BYTES:
                raise PayloadTooLarge("Webhook body too large.")
        headers = {name: request.headers.get(name, "") for name in _HEADERS}
        return JSONResponse({"received": True, **await self.handle(bytes(body), headers)})

    async def handle(self, payload: bytes, headers: dict[str, str]) -> dict[str, str]:
        """Verify, then act once. BadRequest (400, nothing changed) for a missing, forged
        or stale signature or a body that is not a Clerk event."""
        if not all(headers.get(name) for name in _HEADERS):
            log.warning("clerk_webhook_rejected", error_code="missing_signature")
            raise BadRequest("svix-id, svix-timestamp and svix-signature are required.", code="invalid_signature")
        try:
            self._verifier().verify(payload, headers)
        except WebhookVerificationError:
            log.warning("clerk_webhook_rejected", error_code="invalid_signature")
            raise BadRequest("The Svix signature is invalid or outside the 5-minute tolerance.",
                             code="invalid_signature") from None
        delivery = headers["svix-id"]
        try:
            event = json.loads(payload)
            etype, data = str(event["type"])[:100], event["data"]
            if not isinstance(data, dict) or not 0 < len(delivery) <= 120:
                raise TypeError("data")
        except (ValueError, TypeError, KeyError):
            raise BadRequest("The body is not a Clerk event.", code="invalid_event") from None
        async with self.svc.store.read() as conn:
            seen = (await conn.execute(sa.select(clerk_webhook_deliveries.c.id)
                                       .where(clerk_webhook_deliveries.c.id == delivery))).first()
        if seen is not None:
            outcome = "duplicate"
        else:
            outcome = (await self._apply(etype, data))[:200]
            async with self.svc.store.write() as conn:
                await conn.execute(self._insert(clerk_webhook_deliveries).values(
                    id=delivery, type=etype, outcome=outcome, received_at=now_ms()
                ).on_conflict_do_nothing(index_elements=["id"]))
                await conn.execute(clerk_webhook_deliveries.delete().where(
                    clerk_webhook_deliveries.c.received_at < now_ms() - KEEP_IDS_MS))
        log.info("clerk_webhook", clerk_event_type=etype, outcome=outcome)
        return {"type": etype, "outcome": outcome}

    async def _apply(self, etype: str, data: dict[str, Any]) -> str:
        object_id = data.get("id")
        if etype in CLERK_DELETION_EVENTS:
            if not isinstance(object_id, str) or not SUBJECT.fullmatch(object_id):
                return "ignored: no subject id"
            return await self._delete_subject(object_id)
        if etype in self.cfg.clerk_evict_events:
            if not isinstance(object_id, str) or not KEY_ID.fullmatch(object_id):
                return "ignored: no API key id"
            evicted = await self.keys.evict_key(object_id)
            return "evicted the key" if evicted is not None else "no cached key"
        return "ignored: event type not used"

    async def _delete_subject(self, subject: str) -> str:
        async with self.svc.store.read() as conn:
            tenant_id = (await conn.execute(sa.select(tenants.c.id).where(
                tenants.c.external_id == SUBJECT_PREFIX + subject, tenants.c.deleted_at.is_(None)))).scalar()
        if tenant_id is None:
            return "no tenant for the subject"
        result = await self.svc.tenants.delete(str(tenant_id))  # every key evicted before it returns
        return f"tenant deleted, {result.get('keys_revoked', 0)} keys revoked"


def clerk_routes(svc: Services) -> list[BaseRoute]:
    """POST /webhooks/clerk with auth.issuer = "clerk"; the Clerk secret key is checked at
    start-up, so a missing one is one line from `tollway serve` rather than 503s later."""
    if not isinstance(svc.keys, ClerkKeys):
        return []
    svc.keys.api.secret_env_check()
    return [Route("/webhooks/clerk", ClerkWebhook(svc, svc.keys).endpoint, methods=["POST"])]
