"""Exact USD amounts.

Every amount in Tollway is an integer number of micro-dollars (1 USD = 1_000_000).
Prices are configured in USD per million tokens, which is exactly micro-dollars per
token, so a cost is sum(tokens * price) computed in Decimal and rounded UP to the next
micro-dollar once per request: a request never costs less than its tokens are worth.
No float ever touches an amount.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

MICROS_PER_USD = 1_000_000
# Plain decimal notation only: Decimal() alone would also take "1e3", "1_000", "NaN" and
# " +5". Twelve integer digits keep every amount (in micro-dollars) inside a BIGINT.
_AMOUNT = re.compile(r"-?([0-9]{1,12})(?:\.([0-9]{1,6}))?")


class MoneyError(ValueError):
    """An amount that is not an exact, well-formed USD value."""


def parse_usd(text: str) -> int:
    """'5.00' -> 5_000_000. At most 6 decimals; no floats, no exponents, no signs games."""
    if not isinstance(text, str):
        raise MoneyError(f"expected a decimal string, got {type(text).__name__}")
    m = _AMOUNT.fullmatch(text.strip())
    if m is None:
        if re.fullmatch(r"-?[0-9]+\.[0-9]{7,}", text.strip()):
            raise MoneyError(f"more than 6 decimal places: {text!r}")
        raise MoneyError(f"not a decimal amount like 5.00: {text!r}")
    micros = int(m.group(1)) * MICROS_PER_USD + int((m.group(2) or "").ljust(6, "0"))
    return -micros if text.strip().startswith("-") else micros


def format_usd(micros: int) -> str:
    """5_000_000 -> '5.000000' (always six decimals, exact)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def decimal_to_micros_ceil(amount_usd: Decimal) -> int:
    return int((amount_usd * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def from_minor_units(amount: int, exponent: int = 2) -> int:
    """Stripe-style minor units (cents for USD) -> micro-dollars, exactly."""
    if not 0 <= exponent <= 6:
        raise MoneyError(f"unsupported currency exponent {exponent}")
    return amount * (1_000_000, 100_000, 10_000, 1_000, 100, 10, 1)[exponent]  # ints only, never 10 ** -n


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, normalised across wire formats.

    prompt_tokens includes cached_tokens and cache_write_tokens (OpenAI convention);
    completion_tokens includes reasoning_tokens.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class Prices:
    """Micro-dollars per token (== USD per million tokens)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    reasoning: Decimal | None = None
    cache_write: Decimal | None = None


def cost(usage: Usage, prices: Prices) -> int:
    """Cost in micro-dollars, rounded up once per request."""
    cached = min(usage.cached_tokens, usage.prompt_tokens) if prices.cached_input is not None else 0
    written = (
        min(usage.cache_write_tokens, usage.prompt_tokens - cached) if prices.cache_write is not None else 0
    )
    reasoning = min(usage.reasoning_tokens, usage.completion_tokens) if prices.reasoning is not None else 0
    total = (
        (usage.prompt_tokens - cached - written) * prices.input
        + (usage.completion_tokens - reasoning) * prices.output
    )
    if cached:
        total += cached * (prices.cached_input or Decimal(0))
    if written:
        total += written * (prices.cache_write or Decimal(0))
    if reasoning:
        total += reasoning * (prices.reasoning or Decimal(0))
    return int(total.to_integral_value(rounding=ROUND_CEILING))


def max_cost(prompt_tokens: int, completion_tokens: int, prices: Prices) -> int:
    """Upper bound used for reservations: every token at its most expensive price."""
    in_price = max(p for p in (prices.input, prices.cached_input, prices.cache_write) if p is not None)
    out_price = max(p for p in (prices.output, prices.reasoning) if p is not None)
    total = prompt_tokens * in_price + completion_tokens * out_price
    return int(total.to_integral_value(rounding=ROUND_CEILING))


# The largest amount an operator may type (a credit, a spend limit): $1,000,000,000. Far
# below what a 64-bit column holds, so a wallet's sum of many stays exact and storable.
MAX_OPERATOR_MICROS = 10**15


def parse_operator_usd(text: str) -> int:
    """An operator's amount: positive, at most MAX_OPERATOR_MICROS (MoneyError otherwise)."""
    micros = parse_usd(text)
    if micros <= 0:
        raise MoneyError("must be positive")
    if micros > MAX_OPERATOR_MICROS:
        raise MoneyError(f"at most {format_usd(MAX_OPERATOR_MICROS)}")
    return micros
