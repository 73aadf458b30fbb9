"""Fault rules: which request a fault hits, how often, and what it does (see the package docstring);
the rule base and the active list are shared with the fake downstream."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Final, Generic, Self, TypeVar

TOOL_FAULTS: Final = ("invalid_tool_args", "unknown_tool")  # like schema_violation when no tools are offered
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
    *TOOL_FAULTS,
)
REFUSAL: Final = "I can't help with that."


@dataclass(frozen=True, slots=True)
class Rule:
    """What every fault rule of the fake servers has; a subclass names its faults in ``KNOWN``."""

    KNOWN: ClassVar[tuple[str, ...]] = ()
    SECONDS: ClassVar[tuple[str, ...]] = ("delay_s",)  # the fields that hold seconds

    fault: str
    match: str | None = None  # substring of the request's Idempotency-Key (each server says what else)
    times: int | None = None  # requests this rule still applies to; None: forever
    probability: float = 1.0  # chance that a matching request is hit
    delay_s: float = 0.0
    status: int = 500  # for the faults that answer with an HTTP error

    def __post_init__(self) -> None:
        if self.fault not in self.KNOWN:
            raise ValueError(f"unknown fault {self.fault!r}; known: {', '.join(self.KNOWN)}")
        if self.match is not None and not isinstance(self.match, str):
            raise ValueError(f"match must be a string or None: {self.match!r}")
        if self.times is not None and (isinstance(self.times, bool) or not isinstance(self.times, int)
                                       or self.times < 1):
            raise ValueError(f"times must be a positive integer or None: {self.times!r}")
        for name in ("probability", *self.SECONDS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0: {value!r}")
        if self.probability > 1:
            raise ValueError(f"probability must be within [0, 1]: {self.probability!r}")
        if isinstance(self.status, bool) or not isinstance(self.status, int) or not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599): {self.status!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
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


@dataclass(frozen=True, slots=True)
class FaultRule(Rule):
    """One fault to inject into the fake model; see the package docstring for what each does.

    ``match`` is a substring of the Idempotency-Key (of the raw body without one).
    """

    KNOWN: ClassVar[tuple[str, ...]] = FAULTS
    SECONDS: ClassVar[tuple[str, ...]] = ("delay_s", "retry_after_s")

    retry_after_s: float = 1.0  # for "rate_limit"


R = TypeVar("R", bound=Rule)


def as_rule(rule: FaultRule | Mapping[str, Any]) -> FaultRule:
    return rule if isinstance(rule, FaultRule) else FaultRule.from_dict(rule)


class Armed(Generic[R]):
    """A rule in the active list with the applications it has left."""

    __slots__ = ("remaining", "rule")

    def __init__(self, rule: R) -> None:
        self.rule = rule
        self.remaining = rule.times


def with_times(rule: R, remaining: int | None) -> R:
    return rule if rule.times == remaining else replace(rule, times=remaining)


class FaultRules(Generic[R]):
    """The fault rules of a fake server, in order, each used up by its ``times``; thread-safe under
    the server's ``_lock``. A subclass names how a mapping becomes a rule (:meth:`_as_rule`)."""

    _lock: threading.Lock
    _rules: list[Armed[R]]

    @staticmethod
    def _as_rule(rule: Any) -> R:
        raise NotImplementedError

    def add_fault(self, rule: R | Mapping[str, Any]) -> None:
        """Append a rule; it applies only when no earlier rule matches."""
        armed = Armed(self._as_rule(rule))
        with self._lock:
            self._rules.append(armed)

    def set_faults(self, rules: Iterable[R | Mapping[str, Any]]) -> None:
        """Replace all rules (validated first: a bad rule changes nothing)."""
        armed = [Armed(self._as_rule(rule)) for rule in rules]
        with self._lock:
            self._rules = armed

    def clear_faults(self) -> None:
        with self._lock:
            self._rules = []

    def faults(self) -> list[R]:
        """The active rules, ``times`` showing what each has left."""
        with self._lock:
            return [with_times(a.rule, a.remaining) for a in self._rules]


def take(rules: list[Armed[R]], hits: Callable[[R], bool], rng: random.Random) -> R | None:
    """The first rule that ``hits`` the request and passes its probability, used up by one; the
    caller holds the lock that guards ``rules``."""
    for armed in rules:
        rule = armed.rule
        if not hits(rule):
            continue
        if rule.probability < 1.0 and rng.random() >= rule.probability:
            continue
        if armed.remaining is not None:
            armed.remaining -= 1
            if armed.remaining <= 0:
                rules.remove(armed)
        return rule
    return None
