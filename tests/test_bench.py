"""bench/: the parts that decide whether its numbers mean anything, checked without
nginx or wrk (which the project does not install): the fixed upstream bodies are metered
exactly (a benchmark of the estimate path would flatter the gateway), the generated
configs load, nginx's quoting is reversible, /proc is read right, and a run that misses
a target or bills wrongly fails."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tollway import config as config_mod
from tollway.providers.base import Target
from tollway.providers.openai import OpenAIAdapter

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # bench/ holds scripts, not a package; only for these imports
try:
    import gateway
    import report
    import upstream
finally:
    sys.path.remove(str(BENCH))


def _target() -> Target:
    return Target("bench/sse", upstream.UPSTREAM_MODEL, "nginx_sse", "http://127.0.0.1:1/sse/v1", {})


def test_fixed_json_body_is_metered_from_its_usage() -> None:
    import orjson

    body = orjson.loads(upstream.chat_json())
    usage = OpenAIAdapter().read_response(_target(), body)
    assert usage is not None and not usage.estimated
    assert (usage.prompt_tokens, usage.completion_tokens) == (19, 10)
    assert body["model"] == "bench/sse"  # the slug is restored, as for a real provider


@pytest.mark.parametrize("strip_usage", [True, False])
def test_fixed_stream_is_metered_from_its_usage_chunk(strip_usage: bool) -> None:
    meter = OpenAIAdapter().meter(_target(), strip_usage=strip_usage)
    events = [e for e in upstream.chat_sse().split(b"\n\n") if e]
    sent = [meter.feed(e) for e in events]
    usage = meter.usage()
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (19, 10)
    assert meter.done and sent[-1] == b"data: [DONE]"
    # The client did not ask for usage (the bench's request body): that chunk is dropped.
    assert (None in sent) is strip_usage
    assert all(upstream.UPSTREAM_MODEL.encode() not in s for s in sent if s)


def _nginx_unquote(quoted: str) -> str:
    """nginx's reading of a double-quoted config string (ngx_conf_read_token)."""
    assert quoted[0] == quoted[-1] == '"'
    out, chars = [], iter(quoted[1:-1])
    for c in chars:
        if c == "\\":
            nxt = next(chars)
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


def test_nginx_return_strings_round_trip() -> None:
    for body in (upstream.chat_json(), upstream.chat_sse(), b'quote " backslash \\ newline \n end'):
        assert _nginx_unquote(upstream._nginx_string(body)).encode() == body
    with pytest.raises(ValueError, match=r"\$"):
        upstream._nginx_string(b'{"price": "$5"}')


def test_generated_configs_load_and_only_target_loopback(tmp_path: Path) -> None:
    cfg = config_mod.parse(__import__("tomllib").loads(gateway.render_config(tmp_path, 18080, 18081)))
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 18080
    assert {m.id for m in cfg.models} == set(gateway.MODEL_OF.values())
    assert all(p.base_url.startswith("http://127.0.0.1:18081/") for p in cfg.providers.values())
    assert cfg.database.url.startswith("sqlite:///") and cfg.cache.url == "memory://"
    assert cfg.attribution is not None
    limited = config_mod.parse(__import__("tomllib").loads(gateway.render_config(tmp_path, 1, 2, rate_limits=True)))
    assert limited.limits.requests_per_minute == limited.limits.tokens_per_minute == 10**9
    assert cfg.limits.requests_per_minute == cfg.limits.tokens_per_minute == 0
    conf = upstream.render_config(tmp_path, 18081)
    assert "listen 127.0.0.1:18081;" in conf and "access_log off;" in conf


