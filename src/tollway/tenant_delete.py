"""`tollway tenants delete` while a gateway serves the SQLite database alone.

Why not delete from the CLI's own process: such a gateway keeps its holds in memory and
its settled charges in its journal until the next flush (ledger/holds.py, ledger/journal.py). The CLI
sees neither, so it found nothing in flight, erased the tenant, and the gateway's charges
then had no wallet to land in: answers the client was told it paid for went free. The
gateway's own deletion (the admin API's DELETE /admin/tenants/{id}) releases and flushes
them first, so the CLI hands the deletion to it, or refuses, with the reason, when it
cannot reach it (no admin token in its environment, or no answer at the configured
address: `serve --port` overrides the config the CLI reads).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tollway.config import Config

_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - where a server listens on all, ask loopback
TIMEOUT_SECONDS = 120  # a deletion waits for in-flight requests and a checkpoint (tenants.py)


class ServerDeleteError(Exception):
    """The deletion could not be handed to the running gateway; nothing was deleted by us."""


def delete_through_server(cfg: Config, tenant_id: str) -> dict[str, Any]:
    env = cfg.server.admin_token_env
    served = "a running `tollway serve` keeps this database's in-flight and journaled charges in its memory"
    token = os.environ.get(env, "")
    if not token:
        raise ServerDeleteError(f"{served}, so the tenant can only be deleted through it: set {env} to its admin "
                                f"token and run this again, or call DELETE /admin/tenants/{{id}} on it")
    host = cfg.server.host if cfg.server.host not in _ANY_ADDRESS else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{cfg.server.port}/admin/tenants/{urllib.parse.quote(tenant_id, safe='')}"
    request = urllib.request.Request(url, method="DELETE", headers={"authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as resp:  # noqa: S310 - http(s) only
            result: dict[str, Any] = json.loads(resp.read())
            return result
    except urllib.error.HTTPError as exc:
        raise ServerDeleteError(f"the running gateway refused the deletion (HTTP {exc.code}): "
                                f"{_message(exc.read())}") from None
    except (OSError, ValueError) as exc:
        raise ServerDeleteError(f"{served}, and it did not answer at {url} ({type(exc).__name__}); nothing was "
                                f"deleted. Call DELETE /admin/tenants/{{id}} on it where it listens") from None


def _message(raw: bytes) -> str:
    try:
        error = json.loads(raw).get("error", {})
        return str(error.get("message") or "no details")[:300]
    except (ValueError, AttributeError):
        return "no details"
