"""The production surface `config check` prints: its route table stays in columns, and what an
operator exposes by accident (an open /metrics off loopback, a short admin token) is said."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ServerThread
from tollway.app import create_app
from tollway.config import Config, ConfigError
from tollway.surface import _columns, describe, render_text, warnings

STRONG = "t" * 32


def test_route_table_keeps_its_columns_for_long_values(make_config: Callable[..., Config]) -> None:
    text = render_text(describe(make_config()))
    routes = text.split("\nroutes\n", 1)[1].split("\n\n", 1)[0].splitlines()
    admin = next(r for r in routes if "/admin/*" in r)
    metrics = next(r for r in routes if "/metrics" in r)
    # Every column ends at least two spaces before the next begins, whatever its length.
    assert "GET,POST,PATCH,DELETE  /admin/*" in admin.replace("   ", "  ")
    assert "anyone on the listener  Prometheus" in metrics
    starts = {r.index("/") for r in routes}
    assert len(starts) == 1, routes  # the path column is aligned
    assert _columns([["a" * 30, "b", "c"], ["x", "y", "z"]]) == ["  " + "a" * 30 + "  b  c", "  x" + " " * 31 + "y  z"]


def test_open_metrics_off_loopback_is_a_warning(make_config: Callable[..., Config],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
    assert warnings(make_config()) == []  # the test config listens on loopback
    for host in ("127.0.0.2", "::1", "localhost"):
        assert warnings(make_config(server={"host": host})) == [], host
    for host in ("0.0.0.0", "10.1.2.3", "gateway.internal", "::"):
        found = warnings(make_config(server={"host": host}))
        assert len(found) == 1 and "/metrics is open to anyone" in found[0], host
    assert warnings(make_config(server={"host": "0.0.0.0"}, metrics={"enabled": False})) == []
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", STRONG)
    assert warnings(make_config(server={"host": "0.0.0.0"}, metrics={"require_admin_token": True})) == []
    assert warnings(make_config(), host="0.0.0.0")  # `serve --host` is what counts
    assert "! /metrics is open" in render_text(describe(make_config(server={"host": "0.0.0.0"})))


def test_a_short_admin_token_is_a_warning(make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", "x" * 31)
    found = warnings(make_config())
    assert len(found) == 1 and "31 bytes" in found[0] and "x" * 8 not in found[0]  # never the token itself
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", STRONG)
    assert warnings(make_config()) == []
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN")
    found = warnings(make_config(metrics={"require_admin_token": True}))
    assert len(found) == 1 and "refuses every request" in found[0]


def test_metrics_can_require_the_admin_token(make_config: Callable[..., Config],
                                             serve_app: Callable[[Any], ServerThread],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", STRONG)
    cfg = make_config(metrics={"require_admin_token": True})
    gw = serve_app(create_app(cfg, provider_keys={}, migrate=True))
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {STRONG}"},
                    {"authorization": f"Bearer {STRONG}x"}):
        r = httpx.get(gw.url + "/metrics", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] and "tollway_" not in r.text
    r = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {STRONG}"})
    assert r.status_code == 200 and "tollway_http_requests_total" in r.text
    routes = {x["path"]: x for x in describe(cfg)["routes"]}
    assert routes["/metrics"]["auth"] == "operator token"


def test_config_check_prints_the_resource_bounds_and_the_drain(make_config: Callable[..., Config]) -> None:
    cfg = make_config(server={"max_connections": 77, "header_timeout_seconds": 7, "max_streams_per_key": 9,
                              "max_header_bytes": 4096, "body_timeout_seconds": 31, "keepalive_timeout_seconds": 3,
                              "drain_timeout_seconds": 45})
    surface = describe(cfg)
    assert surface["limits"] == {"max_connections": 77, "header_timeout_seconds": 7, "max_streams_per_key": 9,
                                 "max_header_bytes": 4096, "body_timeout_seconds": 31,
                                 "keepalive_timeout_seconds": 3, "drain_timeout_seconds": 45}
    text = render_text(surface)
    assert ("limits    each worker: 77 connections; headers within 7 s and 4096 bytes, a body within 31 s; "
            "idle keep-alive 3 s; 9 streams per key") in text
    assert "drain     on SIGTERM, requests in flight may finish for 45 s" in text
    defaults = describe(make_config())["limits"]  # safe defaults, all set
    assert defaults == {"header_timeout_seconds": 10, "body_timeout_seconds": 60, "max_header_bytes": 32_768,
                        "keepalive_timeout_seconds": 5, "max_connections": 1_000, "max_streams_per_key": 100,
                        "drain_timeout_seconds": 30}
    for key in defaults:
        with pytest.raises(ConfigError, match=f"server.{key}"):
            make_config(server={key: 0})
