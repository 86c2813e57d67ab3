"""Per-key rate limits (proxy/ratelimit.py) on the embedded default: the GCRA arithmetic
with an injected clock, then the gateway under uvicorn with the official client and a
fake upstream that reports usage. The scale-out (4 workers, Redis, its outage) is
tests/test_ratelimit_scaleout.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ServerThread
from tests.fakes.harness import PROVIDER_KEY, Gateway
from tests.fakes.openai_upstream import PROMPT_TOKENS, REPLY_WORDS, FakeOpenAI
from tollway.auth.keys import Principal
from tollway.config import ConfigError, LimitsConfig
from tollway.proxy.ratelimit import Limiter, Limits, MemoryState, duration
from tollway.services import Services

TOKENS_PER_CALL = PROMPT_TOKENS + len(REPLY_WORDS)  # what the fake upstream reports for acme/chat
ADMIN_TOKEN = "admin-token-for-rate-limit-tests-0123"
RESET = re.compile(r"^(0s|[0-9]+ms|([0-9]+h)?([0-9]+m)?[0-9]+(\.[0-9]{1,3})?s)$")


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000.0

    def __call__(self) -> float:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += seconds * 1000


# --- the arithmetic ---------------------------------------------------------------------------------


def test_durations_are_written_as_openai_writes_them() -> None:
    assert [duration(ms) for ms in (0, 0.2, 17, 999, 1000, 8640, 20_000, 59_999.5, 60_000, 360_000, 3_723_500)] == [
        "0s", "1ms", "17ms", "999ms", "1s", "8.64s", "20s", "1m0s", "1m0s", "6m0s", "1h2m3.5s"]


async def test_three_requests_a_minute_then_429_until_a_slot_frees_then_the_window_rolls_over() -> None:
    clock = Clock()
    state = MemoryState(clock)
    lim = Limits(rpm=3, tpm=0)
    admitted = [state.admit("key_a", lim) for _ in range(3)]
    assert [d.wait_ms for d in admitted] == [0, 0, 0]
    assert [d.remaining_requests() for d in admitted] == [2, 1, 0]
    assert [dict(d.headers())[b"x-ratelimit-reset-requests"] for d in admitted] == [b"20s", b"40s", b"1m0s"]
    refused = [state.admit("key_a", lim) for _ in range(3)]
    assert all(d.wait_ms == 20_000 for d in refused), "a refusal changes nothing"
    assert refused[0].refusal().headers == {"retry-after": "20"}
    assert state.admit("key_b", lim).wait_ms == 0, "another key has its own bucket"
    clock.advance(19.9)
    assert state.admit("key_a", lim).wait_ms > 0
    clock.advance(0.1)
    assert state.admit("key_a", lim).wait_ms == 0  # one slot, 20 s after the first request
    assert state.admit("key_a", lim).wait_ms > 0
    clock.advance(60)
    assert [state.admit("key_a", lim).remaining_requests() for _ in range(3)] == [2, 1, 0]


async def test_tokens_are_counted_as_used_and_refuse_once_the_minute_is_spent() -> None:
    clock = Clock()
    limiter = Limiter(LimitsConfig(tokens_per_minute=100), clock=clock)
    p = Principal("tn_1", "key_1")
    state: dict[str, Any] = {}
    await limiter.admit(p, state)
    assert dict(state["response_headers"])[b"x-ratelimit-remaining-tokens"] == b"100"
    limiter.used(p, 60)
    await limiter.admit(p, state)  # 60 used: admitted, whatever the next call will use
    assert dict(state["response_headers"])[b"x-ratelimit-remaining-tokens"] == b"40"
    limiter.used(p, 60)
    with pytest.raises(Exception) as info:
        await limiter.admit(p, state)
    err = info.value
    assert getattr(err, "status", None) == 429 and getattr(err, "instance_code", None) == "rate_limit_exceeded"
    assert "tokens per min (TPM): Limit 100, Used 120" in str(err)
    # 120 used, 100 allowed: 20 tokens must drain at 100 a minute, 12 s.
    assert getattr(err, "headers", {}) == {"retry-after": "13"}
    assert dict(state["response_headers"])[b"x-ratelimit-remaining-tokens"] == b"0"
    clock.advance(12.01)
    await limiter.admit(p, state)
    clock.advance(60)
    await limiter.admit(p, state)
    assert dict(state["response_headers"])[b"x-ratelimit-remaining-tokens"] == b"100"


async def test_unlimited_keys_cost_nothing_and_a_keys_own_setting_beats_the_default() -> None:
    limiter = Limiter(LimitsConfig(requests_per_minute=10))
    assert limiter.limits(Principal("t", "k")) == Limits(10, 0)
    assert limiter.limits(Principal("t", "k", requests_per_minute=0)) is None  # 0: unlimited for this key
    assert limiter.limits(Principal("t", "k", requests_per_minute=2, tokens_per_minute=5)) == Limits(2, 5)
    state: dict[str, Any] = {}
    await Limiter(LimitsConfig()).admit(Principal("t", "k"), state)
    assert state == {}, "no headers, no state for a key without limits"


def test_memory_holds_only_the_keys_used_within_the_last_minute() -> None:
    clock = Clock()
    state = MemoryState(clock)
    lim = Limits(rpm=600, tpm=0)
    for i in range(20_000):
        state.admit(f"key_{i}", lim)
        state.charge(f"key_{i}", 1)
    assert len(state) == 20_000
    clock.advance(61)
    state.admit("key_last", lim)
    assert len(state) == 1


def test_principal_keeps_its_old_encoding_without_own_limits() -> None:
    plain = Principal("tn_1", "key_1", None, 5_000_000, "day")
    assert plain.encode().count("|") == 4  # what workers of earlier versions read
    assert Principal.decode(plain.encode()) == plain
    limited = Principal("tn_1", "key_1", None, None, None, 0, 1000)
    assert Principal.decode(limited.encode()) == limited


def test_config_limits_are_validated_and_shown_by_config_check(make_config: Callable[..., Any]) -> None:
    from tollway.surface import describe, render_text

    cfg = make_config(limits={"requests_per_minute": 60})
    assert cfg.limits == LimitsConfig(60, 0)
    shown = describe(cfg)
    assert shown["rate_limits"]["requests_per_minute"] == 60 and shown["rate_limits"]["tokens_per_minute"] == 0
    assert "60 requests/min, unlimited tokens/min; counted in memory" in render_text(shown)
    for bad in (-1, 10**12):
        with pytest.raises(ConfigError, match=r"limits\.requests_per_minute"):
            make_config(limits={"requests_per_minute": bad})
    with pytest.raises(ConfigError, match=r"limits\.tokens_per_minute: expected an integer"):
        make_config(limits={"tokens_per_minute": "100"})


# --- the gateway -----------------------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI(PROVIDER_KEY)


@pytest.fixture
def gw(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI,
       monkeypatch: pytest.MonkeyPatch) -> Gateway:
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    return launch(serve_app(fake.app).url, cache={"url": "memory://", "key_ttl_seconds": 1})


def new_key(gw: Gateway, **limits: int | None) -> tuple[str, str]:
    async def create(svc: Services) -> tuple[str, str]:
        key = await svc.keys.create(gw.tenant_id, **limits)  # type: ignore[arg-type]
        return key["key_id"], key["key"]

    return gw.run(create)


def chat(gw: Gateway, key: str, *, stream: bool = False, model: str = "acme/chat") -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
                      timeout=30)


def limit_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit-")}


def test_a_key_limited_to_3_a_minute_gets_429_on_its_4th_to_6th_request(gw: Gateway, fake: FakeOpenAI) -> None:
    _, limited = new_key(gw, requests_per_minute=3)
    _, other = new_key(gw, requests_per_minute=3)
    balance = gw.balance()
    answers = [chat(gw, limited), chat(gw, limited, stream=True), chat(gw, limited, model="acme/none")]
    assert [r.status_code for r in answers] == [200, 200, 404]  # successes and an error after auth alike
    assert answers[1].headers["content-type"].startswith("text/event-stream")
    for r, remaining in zip(answers, ("2", "1", "0"), strict=True):
        h = limit_headers(r)
        assert set(h) == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                          "x-ratelimit-reset-requests"}, "no token headers: the key has no token limit"
        assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == remaining
        assert RESET.match(h["x-ratelimit-reset-requests"])
    charged = balance - gw.balance()
    forwarded = len(fake.requests)
    refused = [chat(gw, limited) for _ in range(3)]
    for r in refused:
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= 20
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "requests per min (RPM): Limit 3, Used 3" in r.json()["error"]["message"]
        assert "x-should-retry" not in r.headers, "the SDKs retry a 429 after Retry-After"
        assert limit_headers(r)["x-ratelimit-remaining-requests"] == "0"
        assert limit_headers(r)["x-ratelimit-limit-requests"] == "3"
    assert len(fake.requests) == forwarded, "a refused request is not forwarded"
    assert balance - gw.balance() == charged and gw.held() == 0, "nor reserved or charged"
    assert [chat(gw, other).status_code for _ in range(3)] == [200, 200, 200]
    unlimited = chat(gw, gw.key)
    assert unlimited.status_code == 200 and limit_headers(unlimited) == {}
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_the_openai_client_sees_a_rate_limit_error(gw: Gateway) -> None:
    import openai

    _, key = new_key(gw, requests_per_minute=1)
    client = gw.client(api_key=key)
    messages: Any = [{"role": "user", "content": "x"}]
    raw = client.chat.completions.with_raw_response.create(model="acme/chat", messages=messages)
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="acme/chat", messages=messages)
    assert info.value.code == "rate_limit_exceeded"


def test_tokens_per_minute_counts_the_tokens_the_provider_reported(gw: Gateway) -> None:
    _, key = new_key(gw, tokens_per_minute=2 * TOKENS_PER_CALL - 6)  # 40: two calls of 23 pass it
    first = chat(gw, key)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == TOKENS_PER_CALL
    assert limit_headers(first)["x-ratelimit-remaining-tokens"] == "40"
    second = chat(gw, key, stream=True)  # a stream's usage counts as well
    assert second.status_code == 200 and b'"total_tokens":23' in second.content
    assert limit_headers(second)["x-ratelimit-remaining-tokens"] in ("17", "18")  # 40 - 23, refilling
    third = chat(gw, key)
    assert third.status_code == 429, third.text
    assert "tokens per min (TPM): Limit 40, Used 46" in third.json()["error"]["message"]
    # 46 used of 40: 6 tokens drain at 40 a minute in 9 s.
    assert 8 <= int(third.headers["retry-after"]) <= 10
    assert limit_headers(third)["x-ratelimit-remaining-tokens"] == "0"
    assert RESET.match(limit_headers(third)["x-ratelimit-reset-tokens"])
    assert gw.verify() == []


def test_window_rollover_with_the_gateways_clock(gw: Gateway) -> None:
    clock = Clock()
    assert gw.served is not None
    gw.served.limiter.memory.clock = clock
    _, key = new_key(gw, requests_per_minute=3, tokens_per_minute=1000)
    assert [chat(gw, key).status_code for _ in range(4)] == [200, 200, 200, 429]
    clock.advance(20)
    assert [chat(gw, key).status_code for _ in range(2)] == [200, 429]
    clock.advance(60)
    answers = [chat(gw, key) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [limit_headers(r)["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0", "0"]
    assert [limit_headers(r)["x-ratelimit-reset-requests"] for r in answers[:3]] == ["20s", "40s", "1m0s"]
    # 3 calls of 23 tokens used this minute: 1000 - 69 left, fully back 60 s after.
    assert limit_headers(answers[3])["x-ratelimit-remaining-tokens"] == str(1000 - 3 * TOKENS_PER_CALL)
    clock.advance(60)
    assert limit_headers(chat(gw, key))["x-ratelimit-remaining-tokens"] == "1000"


def test_admin_api_sets_a_keys_limits_and_they_apply_at_once(gw: Gateway) -> None:
    key_id, key = new_key(gw)
    assert chat(gw, key).status_code == 200  # verified and cached unlimited
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    r = httpx.patch(f"{gw.url}/admin/keys/{key_id}", json={"requests_per_minute": 1}, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json() == {"key_id": key_id, "requests_per_minute": 1,
                                                 "tokens_per_minute": None}
    assert [chat(gw, key).status_code for _ in range(2)] == [200, 429]
    listed = httpx.get(f"{gw.url}/admin/tenants/{gw.tenant_id}/keys", headers=auth, timeout=30).json()["keys"]
    assert next(k for k in listed if k["id"] == key_id)["requests_per_minute"] == 1
    back = httpx.patch(f"{gw.url}/admin/keys/{key_id}", json={"requests_per_minute": None}, headers=auth, timeout=30)
    assert back.json()["requests_per_minute"] is None  # the [limits] default again: unlimited here
    r = chat(gw, key)
    assert r.status_code == 200 and limit_headers(r) == {}
    for bad in ({}, {"requests_per_minute": -1}, {"tokens_per_minute": 10**10}, {"requests_per_minute": 1.5}):
        refused = httpx.patch(f"{gw.url}/admin/keys/{key_id}", json=bad, headers=auth, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.patch(f"{gw.url}/admin/keys/key_nope", json={"tokens_per_minute": 5}, headers=auth, timeout=30)
    assert missing.status_code == 404
    created = httpx.post(f"{gw.url}/admin/tenants/{gw.tenant_id}/keys", json={"tokens_per_minute": 7},
                         headers=auth, timeout=30).json()
    assert limit_headers(chat(gw, created["key"]))["x-ratelimit-limit-tokens"] == "7"


def test_cli_sets_a_keys_limits_and_the_serving_process_applies_them_within_the_cache_ttl(gw: Gateway) -> None:
    key_id, key = new_key(gw)
    assert chat(gw, key).status_code == 200  # cached by the serving process, unlimited

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tollway", "keys", *args, "--config", gw.cfg.source, "--json"],
                              capture_output=True, text=True, timeout=60)

    out = cli("update", key_id, "--rpm", "2", "--tpm", "500")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"key_id": key_id, "requests_per_minute": 2, "tokens_per_minute": 500}
    time.sleep(1.2)  # cache.key_ttl_seconds = 1 in this gateway: its memory entry has expired
    r = chat(gw, key)
    assert limit_headers(r)["x-ratelimit-limit-requests"] == "2"
    assert limit_headers(r)["x-ratelimit-limit-tokens"] == "500"
    for bad in (["--rpm", "-3"], ["--tpm", "lots"], []):
        refused = cli("update", key_id, *bad)
        assert refused.returncode == 1 and refused.stderr.startswith("error:")
    created = cli("create", "--tenant", gw.tenant_id, "--rpm", "0")
    assert created.returncode == 0, created.stderr
    listed = json.loads(cli("list", "--tenant", gw.tenant_id).stdout)["keys"]
    assert next(k for k in listed if k["id"] == json.loads(created.stdout)["key_id"])["requests_per_minute"] == 0
    assert cli("update", key_id, "--rpm", "default").returncode == 0
