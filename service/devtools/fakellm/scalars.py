"""Scalar values for a JSON schema: strings (with common formats), integers and numbers within
their bounds, and the few words an unconstrained value gets. Every draw comes from the caller's
``random.Random``, so a seed reproduces the answer."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Mapping
from typing import Any, Final

VOCABULARY: Final = (
    "amber", "anchor", "apple", "arrow", "autumn", "basket", "beacon", "birch", "bridge", "candle",
    "canyon", "cedar", "cloud", "copper", "coral", "delta", "desert", "ember", "falcon", "fern",
    "forest", "garden", "glacier", "harbor", "hollow", "island", "ivory", "jasper", "lantern",
    "maple", "meadow", "meteor", "mirror", "nectar", "orbit", "pebble", "pepper", "prairie",
    "quartz", "raven", "river", "saddle", "shadow", "signal", "silver", "spruce", "summit",
    "thistle", "timber", "valley", "velvet", "willow", "winter", "zephyr",
)
DEFAULT_SPAN: Final = 100


class SchemaError(ValueError):
    """The schema is malformed, unsupported or has no instance."""


def words(rng: random.Random, low: int = 1, high: int = 6) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(low, high)))


def number_keyword(schema: Mapping[str, Any], key: str) -> float | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SchemaError(f"{key} must be a finite number, not {value!r}")
    return value


def count_keyword(schema: Mapping[str, Any], key: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"{key} must be a non-negative integer, not {value!r}")
    return value


def string(schema: Mapping[str, Any], rng: random.Random) -> str:
    """A string within its length bounds: a formatted value, else a few words cut or padded."""
    low = count_keyword(schema, "minLength") or 0
    high = count_keyword(schema, "maxLength")
    if high is not None and low > high:
        raise SchemaError("minLength is larger than maxLength")
    shaped = formatted(schema.get("format"), rng)
    if shaped is not None and low <= len(shaped) <= (high if high is not None else len(shaped)):
        return shaped
    text = words(rng)
    while len(text) < low:
        text = f"{text} {rng.choice(VOCABULARY)}"
    if high is not None and len(text) > high:
        cut = text[:high]
        text = cut.rstrip() if len(cut.rstrip()) >= low else cut
    return text


def formatted(fmt: Any, rng: random.Random) -> str | None:
    """A value of a common ``format``; None for a format without a generator."""
    word = rng.choice(VOCABULARY)
    if fmt == "date-time":
        return (f"20{rng.randint(20, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                f"T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z")
    if fmt == "date":
        return f"20{rng.randint(20, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "time":
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
    if fmt == "email":
        return f"{word}@example.com"
    if fmt in ("uri", "url", "iri"):
        return f"https://example.com/{word}"
    if fmt == "hostname":
        return f"{word}.example.com"
    if fmt == "ipv4":
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    if fmt == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return None


def bounds(schema: Mapping[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """(low, low is exclusive, high, high is exclusive), from both exclusive* dialects."""
    low, high = number_keyword(schema, "minimum"), number_keyword(schema, "maximum")
    low_x = high_x = False
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(ex_low, bool):  # draft 4
        low_x = ex_low and low is not None
    elif (value := number_keyword(schema, "exclusiveMinimum")) is not None and (low is None or value >= low):
        low, low_x = value, True
    if isinstance(ex_high, bool):
        high_x = ex_high and high is not None
    elif (value := number_keyword(schema, "exclusiveMaximum")) is not None and (high is None or value <= high):
        high, high_x = value, True
    return low, low_x, high, high_x


def integer(schema: Mapping[str, Any], rng: random.Random) -> int:
    low, low_x, high, high_x = bounds(schema)
    lo = None if low is None else (math.floor(low) + 1 if low_x else math.ceil(low))
    hi = None if high is None else (math.ceil(high) - 1 if high_x else math.floor(high))
    if lo is None:
        lo = 0 if hi is None or hi >= 0 else hi - DEFAULT_SPAN
    if hi is None:
        hi = lo + DEFAULT_SPAN
    step = number_keyword(schema, "multipleOf")
    if step is not None:
        if step <= 0 or step != int(step):
            raise SchemaError("multipleOf of an integer must be a positive integer")
        k_lo, k_hi = -(-lo // int(step)), hi // int(step)
        if k_lo > k_hi:
            raise SchemaError("no multiple of multipleOf lies within the bounds")
        return rng.randint(k_lo, min(k_hi, k_lo + DEFAULT_SPAN)) * int(step)
    if lo > hi:
        raise SchemaError("the integer bounds are empty")
    return rng.randint(lo, hi)


def number(schema: Mapping[str, Any], rng: random.Random) -> float:
    low, low_x, high, high_x = bounds(schema)
    lo = low if low is not None else (0.0 if high is None or high > 0 else high - DEFAULT_SPAN)
    hi = high if high is not None else lo + DEFAULT_SPAN

    def fits(value: float) -> bool:
        return (lo < value if low_x else lo <= value) and (value < hi if high_x else value <= hi)

    step = number_keyword(schema, "multipleOf")
    if step is not None:
        if step <= 0:
            raise SchemaError("multipleOf must be positive")
        k_lo, k_hi = math.ceil(lo / step), math.floor(hi / step)
        if not fits(k_lo * step):
            k_lo += 1
        if not fits(k_hi * step):
            k_hi -= 1
        if k_lo > k_hi:
            raise SchemaError("no multiple of multipleOf lies within the bounds")
        return float(rng.randint(k_lo, min(k_hi, k_lo + DEFAULT_SPAN)) * step)
    if lo > hi or (lo == hi and (low_x or high_x)):
        raise SchemaError("the number bounds are empty")
    for _ in range(8):
        value = rng.uniform(lo, hi)
        for candidate in (round(value, 3), value):
            if fits(candidate):
                return float(candidate)
    return float((lo + hi) / 2)


def any_value(rng: random.Random) -> Any:
    """A value for a schema that allows anything: a few words, an integer or a boolean."""
    pick = rng.randrange(3)
    if pick == 0:
        return words(rng)
    if pick == 1:
        return rng.randint(0, DEFAULT_SPAN)
    return rng.random() < 0.5
