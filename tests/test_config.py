"""tollway.toml validation: every mistake is refused with the file, the key path and what was expected."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest

from tollway import config as config_mod
from tollway.config import ConfigError

GOOD = """
[server]
port = 8080

[providers.deepseek]
type = "openai"
base_url = "https://api.deepseek.com/v1"
api_key_env = "DEEPSEEK_API_KEY"

[[models]]
id = "deepseek/deepseek-chat"
provider = "deepseek"
upstream = "deepseek-chat"
input_usd_per_mtok = "0.27"
output_usd_per_mtok = "1.10"
cached_input_usd_per_mtok = "0.07"
"""


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tollway", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tollway.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_good_config_parses_exactly(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path, GOOD))
    m = cfg.model("deepseek/deepseek-chat")
    assert m is not None
    assert m.input_usd_per_mtok == Decimal("0.27")
    assert isinstance(m.output_usd_per_mtok, Decimal)
    assert cfg.providers["deepseek"].name == "deepseek"
    assert cfg.cache.key_ttl_seconds == 60
    assert cfg.retention.access_log_days == 30


BROKEN = [
    ("typo in a section key", GOOD.replace("port = 8080", "prot = 8080"), "server.prot", "did you mean 'port'"),
    ("unknown section", GOOD + "\n[servr]\nhost='x'\n", "servr", "unknown key"),
    ("wrong type", GOOD.replace("port = 8080", 'port = "8080"'), "server.port", "expected an integer"),
    ("model points at a missing provider", GOOD.replace('provider = "deepseek"', 'provider = "groq"'),
     "models[0].provider", "no provider named 'groq'"),
    ("malformed price", GOOD.replace('"0.27"', '"0.2.7"'), "models[0].input_usd_per_mtok", "decimal string"),
    ("float price", GOOD.replace('"0.27"', "0.27"), "models[0].input_usd_per_mtok", "floats are inexact"),
    ("negative price", GOOD.replace('"1.10"', '"-1.10"'), "models[0].output_usd_per_mtok", "non-negative"),
    ("duplicate model id", GOOD + GOOD[GOOD.index("[[models]]"):], "models[1].id", "duplicate model id"),
    ("unsupported database", GOOD + '\n[database]\nurl = "mysql://x/y"\n', "database.url", "unsupported URL"),
    ("unsupported cache", GOOD + '\n[cache]\nurl = "memcached://x"\n', "cache.url", "unsupported URL"),
    ("missing required model key", GOOD.replace('upstream = "deepseek-chat"\n', ""), "models[0].upstream",
     "required key is missing"),
    ("bad provider type", GOOD.replace('type = "openai"', 'type = "cohere"'), "providers.deepseek.type",
     "expected one of"),
    ("provider without key env", GOOD.replace('api_key_env = "DEEPSEEK_API_KEY"\n', ""),
     "providers.deepseek.api_key_env", "env var"),
    ("non-positive ttl", GOOD + "\n[cache]\nkey_ttl_seconds = 0\n", "cache.key_ttl_seconds", "positive"),
    ("database password inline", GOOD + '\n[database]\nurl = "postgresql://app:hunter2@db:5432/t"\n',
     "database.url", "database.password_env"),
    ("redis password inline", GOOD + '\n[cache]\nurl = "redis://:hunter2@127.0.0.1:6379/0"\n', "cache.url",
     "cache.password_env"),
    ("password for sqlite", GOOD + '\n[database]\npassword_env = "PW"\n', "database.password_env",
     "only PostgreSQL"),
    ("empty pool", GOOD + "\n[database]\npool_size = 0\n", "database.pool_size", "positive"),
    ("not TOML", "[server\nport=1", "", "not valid TOML"),
]


@pytest.mark.parametrize(("case", "text", "path", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_mistake_names_file_key_path_and_expectation(tmp_path: Path, case: str, text: str, path: str,
                                                           expected: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config_mod.load(p)
    message = str(info.value)
    assert str(p) in message
    assert path in message
    assert expected in message


@pytest.mark.parametrize(("case", "text", "path", "expected"), BROKEN[:4], ids=[b[0] for b in BROKEN[:4]])
def test_config_check_exits_non_zero_with_one_line(tmp_path: Path, case: str, text: str, path: str,
                                                   expected: str) -> None:
    p = write(tmp_path, text)
    result = run_cli("config", "check", "--config", str(p))
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert path in result.stderr


def test_starter_config_checks_and_prints_the_surface(tmp_path: Path) -> None:
    assert run_cli("init", cwd=tmp_path).returncode == 0
    result = run_cli("config", "check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for expected in ("/v1/chat/completions", "providers", "demo/echo", "TOLLWAY_ADMIN_TOKEN", "storage",
                     "retention access log 30 days", "never recorded"):
        assert expected in result.stdout


def test_unset_provider_key_fails_at_serve_not_at_check(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    env = {k: v for k, v in __import__("os").environ.items() if k != "DEEPSEEK_API_KEY"}
    assert run_cli("config", "check", "--config", str(p), env=env).returncode == 0
    result = run_cli("serve", "--config", str(p), env=env)
    assert result.returncode == 1
    assert "providers.deepseek.api_key_env" in result.stderr
    assert "DEEPSEEK_API_KEY" in result.stderr


def test_config_found_by_flag_then_env_then_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config_mod.CONFIG_ENV, raising=False)
    assert config_mod.find_config_path(None) == Path("tollway.toml")
    monkeypatch.setenv(config_mod.CONFIG_ENV, "/etc/x.toml")
    assert config_mod.find_config_path(None) == Path("/etc/x.toml")
    assert config_mod.find_config_path("a.toml") == Path("a.toml")


def test_secret_repr_never_shows_the_value() -> None:
    s = config_mod.Secret("DEEPSEEK_API_KEY", "sk-very-secret")
    assert "sk-very-secret" not in repr(s)
    assert "sk-very-secret" not in str(s)
    assert "sk-very-secret" not in f"{s}"
    assert s.reveal() == "sk-very-secret"


def test_every_config_key_is_documented_and_in_the_starter() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    for key, _default, text in config_mod.schema_table():
        assert f"`{key}`" in docs, f"docs/config.md does not document {key}"
        assert text
    starter = resources.files("tollway").joinpath("tollway.example.toml").read_text("utf-8")
    for section in ("[server]", "[database]", "[cache]", "[retention]", "[providers.echo]", "[[models]]"):
        assert section in starter


def test_inline_password_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD + '\n[database]\nurl = "postgresql://app:hunter2@db:5432/t"\n')
    with pytest.raises(ConfigError) as info:
        config_mod.load(p)
    assert "hunter2" not in str(info.value)


def test_password_envs_are_listed_with_the_other_secrets(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path, GOOD + '\n[database]\nurl = "postgresql://app@db:5432/t"\n'
                                                 'password_env = "TOLLWAY_DB_PASSWORD"\n'
                                                 '[cache]\nurl = "redis://127.0.0.1:6379/0"\n'
                                                 'password_env = "TOLLWAY_REDIS_PASSWORD"\n'))
    refs = dict(cfg.env_references())
    assert refs["database password"] == "TOLLWAY_DB_PASSWORD"
    assert refs["Redis password"] == "TOLLWAY_REDIS_PASSWORD"


def test_database_pool_settings_reach_the_store(tmp_path: Path) -> None:
    from tollway.services import build

    cfg = config_mod.load(write(tmp_path, GOOD + '\n[database]\nurl = "postgresql://app@127.0.0.1:1/t"\n'
                                                 'pool_size = 3\npool_timeout_seconds = 2\n'))
    svc = build(cfg)  # builds engines only: nothing connects to port 1
    pool = svc.store.engine.sync_engine.pool
    assert (pool.size(), pool._max_overflow, pool._timeout) == (3, 0, 2)  # type: ignore[attr-defined]


REFUSED_ATTRIBUTION = ["authorization", "Authorization", "x-api-key", "proxy-authorization", "cookie", "host",
                       "content-length", "transfer-encoding", "connection", "te", "upgrade", "content-type",
                       "anthropic-version", "anthropic-beta", "openai-organization", "openai-project",
                       "cf-aig-authorization", "x-goog-api-key", "api-key", "x-auth-token", "x-forwarded-for",
                       "bad header", "", "x-meta\r\nx-api-key"]


@pytest.mark.parametrize("name", REFUSED_ATTRIBUTION)
def test_attribution_header_cannot_be_a_credential_or_hop_by_hop_header(tmp_path: Path, name: str) -> None:
    # As `authorization` it replaced the provider key header on every upstream call.
    p = write(tmp_path, GOOD + f"\n[attribution]\nheader = {name!r}\n".replace("'", '"').replace("\r\n", "\\r\\n"))
    with pytest.raises(ConfigError) as info:
        config_mod.load(p)
    assert str(p) in str(info.value) and "attribution.header" in str(info.value)


@pytest.mark.parametrize("name", ["cf-aig-metadata", "x-tollway-attribution", "helicone-property-tenant"])
def test_ordinary_attribution_headers_are_accepted(tmp_path: Path, name: str) -> None:
    cfg = config_mod.load(write(tmp_path, GOOD + f'\n[attribution]\nheader = "{name}"\n'))
    assert cfg.attribution is not None and cfg.attribution.header == name


@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding", "host", "connection"])
def test_provider_extra_headers_cannot_be_hop_by_hop(tmp_path: Path, name: str) -> None:
    text = GOOD.replace('api_key_env = "DEEPSEEK_API_KEY"\n',
                        f'api_key_env = "DEEPSEEK_API_KEY"\nextra_headers = {{ "{name}" = "1" }}\n')
    with pytest.raises(ConfigError, match=f"providers.deepseek.extra_headers.{name}"):
        config_mod.load(write(tmp_path, text))
