"""The assigned partitions and what the runner keeps per partition; the runner's settings.

:class:`Partitions` owns the map of assigned partitions: it makes a :class:`PartitionState` on
assign and drops it on revoke. A partition assigned again gets a new state, so a record that
holds the old one can tell its partition is gone (:meth:`Partitions.owns`).

:class:`~consumers.runner.Runner` composes it with its other collaborators, each handed what it
needs in its constructor: :mod:`consumers.thread` (the one thread that calls the consumer),
:mod:`consumers.backpressure` (the window, pausing and resuming, the gate),
:mod:`consumers.dispatch` (key order, handler calls, retries) and :mod:`consumers.commits`
(offsets, transactions, lag).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import TopicPartition

from consumers.offsets import OffsetTracker
from consumers.records import Record
from consumers.transactions import Staged

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
    """One assignment of one partition. Each field has one writer:

    - ``tracker``: the dispatcher adds and finishes offsets; commits confirm them.
    - ``held``: the dispatcher (records taken and not released).
    - ``paused`` and ``capped``: the backpressure.
    - ``revoked``: :class:`Partitions`, when the partition is revoked or lost.
    - ``staged``: the dispatcher stages, commits take (and put back after an abort).
    - ``lag``: commits, as last reported.
    """

    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    held: int = 0
    paused: bool = False
    # paused at its own limit while the window had room (not by a full window or the gate): it
    # resumes below its own low-water mark, whatever the other partitions hold
    capped: bool = False
    revoked: bool = False
    # transactions on: outcomes staged by finished records, by offset, until their transaction
    staged: dict[int, list[Staged]] = field(default_factory=dict)
    lag: int | None = None

    def take_staged(self, below: int) -> dict[int, list[Staged]]:
        """Remove and return the outcomes staged by records below offset ``below``."""
        taken = {offset: items for offset, items in self.staged.items() if offset < below}
        for offset in taken:
            del self.staged[offset]
        return taken


class RunnerMetrics:
    """The gauges and counters the runner moves; a no-op by default."""

    def first_record(self) -> None: ...  # once: the first fetch that returned records
    def consumed(self, n: int) -> None: ...
    def finished(self, n: int) -> None: ...  # n records' outcomes are durable (or found durable before)
    def inflight(self, n: int) -> None: ...
    def paused(self, n: int) -> None: ...
    def assigned(self, n: int) -> None: ...
    def committed(self) -> None: ...
    def lag(self, topic: str, partition: int, lag: int | None) -> None: ...


class Partitions(Mapping[TP, PartitionState]):
    """The assigned partitions' states by ``(topic, partition)``: a read-only mapping, changed only
    by :meth:`assign` and :meth:`revoke` (on the event loop). Reports the assigned count and
    clears a revoked partition's lag gauge."""

    def __init__(self, metrics: RunnerMetrics) -> None:
        self._states: dict[TP, PartitionState] = {}
        self._metrics = metrics

    def __getitem__(self, tp: TP) -> PartitionState:
        return self._states[tp]

    def get(self, tp: TP, default: PartitionState | None = None) -> PartitionState | None:  # type: ignore[override]
        return self._states.get(tp, default)  # once per record: the dict's own, not Mapping's through __getitem__

    def __iter__(self) -> Iterator[TP]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    @property
    def assignment(self) -> list[TP]:
        return [tp for tp, p in self._states.items() if not p.revoked]

    def owns(self, tp: TP, part: PartitionState) -> bool:
        """True while ``part`` is still the live state of ``tp`` (not revoked, not replaced)."""
        return not part.revoked and self._states.get(tp) is part

    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._states[(tp.topic, tp.partition)] = PartitionState()
        self._metrics.assigned(len(self.assignment))

    def revoke(self, partitions: list[TopicPartition]) -> tuple[list[TopicPartition], list[list[Staged]]]:
        """Forget the partitions; returns their offsets to commit and the outcomes staged below them."""
        offsets = []
        staged: list[list[Staged]] = []
        for tp in partitions:
            part = self._states.pop((tp.topic, tp.partition), None)
            if part is None:
                continue
            part.revoked = True
            offset = part.tracker.take_commit()
            if offset is not None:
                offsets.append(TopicPartition(tp.topic, tp.partition, offset))
                staged.extend(part.take_staged(offset).values())
            part.staged.clear()  # above the mark: the next owner handles those records again
            self._metrics.lag(tp.topic, tp.partition, None)
        self._metrics.assigned(len(self.assignment))
        return offsets, staged

    def commit_marks(self) -> list[tuple[PartitionState, TopicPartition]]:
        """Each partition's offset to commit, where it moved since the last confirmed commit."""
        offsets = []
        for (topic, partition), part in self._states.items():
            offset = part.tracker.take_commit()
            if offset is not None:
                offsets.append((part, TopicPartition(topic, partition, offset)))
        return offsets


def fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]" + (f"@{tp.offset}" if tp.offset >= 0 else "") for tp in partitions
    ) or "-"
