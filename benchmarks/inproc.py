"""The service in this process, built by :func:`service.runtime.wiring.build` and watched through its metrics.

Timing points come from the service's own counters, read every few milliseconds: when the first
record was handed to the pipeline, and when the expected number of outcomes was reached.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.env import progress
from service.core.settings import Settings
from service.runtime.wiring import Service, build, ensure_topics

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default), threads included."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """CPU seconds spent by named processes (or groups of them) between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: dict[str, int | list[int] | None]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    @staticmethod
    def _seconds(pid: int | list[int] | None) -> float:
        return sum(cpu_seconds(p) for p in pid) if isinstance(pid, list) else cpu_seconds(pid)

    def start(self) -> None:
        self._start = {name: self._seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {name: self._seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used

    def per_item_ms(self, n: int) -> str:
        if not self.used or n <= 0:
            return ""
        parts = [f"{name} {secs * 1000 / n:.3f}" for name, secs in self.used.items() if secs == secs]
        return "CPU ms per task: " + ", ".join(parts)


class Stalled(RuntimeError):
    """No progress for too long."""


@dataclass
class Timing:
    started: float
    first: float | None = None  # first record handed to the pipeline
    done: float | None = None
    counts: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        assert self.done is not None
        return self.done - self.started

    @property
    def processing_s(self) -> float:
        assert self.done is not None and self.first is not None
        return self.done - self.first

    @property
    def join_s(self) -> float:
        return (self.first or self.started) - self.started


def counts(service: Service) -> dict[str, float]:
    reg = service.metrics.registry

    def get(name: str, labels: dict[str, str] | None = None) -> float:
        return float(reg.get_sample_value(name, labels or {}) or 0.0)

    return {
        "consumed": get("agent_messages_consumed_total"),
        "succeeded": get("agent_tasks_total", {"outcome": "succeeded"}),
        "duplicate": get("agent_tasks_total", {"outcome": "duplicate"}),
        "dead_lettered": get("agent_tasks_total", {"outcome": "dead_lettered"}),
        "conflict": get("agent_tasks_total", {"outcome": "conflict"}),
    }


class ServiceRun:
    """``async with ServiceRun(settings, url) as run: timing = await run.wait(...)``."""

    def __init__(self, settings: Settings, llm_base_url: str, label: str) -> None:
        self.settings = settings
        self.llm_base_url = llm_base_url
        self.label = label
        self.service: Service | None = None
        self._task: asyncio.Task[None] | None = None
        self.timing: Timing | None = None

    async def __aenter__(self) -> ServiceRun:
        await asyncio.to_thread(ensure_topics, self.settings)
        self.service = build(self.settings, llm_base_url=self.llm_base_url)
        self.timing = Timing(started=time.monotonic())
        self._task = asyncio.create_task(self.service.runner.run(), name=f"bench-{self.label}")
        return self

    async def wait(self, done: Callable[[dict[str, float]], bool], *, total: int, progress_key: str,
                   interval_s: float = 0.01, stall_s: float = 90.0, timeout_s: float = 3600.0) -> Timing:
        """Wait until ``done(counts)``; raise :class:`Stalled` when ``progress_key`` stops moving."""
        assert self.service is not None and self.timing is not None and self._task is not None
        timing = self.timing
        last_value, last_move = -1.0, time.monotonic()
        next_report = time.monotonic() + 10
        deadline = timing.started + timeout_s
        while True:
            c = counts(self.service)
            now = time.monotonic()
            if timing.first is None and c["consumed"] > 0:
                timing.first = now
            if done(c):
                timing.done = now
                timing.counts = c
                return timing
            if self._task.done():
                self._task.result()
                raise RuntimeError("the consumer stopped before the work was done")
            value = c[progress_key]
            if value != last_value:
                last_value, last_move = value, now
            elif now - last_move > stall_s:
                raise Stalled(f"no progress for {stall_s:.0f}s at {value:,.0f}/{total:,} ({c})")
            if now > deadline:
                raise Stalled(f"not done after {timeout_s:.0f}s: {value:,.0f}/{total:,} ({c})")
            if now >= next_report:
                rate = value / max(now - (timing.first or timing.started), 1e-9)
                progress(f"  {self.label}: {value:,.0f}/{total:,} ({rate:,.0f}/s)")
                next_report = now + 10
            await asyncio.sleep(interval_s)

    async def __aexit__(self, *exc: Any) -> None:
        assert self.service is not None and self._task is not None
        self.service.runner.stop()
        try:
            await asyncio.wait_for(self._task, 120)
        except Exception as e:  # noqa: BLE001 - a failed drain must not hide the figures
            progress(f"  {self.label}: the consumer did not stop cleanly: {type(e).__name__}: {e}")
        await self.service.aclose()
