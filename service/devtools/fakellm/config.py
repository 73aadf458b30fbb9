"""How the fake model server answers: its latency, idempotent mode, tool rounds, argument rules and
concurrency limit, each value checked before it is taken."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from service.devtools.fakellm.tools import ToolArguments, as_tool_arguments

CONFIG_KEYS: Final = frozenset({
    "idempotent", "latency_s", "latency_max_s", "tool_rounds", "tool_calls_per_round", "tool_arguments",
    "max_concurrency",
})


def seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0: {value!r}")
    return float(value)


def count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}: {value!r}")
    return value


def rules(value: Any) -> tuple[ToolArguments, ...]:
    if not isinstance(value, Iterable) or isinstance(value, str | bytes | Mapping):
        raise ValueError("tool_arguments must be a list of rules")
    return tuple(as_tool_arguments(rule) for rule in value)


@dataclass(frozen=True, slots=True)
class Config:
    """One configuration, replaced whole when a value changes (so a request reads one at a time);
    a reset of the server keeps it."""

    idempotent: bool = False
    latency_s: float = 0.0
    latency_max_s: float = 0.0  # above latency_s: each answer waits a uniform draw between the two
    tool_rounds: int = 1
    tool_calls_per_round: int = 1
    tool_arguments: tuple[ToolArguments, ...] = ()
    max_concurrency: int = 0  # 0: no limit

    def updated(self, data: Any) -> Config:
        """This configuration with the keys of ``data`` set; every value is checked before any is
        set, so a bad one changes nothing (:class:`ValueError` says which)."""
        if not isinstance(data, dict) or set(data) - CONFIG_KEYS:
            raise ValueError(f"expected an object with any of: {', '.join(sorted(CONFIG_KEYS))}")
        idempotent = data.get("idempotent", self.idempotent)
        if not isinstance(idempotent, bool):
            raise ValueError("idempotent must be true or false")
        return Config(
            idempotent=idempotent,
            latency_s=seconds(data.get("latency_s", self.latency_s), "latency_s"),
            latency_max_s=seconds(data.get("latency_max_s", self.latency_max_s), "latency_max_s"),
            tool_rounds=count(data.get("tool_rounds", self.tool_rounds), "tool_rounds", 0),
            tool_calls_per_round=count(data.get("tool_calls_per_round", self.tool_calls_per_round),
                                       "tool_calls_per_round", 1),
            tool_arguments=rules(data["tool_arguments"]) if "tool_arguments" in data else self.tool_arguments,
            max_concurrency=count(data.get("max_concurrency", self.max_concurrency), "max_concurrency", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """As ``GET /_config`` answers."""
        return {
            "idempotent": self.idempotent,
            "latency_s": self.latency_s,
            "latency_max_s": self.latency_max_s,
            "tool_rounds": self.tool_rounds,
            "tool_calls_per_round": self.tool_calls_per_round,
            "tool_arguments": [rule.to_dict() for rule in self.tool_arguments],
            "max_concurrency": self.max_concurrency,
        }
