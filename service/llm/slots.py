"""A slot of the fleet's window (:mod:`service.llm.window`), and who holds it at each moment.

A slot is one call's place in the window: a member of the sorted set ``...:slots`` in Redis, scored
by when its lease ends. Inside a process it is always in exactly one hand, the state of
:data:`SLOT`:

========  =====================================================================================
state     who holds it
========  =====================================================================================
granted   a :class:`Batch`: Redis granted it, the caller that asked has not taken it yet
held      a call, from :meth:`AdaptiveWindow.acquire` to :meth:`AdaptiveWindow.release`
kept      :class:`KeptSlots`, after an answered call, for the process's next call
stale     :class:`KeptSlots`, to be handed back at the next settle (too old to lend, cut, closed)
returned  nobody: a settle removed it from Redis, or its lease ran out there
========  =====================================================================================

Each move of the table is made in one place: :meth:`Batch.answer` (grant, orphan),
:meth:`Batch.take` (take), :meth:`KeptSlots.keep` (answer, orphan, close),
:meth:`KeptSlots.reuse` (reuse, age), :meth:`KeptSlots.cut` (cut) and :meth:`KeptSlots.hand_back`
(linger, settle); a held slot whose outcome is not kept is handed back by the window's settle.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from dedup.lifecycles.machine import Lifecycle, Transition

SLOT = Lifecycle(
    name="window slot",
    initial="asked",
    states={
        "granted": "Redis granted it to a batch of this process; its caller has not taken it yet",
        "held": "a call holds it, from acquire to release",
        "kept": "this process keeps it after an answered call, for its next call",
        "stale": "kept too long to lend again, or a cut or the window's close came: handed back at the next settle",
        "returned": "out of Redis: handed back by a settle, or its lease ran out",
    },
    transitions=(
        Transition("asked", "grant", "granted", "the window has room"),
        Transition("granted", "take", "held", "its caller still waits"),
        Transition("granted", "orphan", "kept", "its caller was cancelled meanwhile"),
        Transition("granted", "close", "stale", "its caller was cancelled after the window closed"),
        Transition("held", "answer", "kept",
                   "the endpoint answered, linger_s > 0, no other process waits, the call started after the last cut"),
        Transition("held", "close", "stale", "the endpoint answered after the window closed"),
        Transition("held", "settle", "returned", "any other outcome: told to the window at once"),
        Transition("held", "expire", "returned", "the process died mid-call: the lease ran out"),
        Transition("kept", "reuse", "held", "no other process waits, the lease is younger than half"),
        Transition("kept", "age", "stale", "a call would take it, but its lease is half gone"),
        Transition("kept", "cut", "stale", "a cut by any process was heard"),
        Transition("kept", "linger", "returned", "kept idle_s without a call (linger_s; 0 when contended or closing)"),
        Transition("stale", "settle", "returned", "the next settle"),
    ),
    final=frozenset({"returned"}),
)


@dataclass(frozen=True, slots=True)
class Slot:
    id: str
    started_ms: int  # when the call started, in Redis time: only calls after the last cut cut again
    granted_at: float  # when Redis granted the slot (the event loop's clock): its lease runs from then


@dataclass(slots=True)
class Batch:
    """The calls of a process that ask Redis for a slot at the same turn of the event loop; holds
    the slots granted to them until each caller takes its own (state ``granted``)."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    wanted: int = 0  # slots asked for
    live: int = 0  # callers still waiting for the answer
    slots: list[Slot] = field(default_factory=list)  # granted and not yet taken
    error: BaseException | None = None

    def join(self) -> None:
        """One more caller asks with this batch."""
        self.wanted += 1
        self.live += 1

    def answer(self, slots: list[Slot]) -> list[Slot]:
        """Redis granted ``slots`` (asked -> granted). Returns those no caller is left to take:
        theirs were cancelled meanwhile (granted -> orphan, for :meth:`KeptSlots.keep`)."""
        self.slots = slots
        unclaimed = len(slots) - self.live
        orphans: list[Slot] = []
        if unclaimed > 0:
            orphans = slots[-unclaimed:]
            del slots[-unclaimed:]
        self.done.set()
        return orphans

    def fail(self, error: BaseException) -> None:
        """Redis could not be asked: every caller of the batch gets ``error``."""
        self.error = error
        self.done.set()

    def leave(self) -> Slot | None:
        """A caller was cancelled: before the answer it no longer counts; after it, the slot it
        would have taken, if any, goes to the process's next call (granted -> orphan)."""
        if not self.done.is_set():
            self.live -= 1
            return None
        return self.slots.pop() if self.slots else None

    def take(self) -> Slot | None:
        """The caller's slot (granted -> held), None when the window had no room for it."""
        if self.error is not None:
            raise self.error
        return self.slots.pop() if self.slots else None


class KeptSlots:
    """The slots a process keeps after answered calls (``kept``) and those it will hand back at the
    next settle (``stale``). Answered calls' slots are still open in Redis: the latest kept is on the
    right and taken first, so the ones a quieter process no longer needs age out."""

    def __init__(self) -> None:
        self._kept: deque[tuple[Slot, float]] = deque()  # (slot, when it was kept, loop time)
        self._stale: list[str] = []  # ids handed back at the next settle
        self._closed = False

    @property
    def pending(self) -> bool:
        """Some slot waits to be handed back, or to be taken."""
        return bool(self._kept or self._stale)

    def keep(self, slots: list[Slot], now: float) -> bool:
        """Keep ``slots`` for the next calls (held or granted -> kept); once the window closed they
        go to the closing settle (-> stale). True when they were kept."""
        if self._closed:
            self._stale.extend(slot.id for slot in slots)
            return False
        self._kept.extend((slot, now) for slot in slots)
        return True

    def reuse(self, now: float, young_ms: float) -> tuple[Slot | None, bool]:
        """The latest kept slot granted less than ``young_ms`` ago (kept -> held), and whether older
        ones met on the way went stale (kept -> age -> stale)."""
        aged = False
        while self._kept:
            kept, _ = self._kept.pop()
            if (now - kept.granted_at) * 1000 < young_ms:
                return kept, aged
            self._stale.append(kept.id)
            aged = True
        return None, aged

    def cut(self) -> bool:
        """A cut was heard: every kept slot goes back at the next settle (kept -> stale). True when
        there was any."""
        if not self._kept:
            return False
        self._stale.extend(slot.id for slot, _ in self._kept)
        self._kept.clear()
        return True

    def hand_back(self, cutoff: float) -> list[str]:
        """The ids to hand back now: every stale slot (stale -> returned) and the slots kept at
        ``cutoff`` or before (kept -> linger -> returned)."""
        ids, self._stale = self._stale, []
        while self._kept and self._kept[0][1] <= cutoff:
            ids.append(self._kept.popleft()[0].id)
        return ids

    def close(self) -> None:
        """From now on a slot given to :meth:`keep` goes to the closing settle."""
        self._closed = True
