"""Fault rules: which request a fault hits, how often, and what it does (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Final

FAULTS: Final = (
    "latency",
    "error",
    "rate_limit",
    "truncate",
    "refuse",
    "slow_success",
    "invalid_json",
    "schema_violation",
    "empty",
    "disconnect",
)
REFUSAL: Final = "I can't help with that."


@dataclass(frozen=True, slots=True)
class FaultRule:
    """One fault to inject; see the module docstring for what each ``fault`` does."""

    fault: str
    match: str | None = None  # substring of the Idempotency-Key (or of the raw body)
    times: int | None = None  # requests this rule still applies to; None: forever
    probability: float = 1.0  # chance that a matching request is hit
    delay_s: float = 0.0
    status: int = 500  # for "error"
    retry_after_s: float = 1.0  # for "rate_limit"

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; known: {', '.join(FAULTS)}")
        if self.match is not None and not isinstance(self.match, str):
            raise ValueError(f"match must be a string or None: {self.match!r}")
        if self.times is not None and (isinstance(self.times, bool) or not isinstance(self.times, int)
                                       or self.times < 1):
            raise ValueError(f"times must be a positive integer or None: {self.times!r}")
        for name in ("probability", "delay_s", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0: {value!r}")
        if self.probability > 1:
            raise ValueError(f"probability must be within [0, 1]: {self.probability!r}")
        if isinstance(self.status, bool) or not isinstance(self.status, int) or not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599): {self.status!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultRule:
        """A rule from its JSON form; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a fault rule must be an object, not {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault rule fields: {', '.join(sorted(unknown))}")
        if "fault" not in data:
            raise ValueError("a fault rule needs a 'fault'")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_rule(rule: FaultRule | Mapping[str, Any]) -> FaultRule:
    return rule if isinstance(rule, FaultRule) else FaultRule.from_dict(rule)


class Armed:
    """A rule in the active list with the applications it has left."""

    __slots__ = ("remaining", "rule")

    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.remaining = rule.times


def with_times(rule: FaultRule, remaining: int | None) -> FaultRule:
    return rule if rule.times == remaining else replace(rule, times=remaining)
