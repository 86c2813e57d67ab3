"""Exact money: parsing, formatting, the once-per-request rounding rule, and no float anywhere."""

from __future__ import annotations

import ast
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollway import money
from tollway.money import MoneyError, Prices, Usage, cost, format_usd, from_minor_units, max_cost, parse_usd


@pytest.mark.parametrize(("text", "micros"), [
    ("5", 5_000_000), ("5.00", 5_000_000), ("0.000001", 1), ("0", 0), (" 7.1 ", 7_100_000),
    ("-1.5", -1_500_000), ("123456789012.999999", 123_456_789_012_999_999),
])
def test_parse_usd_is_exact(text: str, micros: int) -> None:
    assert parse_usd(text) == micros


@pytest.mark.parametrize("text", [
    "1e3", "1E-2", "1_000", "+5", "NaN", "Infinity", "-inf", ".5", "5.", "", "5.0000001", "1,5", "0x10",
    "1234567890123", "\uff15", "5 USD", "--5",  # \uff15: a fullwidth digit five
])
def test_parse_usd_refuses_anything_but_plain_decimals(text: str) -> None:
    with pytest.raises(MoneyError):
        parse_usd(text)


def test_parse_usd_refuses_non_strings_including_floats() -> None:
    for value in (0.1, 5, Decimal("5")):
        with pytest.raises(MoneyError, match="decimal string"):
            parse_usd(value)  # type: ignore[arg-type]


@given(st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1))
def test_format_then_parse_round_trips(micros: int) -> None:
    text = format_usd(micros)
    assert text.split(".")[1].__len__() == 6
    assert parse_usd(text) == micros


def test_format_usd() -> None:
    assert format_usd(0) == "0.000000"
    assert format_usd(1) == "0.000001"
    assert format_usd(-2_500_000) == "-2.500000"
    assert format_usd(12_345_678_901) == "12345.678901"


def test_minor_units_are_exact_and_never_float() -> None:
    assert from_minor_units(1999) == 19_990_000  # cents
    assert from_minor_units(500, 0) == 500_000_000  # JPY-style
    assert from_minor_units(1234, 3) == 1_234_000  # KWD-style
    assert isinstance(from_minor_units(7, 6), int)
    with pytest.raises(MoneyError):
        from_minor_units(1, 8)


PRICES = Prices(input=Decimal("0.15"), output=Decimal("0.60"))  # USD per million tokens == micro-USD per token


def test_cost_rounds_up_once_per_request_not_per_token() -> None:
    # 7 prompt tokens at 0.15 = 1.05, 3 completion at 0.60 = 1.80: 2.85 micro-USD -> 3, not 2 + 2 = 4.
    assert cost(Usage(prompt_tokens=7, completion_tokens=3), PRICES) == 3
    # Any fraction of a micro-dollar is charged as a whole one, never dropped.
    assert cost(Usage(prompt_tokens=1), PRICES) == 1
    assert cost(Usage(), PRICES) == 0
    # Whole amounts stay exact.
    assert cost(Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000), PRICES) == 750_000


def test_cost_prices_cached_and_reasoning_tokens_apart_when_configured() -> None:
    prices = Prices(input=Decimal("3"), output=Decimal("15"), cached_input=Decimal("0.3"),
                    reasoning=Decimal("20"), cache_write=Decimal("3.75"))
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=600, cache_write_tokens=100,
                  reasoning_tokens=200)
    expected = 300 * Decimal(3) + 600 * Decimal("0.3") + 100 * Decimal("3.75") + 300 * 15 + 200 * 20
    assert cost(usage, prices) == int(expected)
    # Without separate prices, cached tokens cost input and reasoning tokens cost output.
    assert cost(usage, PRICES) == 1000 * Decimal("0.15") + 500 * Decimal("0.60")


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7))
def test_cost_never_below_exact_value_and_under_one_unit_above(p: int, c: int, cached: int, reasoning: int) -> None:
    prices = Prices(input=Decimal("2.5"), output=Decimal("10.000001"), cached_input=Decimal("1.25"),
                    reasoning=Decimal("10.000001"))
    usage = Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=min(cached, p),
                  reasoning_tokens=min(reasoning, c))
    exact = (p - usage.cached_tokens) * prices.input + usage.cached_tokens * Decimal("1.25") + c * prices.output
    charged = cost(usage, prices)
    assert isinstance(charged, int)
    assert exact <= charged < exact + 1
    assert max_cost(p, c, prices) >= charged  # the reservation always covers the charge


def _float_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            found.append(f"{path.name}:{node.lineno}: float literal {node.value!r}")
        if isinstance(node, ast.Name) and node.id == "float":
            found.append(f"{path.name}:{node.lineno}: float()")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found.append(f"{path.name}:{node.lineno}: true division")
    return found


def test_no_float_in_billing_code() -> None:
    """The modules that compute amounts: no float literal, float() or `/` in them."""
    src = Path(money.__file__).parent
    for name in ("money.py", "ledger/transactions.py", "ledger/embedded.py", "ledger/postgres.py", "ledger/holds.py"):
        assert _float_uses(src / name) == [], name
