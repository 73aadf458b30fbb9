"""Backpressure: how many records the runner may take now, and which partitions it pauses.

A full window first waits for room before it pauses, so librdkafka keeps what it prefetched: for
``pause_after_s``, or twice the time records have recently been taking when that is longer (a
window of 2 s model calls is full for 2 s at a time while perfectly healthy; pausing it then would
throw the prefetch away and refill the window only at half, every turn); a partition over its own
limit pauses at once while others have room; a closed gate pauses every partition. A partition
paused at its own limit resumes below its own low-water mark, whatever the others hold (else
partitions with a backlog, refilling every freed slot, would keep it paused while they last); one
paused for the window or the gate resumes once the window, too, is below its low-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from time import monotonic

from confluent_kafka import TopicPartition

from consumers.partitions import Partitions, RunnerConfig, RunnerMetrics
from consumers.thread import ConsumerThread

log = logging.getLogger(__name__)


class Backpressure:
    """The in-flight window and the pauses it decides.

    Owns how many records are held (taken and not released), the events that say room came free
    and the window is empty, when the window filled, how long a record takes recently, the gate's
    last answer, and each partition's ``paused`` flag. Pauses and resumes through the consumer
    thread; reads the partitions' states, changes only their ``paused``.
    """

    def __init__(self, config: RunnerConfig, partitions: Partitions, thread: ConsumerThread,
                 metrics: RunnerMetrics, gate: Callable[[], bool] | None = None) -> None:
        self._config = config
        self._partitions = partitions
        self._thread = thread
        self._metrics = metrics
        self._gate = gate
        self._gate_closed = False  # the gate said no at the last check: every partition is paused
        self._held = 0
        self._room = asyncio.Event()  # set whenever a record leaves the window
        self._woken = False  # the runner is stopping: no more waits for room
        self._idle = asyncio.Event()
        self._idle.set()
        self._full_since: float | None = None
        self._record_s = 0.0  # how long a record takes, recently (a moving average; 0 before the first)

    # ------------------------------------------------------------------ the window

    @property
    def held(self) -> int:
        """Records taken and not released."""
        return self._held

    @property
    def gated(self) -> bool:
        """True while the gate holds every partition paused."""
        return self._gate_closed

    def take(self) -> None:
        """One record enters the window."""
        self._held += 1
        self._idle.clear()

    def release(self, n: int) -> None:
        """``n`` records leave the window."""
        self._held -= n
        self._room.set()
        self._metrics.inflight(self._held)
        if self._held == 0:
            self._idle.set()

    def wake(self) -> None:
        """End a wait for room now, and every later one (the runner is stopping)."""
        self._woken = True
        self._room.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no record is held; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
        except TimeoutError:
            return False
        return True

    def pause_after_s(self) -> float:
        """How long a full window waits for room before it pauses: see the module docstring."""
        return max(self._config.pause_after_s, 2 * self._record_s)

    def took(self, seconds: float) -> None:
        """A record left the window after ``seconds``: fold it into the moving average."""
        self._record_s = seconds if not self._record_s else self._record_s + (seconds - self._record_s) / 64

    async def wait_for_room(self) -> None:
        if self._woken:  # a wake that came before this wait (while pauses were applied) is not lost
            return
        self._room.clear()
        since = self._full_since if self._full_since is not None else monotonic()
        timeout = max(0.0, since + self.pause_after_s() - monotonic()) + 0.001
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._room.wait()

    # ------------------------------------------------------------------ pauses

    def _gate_open(self) -> bool:
        """Ask the gate (no gate: open); logs each change. A gate that raises counts as open."""
        if self._gate is None:
            return True
        try:
            is_open = bool(self._gate())
        except Exception:  # noqa: BLE001 - a broken gate must not stop consumption for good
            log.exception("the consumer gate failed; treated as open")
            is_open = True
        if is_open == self._gate_closed:  # a transition
            self._gate_closed = not is_open
            if is_open:
                log.info("consumer gate open again: resuming partitions")
            else:
                log.warning("consumer gate closed: pausing all %d partitions", len(self._partitions))
        return is_open

    async def room(self) -> int:
        """Pause and resume partitions; returns how many records may be taken now (0: wait).

        A full window first waits for room (``pause_after_s``) before it pauses: see the module
        docstring. A closed gate pauses every partition at once.
        """
        assert self._thread.consumer is not None
        gate_closed = not self._gate_open()
        room = self._config.max_in_flight - self._held
        full_too_long = self._full_too_long(room)
        to_pause, to_resume, open_partitions = self._plan_pauses(gate_closed or full_too_long, room)
        await self._apply_pauses(to_pause, to_resume)
        if room > 0 and (open_partitions or not self._partitions):
            return room
        if all(p.paused for p in self._partitions.values()):
            return 1  # nothing will arrive: poll to serve rebalances and stay in the group
        return 0

    def _full_too_long(self, room: int) -> bool:
        """Whether the window has been full for :meth:`pause_after_s`; notes when it filled."""
        now = monotonic()
        if room > 0:
            self._full_since = None
        elif self._full_since is None:
            self._full_since = now
        full_for = 0.0 if self._full_since is None else now - self._full_since
        return room <= 0 and full_for >= self.pause_after_s()

    def _plan_pauses(self, pause_all: bool, room: int) -> tuple[list[TopicPartition], list[TopicPartition], int]:
        """Mark the partitions to pause and to resume; also counts those still open for records."""
        cfg = self._config
        low_total = int(cfg.max_in_flight * cfg.resume_ratio)
        low_part = int(cfg.max_in_flight_per_partition * cfg.resume_ratio)
        to_pause, to_resume = [], []
        open_partitions = 0
        for (topic, partition), part in self._partitions.items():
            part_full = part.held >= cfg.max_in_flight_per_partition
            if pause_all and part.paused:  # held now by the window or the gate, whatever paused it first
                part.capped = False
            if (pause_all or (part_full and room > 0)) and not part.paused:
                part.paused, part.capped = True, not pause_all
                to_pause.append(TopicPartition(topic, partition))
            elif (part.paused and not pause_all and part.held <= low_part
                  and (part.capped or self._held <= low_total)):
                part.paused = part.capped = False
                to_resume.append(TopicPartition(topic, partition))
            if not part.paused and not part_full:
                open_partitions += 1
        return to_pause, to_resume, open_partitions

    async def _apply_pauses(self, to_pause: list[TopicPartition], to_resume: list[TopicPartition]) -> None:
        consumer = self._thread.consumer
        assert consumer is not None
        if to_pause:
            await self._thread.call(consumer.pause, to_pause)
            log.debug("paused %d partitions (in flight %d)", len(to_pause), self._held)
        if to_resume:
            await self._thread.call(consumer.resume, to_resume)
            log.debug("resumed %d partitions (in flight %d)", len(to_resume), self._held)
        if to_pause or to_resume:
            self.report_paused()

    def report_paused(self) -> None:
        """Set the paused-partitions gauge from the partitions' flags."""
        self._metrics.paused(sum(1 for p in self._partitions.values() if p.paused))