def test_token_by_token_stream_is_the_same_events_one_write_each(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    events = upstream.chat_sse_events()
    assert b"".join(events) == upstream.chat_sse() and len(events) == report.STREAM_EVENTS
    module = tmp_path / "ngx_http_echo_module.so"
    module.touch()
    monkeypatch.setattr(upstream, "ECHO_MODULE", module)
    conf = upstream.render_config(tmp_path, 18081)
    assert conf.lstrip().startswith(f"load_module {module};")
    tok = conf[conf.index("location = /tok/v1/chat/completions"):]
    tok = tok[:tok.index("location / ")]
    assert tok.count("echo -n ") == tok.count("echo_flush;") == len(events)
    assert tok.count(f"echo_sleep {upstream.TOKEN_GAP:g};") == len(events) - 1
    monkeypatch.setattr(upstream, "ECHO_MODULE", tmp_path / "absent.so")
    conf = upstream.render_config(tmp_path, 18081)
    assert "load_module" not in conf and "/tok/v1" not in conf


def test_proc_readers_follow_this_process() -> None:
    import os

    pid = os.getpid()
    before = gateway.cpu_seconds(pid)
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert gateway.cpu_seconds(pid) - before >= 0.03  # clock ticks are 10 ms
    rss = gateway.rss_bytes(pid)
    block = b"\x01" * (64 * 2**20)  # written, so every page is resident (calloc'd zeros might not be)
    assert gateway.rss_bytes(pid) - rss >= 60 * 2**20
    del block


def _summary(cpu_json: float, rps: float, rss_mb: float) -> dict[str, object]:
    runs = []
    for kind, cpu in (("json", cpu_json), ("sse", 0.8)):
        runs += [report.Run("direct", kind, 1, 1000, 30000, 0.03, 0.1, 0),
                 report.Run("gateway", kind, 1, 1000, 1500, 0.6, 1.0, 0, cpu_s=cpu),
                 report.Run("direct", kind, 32, 1000, 30000, 0.5, 1.0, 0),
                 report.Run("gateway", kind, 32, 1000, rps, 12.0, 20.0, 0, cpu_s=cpu)]
    return report.summarise(runs, [(1000, 90 * 2**20), (100_000, int(rss_mb * 2**20))])


def test_targets_pass_and_miss() -> None:
    assert report.targets(_summary(cpu_json=0.4, rps=2500, rss_mb=100)) == []
    missed = report.targets(_summary(cpu_json=0.7, rps=1500, rss_mb=160))
    assert [m.split(",")[0] for m in missed] == [
        "gateway CPU per json request", "gateway requests/s at 32 connections",
        "gateway requests/s at 32 connections", "gateway RSS after 100000 requests"]


def _billing(rows: list[tuple[int, bool, int]], reserved: int = 0, ok: bool = True) -> dict[str, object]:
    return {"wallet": {"balance_usd": "1.0", "reserved_usd": "0.0", "reserved_micros": reserved},
            "ledger_verify": {"ok": ok, "problems": []},
            "usage": [{"model": "bench/json", "status": s, "estimated": e, "count": n, "cost_micros": n * 17}
                      for s, e, n in rows]}


def test_billing_must_add_up() -> None:
    assert report.billing_lines(_billing([(200, False, 1010)]), completed=1000, in_flight_bound=32)
    assert report.billing_lines(_billing([(200, False, 1000), (499, True, 5)]), completed=1000, in_flight_bound=32)
    assert not report.billing_lines(_billing([(200, True, 1000)]), completed=1000, in_flight_bound=32)
    assert not report.billing_lines(_billing([(402, False, 1000)]), completed=1000, in_flight_bound=32)
    assert not report.billing_lines(_billing([(200, False, 900)]), completed=1000, in_flight_bound=32)
    assert not report.billing_lines(_billing([(200, False, 1000)], reserved=5), completed=1000, in_flight_bound=32)
    assert not report.billing_lines(_billing([(200, False, 1000)], ok=False), completed=1000, in_flight_bound=32)


def test_paired_ratio_reports_the_spread_of_rounds() -> None:
    mid, lo, hi = report.paired_ratio([1.0, 2.0, 1.0], [0.9, 1.6, 1.1])
    assert (round(mid, 3), round(lo, 3), round(hi, 3)) == (0.9, 0.8, 1.1)
    with pytest.raises(ValueError):
        report.paired_ratio([1.0], [1.0, 2.0])
