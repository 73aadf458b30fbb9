"""Figures, their targets, and the table they are printed in.

A benchmark never asserts a timing: a figure that misses its target says ``MISSED`` in the
table, one that could not be measured says ``unavailable`` or ``failed`` with the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Status = Literal["ok", "MISSED", "info", "unavailable", "failed"]


@dataclass
class Figure:
    bench: str
    name: str
    value: float | None
    unit: str
    baseline: str = "-"
    target: tuple[str, float] | None = None  # (">=" | "<=", value)
    detail: str = ""
    error: str | None = None  # why there is no value
    unavailable: bool = False

    @property
    def status(self) -> Status:
        if self.value is None:
            return "unavailable" if self.unavailable else "failed"
        if self.target is None:
            return "info"
        op, goal = self.target
        ok = self.value >= goal if op == ">=" else self.value <= goal
        return "ok" if ok else "MISSED"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        op, goal = self.target
        return f"{op} {fmt(goal, self.unit)}"

    @property
    def value_text(self) -> str:
        if self.value is None:
            return self.error or "-"
        return fmt(self.value, self.unit)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = None if self.target is None else {"op": self.target[0], "value": self.target[1]}
        data["status"] = self.status
        return data


def median_of(items: Sequence[T], key: Callable[[T], float]) -> T:
    """The item of median ``key`` (the lower middle one of an even count): a run's figure of
    ``--rounds`` passes, one actual pass rather than a blend of several."""
    return sorted(items, key=key)[(len(items) - 1) // 2]


def fmt(value: float, unit: str) -> str:
    if math.isnan(value) or math.isinf(value):
        return f"{value} {unit}".strip()
    if unit == "%":
        return f"{value:.1f}%"  # 94.7% shown as 95% beside a 95% target read as met
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.0f} MB"
    if float(value).is_integer():
        return f"{int(value):,} {unit}".strip()
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    if abs(value) >= 10:
        return f"{value:.1f} {unit}".strip()
    return f"{value:.2f} {unit}".strip()


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, figures: list[Figure]) -> None:
        self.figures.extend(figures)

    def note(self, bench: str, text: str) -> None:
        self.notes.setdefault(bench, []).append(text)

    def table(self) -> str:
        header = ["BENCHMARK", "FIGURE", "VALUE", "BASELINE", "TARGET", "STATUS"]
        rows = [[f.bench, f.name, f.value_text, f.baseline, f.target_text, f.status] for f in self.figures]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        out = "\n".join(lines)
        details = [(f.bench, f.name, f.detail) for f in self.figures if f.detail]
        if details or self.notes:
            out += "\n\nDetails:"
            seen: set[str] = set()
            for f in self.figures:
                if f.bench not in seen:
                    seen.add(f.bench)
                    for text in self.notes.get(f.bench, []):
                        out += f"\n  {f.bench}: {text}"
                if f.detail:
                    out += f"\n  {f.bench} / {f.name}: {f.detail}"
            for bench, texts in self.notes.items():
                if bench not in seen:
                    for text in texts:
                        out += f"\n  {bench}: {text}"
        if self.context:
            out += "\n\nRun: " + ", ".join(f"{k}={v}" for k, v in self.context.items())
        return out

    def write_json(self, path: Path) -> None:
        data = {
            "context": self.context,
            "figures": [f.to_json() for f in self.figures],
            "notes": self.notes,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
