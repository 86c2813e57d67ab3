"""The rules behind fallbacks and retries, without a network: what the config accepts as a
fallback and a retry policy (config.py), and when and how long a retry waits (retry.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import to_toml
from tollway import config as config_mod
from tollway.config import ConfigError
from tollway.proxy.retry import RetryPolicy, moves_on, pause, retry_after, retryable, should_retry

PRICE = {"input_usd_per_mtok": "1", "output_usd_per_mtok": "2"}


def load(tmp_path: Path, models: list[dict[str, Any]], server: dict[str, Any] | None = None) -> config_mod.Config:
    data: dict[str, Any] = {
        "providers": {"o1": {"type": "openai", "base_url": "https://a.invalid/v1", "api_key_env": "K1"},
                      "o2": {"type": "openai", "base_url": "https://b.invalid/v1", "api_key_env": "K2"},
                      "ant": {"type": "anthropic", "base_url": "https://c.invalid", "api_key_env": "K3"}},
        "models": models}
    if server:
        data["server"] = server
    path = tmp_path / "tollway.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return config_mod.load(path)


def m(slug: str, provider: str = "o1", **more: Any) -> dict[str, Any]:
    return {"id": slug, "provider": provider, "upstream": slug.split("/")[-1], **PRICE, **more}


def test_fallbacks_load_in_order_and_mutual_ones_are_allowed(tmp_path: Path) -> None:
    cfg = load(tmp_path, [m("x/a", fallbacks=["x/b", "x/c"]), m("x/b", "o2", fallbacks=["x/a"]), m("x/c")])
    assert cfg.models[0].fallbacks == ("x/b", "x/c") and cfg.models[2].fallbacks == ()
    # Not followed further: a -> b -> a cannot loop (pipeline.build_routes).


def test_a_chat_model_may_fall_back_to_the_other_wire_format(tmp_path: Path) -> None:
    cfg = load(tmp_path, [m("x/a", fallbacks=["x/c"]), m("x/c", "ant", fallbacks=["x/a"])])
    assert cfg.models[0].fallbacks == ("x/c",) and cfg.models[1].fallbacks == ("x/a",)


@pytest.mark.parametrize(("models", "message"), [
    ([m("x/a", fallbacks=["x/nope"]), m("x/b")], "no model with id 'x/nope'"),
    ([m("x/a", fallbacks=["x/a"])], "is this model itself"),
    ([m("x/a", fallbacks=["x/b", "x/b"]), m("x/b")], "lists a model twice"),
    ([m("x/a", fallbacks=["x/e"]), m("x/e", kind="embedding")], "'x/e' is of kind embedding"),
    ([m("x/e1", kind="embedding", fallbacks=["x/e2"]), m("x/e2", "ant", kind="embedding")],
     "only chat models fall back across wire formats"),
    ([m("x/a", fallbacks=[f"x/{i}" for i in range(6)]), *(m(f"x/{i}") for i in range(6))], "at most 5"),
    ([m("x/a", fallbacks="x/b"), m("x/b")], "expected an array of strings"),
])
def test_bad_fallbacks_are_refused_at_load(tmp_path: Path, models: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, models)
    assert "fallbacks" in str(info.value) and message in str(info.value)


@pytest.mark.parametrize(("server", "key"), [
    ({"retry_attempts": -1}, "server.retry_attempts"),
    ({"retry_attempts": 6}, "server.retry_attempts"),
    ({"retry_backoff_ms": 0}, "server.retry_backoff_ms"),
    ({"retry_after_cap_seconds": -1}, "server.retry_after_cap_seconds"),
])
def test_bad_retry_settings_are_refused(tmp_path: Path, server: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(tmp_path, [m("x/a")], server)


def test_retry_defaults_are_safe(tmp_path: Path) -> None:
    s = load(tmp_path, [m("x/a")]).server
    assert (s.retry_attempts, s.retry_backoff_ms, s.retry_after_cap_seconds) == (1, 250, 5)


def test_what_is_retried_and_what_moves_on() -> None:
    assert all(retryable(s) for s in (408, 429, 500, 502, 503, 504, 529))
    assert not any(retryable(s) for s in (400, 401, 403, 404, 409, 413, 422))
    assert moves_on(401) and moves_on(403) and moves_on(503)
    assert not any(moves_on(s) for s in (400, 404, 409, 413, 422))
    assert not should_retry([("X-Should-Retry", "false")]) and should_retry([("x-should-retry", "true")])


def test_backoff_doubles_with_jitter_and_is_bounded_in_count() -> None:
    p = RetryPolicy(attempts=3, backoff=0.1, after_cap=5)
    for n, full in enumerate((0.1, 0.2, 0.4)):
        waits = [p.delay(n, None) for _ in range(200)]
        assert all(w is not None and full / 2 <= w <= full for w in waits)
        assert len(set(waits)) > 1  # jittered
    assert p.delay(3, None) is None and p.delay(3, 0.0) is None


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    p = RetryPolicy(attempts=2, backoff=0.1, after_cap=5)
    assert p.delay(0, 5.0) == 5.0 and p.delay(0, 5.01) is None and p.delay(0, 0.0) == 0.0


def test_retry_after_headers_are_read_as_providers_send_them() -> None:
    assert retry_after([("retry-after-ms", "1500"), ("retry-after", "9")]) == 1.5  # the precise one wins
    assert retry_after([("Retry-After", "3")]) == 3.0
    assert retry_after([("retry-after", "0.25")]) == 0.25
    assert retry_after([("retry-after", "-4")]) == 0.0
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    got = retry_after([("retry-after", when)])
    assert got is not None and 28 <= got <= 30
    for junk in ("soon", "nan", "inf", ""):
        assert retry_after([("retry-after", junk)]) is None
    assert retry_after([("retry-after-ms", "x"), ("retry-after", "2")]) == 2.0
    assert retry_after([("content-type", "text/plain")]) is None


async def test_a_wait_ends_when_the_client_leaves() -> None:
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    loop = asyncio.get_running_loop()
    loop.call_later(0.05, gone.set)
    started = loop.time()
    assert await pause(5, receive) is True
    assert loop.time() - started < 1
    gone.clear()
    assert await pause(0.05, receive) is False  # the full wait, the client still there
    assert await pause(0, receive) is False


def test_the_dashboards_request_page_says_a_fallback_served() -> None:
    from tollway.dashboard.web import _env

    row = {"request_id": "req_1", "created_at": 1_700_000_000_000, "model": "acme/b", "requested_model": "acme/a",
           "attempts": 3, "status": 200, "error_type": None, "prompt_tokens": 11, "cached_tokens": 0,
           "completion_tokens": 7, "reasoning_tokens": 0, "cost_micros": 86, "estimated": False, "latency_ms": 5}
    page = _env().get_template("request.html")
    html = page.render(csrf="x", signed_in=True, path="/dashboard/usage/requests/req_1", tenant={}, row=row)
    assert "<code>acme/a</code> was asked for" in html and "Upstream attempts" in html and ">3 (" in html
    plain = page.render(csrf="x", signed_in=True, path="/", tenant={},
                        row={**row, "model": "acme/a", "attempts": 1})
    assert "was asked for" not in plain and "Upstream attempts" not in plain
    old = page.render(csrf="x", signed_in=True, path="/", tenant={}, row={**row, "requested_model": None})
    assert "was asked for" not in old  # rows from before migration 0005
