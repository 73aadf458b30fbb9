"""What the runner keeps per partition, its settings, and what its parts share.

:class:`~consumers.runner.Runner` is built from :class:`RunnerCore` and two parts of its own:
:mod:`consumers.backpressure` (pausing and resuming) and :mod:`consumers.commits` (offsets,
transactions, lag).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, TopicPartition

from consumers.offsets import OffsetTracker
from consumers.records import Record
from consumers.transactions import Staged, TransactionalProducer

Handler = Callable[[Record], Awaitable[None]]
TP = tuple[str, int]


class Screen(Protocol):
    """Looks at a fetched batch before any record of it starts, and names the records whose outcome
    is durable already (a replay of records processed before): the runner finishes those at once,
    without a handler call each. What it does not name runs through the handler as usual, so a
    screen may always answer "none" (or fail, or time out) without changing any outcome."""

    def wanted(self) -> bool:
        """Whether the next batch is worth screening (e.g. many recent records were duplicates)."""
        ...

    async def __call__(self, records: Sequence[Record]) -> Sequence[bool]:
        """One flag per record, in order: True when its outcome is durable already."""
        ...


@dataclass(slots=True)
class RunnerConfig:
    topic: str
    max_in_flight: int = 256
    max_in_flight_per_partition: int = 256
    resume_ratio: float = 0.5
    pause_after_s: float = 1.0
    commit_interval_s: float = 1.0
    lag_interval_s: float = 5.0
    poll_timeout_s: float = 0.1
    max_batch: int = 500
    drain_timeout_s: float = 30.0
    retry_base_s: float = 0.2
    retry_max_s: float = 10.0
    screen_timeout_s: float = 2.0  # a screen slower than this is skipped: the handler decides each record


@dataclass(slots=True)
class PartitionState:
    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    held: int = 0
    paused: bool = False
    revoked: bool = False
    # transactions on: outcomes staged by finished records, by offset, until their transaction
    staged: dict[int, list[Staged]] = field(default_factory=dict)

    def take_staged(self, below: int) -> dict[int, list[Staged]]:
        """Remove and return the outcomes staged by records below offset ``below``."""
        taken = {offset: items for offset, items in self.staged.items() if offset < below}
        for offset in taken:
            del self.staged[offset]
        return taken


class RunnerMetrics:
    """The gauges and counters the runner moves; a no-op by default."""

    def consumed(self, n: int) -> None: ...
    def inflight(self, n: int) -> None: ...
    def paused(self, n: int) -> None: ...
    def assigned(self, n: int) -> None: ...
    def committed(self) -> None: ...
    def lag(self, topic: str, partition: int, lag: int | None) -> None: ...


class RunnerCore:
    """The state every part of the runner reads, and the one way to call the consumer."""

    config: RunnerConfig
    metrics: RunnerMetrics
    transactions: TransactionalProducer | None
    last_error: str | None
    _consumer: Consumer | None
    _loop: asyncio.AbstractEventLoop | None
    _executor: ThreadPoolExecutor
    _partitions: dict[TP, PartitionState]
    _held: int

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))


def fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]" + (f"@{tp.offset}" if tp.offset >= 0 else "") for tp in partitions
    ) or "-"
