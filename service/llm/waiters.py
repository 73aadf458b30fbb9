"""The calls of one process waiting for a slot of the fleet's window, and the window's linger tick.

- :class:`Waiters` owns the queues: once the window is full the calls of the process wait in line
  and only the first asks Redis again (when a slot of the process is freed, or after a short,
  growing pause), so a full window costs one Redis call per freed slot or poll, not one per waiting
  task; each slot freed wakes one waiter at once, so a wave of answers starts a wave of calls.
  Interactive calls queue apart and go first: a batch call asks only while no interactive call of
  the process waits.
- :class:`Linger` owns the timer that settles the window every ``linger_s`` while there is anything
  to tell, and the background tasks (batches asking Redis, settles) the window awaits at close.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from prometheus_client import Counter

from service.llm.slots import Slot

Attempt = Callable[[], Awaitable[Slot | None]]  # a kept slot, or one from Redis if the window has room


class _Waiter:
    """A call waiting in line; ``woken`` is done when a freed slot is for it to try."""

    __slots__ = ("woken",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.woken: asyncio.Future[None] = loop.create_future()


class Waiters:
    """The lines of calls waiting here for a slot: one for interactive calls, one for batch calls,
    each with one head that asks Redis (``attempt``) while the others wait behind it.

    Each slot of this process freed (given back or kept) wakes one waiter in the same turn of the
    loop: the head first, then the next in line not yet woken. Slots freed together (the answers of
    a wave of calls) so reach as many waiters at once, instead of one per turn of the loop as a
    lock handed down the line would; waiters woken at once that find no kept slot ask Redis in one
    call (the window's batch)."""

    def __init__(self, attempt: Attempt, waits: Counter) -> None:
        self._attempt = attempt
        self._waits = waits  # the window's waits counter, for this endpoint
        self._lines: tuple[deque[_Waiter], deque[_Waiter]] = (deque(), deque())  # interactive, batch
        self._freed = False  # a slot of this process was given back or kept: the head asks again
        self._heads: list[asyncio.Future[None]] = []  # the heads waiting for a freed slot or their pause's end
        self.ramp_at: float | None = None  # (loop time) when a slow start without room may ramp again
        self._behind: list[asyncio.Future[None]] = []  # callers of behind_woken at this turn of the loop

    @property
    def waiting(self) -> bool:
        """Calls of this process wait in line for a slot: the window is full as far as it knows."""
        return bool(self._lines[0] or self._lines[1])

    def freed(self) -> bool:
        """A slot of this process was given back or kept: the head asks again, or, when it was woken
        already, the next waiter not yet woken (an interactive one while any waits). True when it woke
        a call."""
        if not self._freed:
            self._freed = True
            for head in self._heads:
                if not head.done():
                    head.set_result(None)
            return self.waiting
        line = self._lines[0] or self._lines[1]
        for waiter in itertools.islice(line, 1, None):
            if not waiter.woken.done():
                waiter.woken.set_result(None)
                return True
        return False

    async def behind_woken(self) -> None:
        """Return once the calls woken so far had their turn: two turns of the loop from the first
        caller of this turn. The woken calls run at the next turn, each up to its request's write
        (aiohttp writes it from a task of its own, at the turn after); the callers go on after those
        writes. A process whose answers and next calls share one loop so sends a wave's next calls
        before the answered calls' own work (the ledger, the result, the commit) runs."""
        loop = asyncio.get_running_loop()
        if not self._behind:
            loop.call_soon(self._pass_behind)
        me: asyncio.Future[None] = loop.create_future()
        self._behind.append(me)
        await me

    def _pass_behind(self) -> None:
        behind, self._behind = self._behind, []
        asyncio.get_running_loop().call_soon(_go_on, behind)

    async def acquire(self, priority: str) -> Slot:
        """A slot for a call; while calls of this process wait, ``interactive`` ones get the slots
        before ``batch`` ones."""
        urgent = priority == "interactive"
        line = self._lines[0 if urgent else 1]
        if not line and (urgent or not self._lines[0]):  # nobody here waits before it: ask at once
            slot = await self._attempt()
            if slot is not None:
                return slot
        me = _Waiter(asyncio.get_running_loop())
        line.append(me)
        try:
            return await self._wait(me, line, urgent)
        except asyncio.CancelledError:
            if me.woken.done():  # woken for a freed slot, and gone before it tried: the next waiter's
                self.freed()
            raise
        finally:
            line.remove(me)
            for other in self._lines:  # the heads now, the batch one too once no interactive call waits
                if other and not other[0].woken.done():
                    other[0].woken.set_result(None)

    async def _wait(self, me: _Waiter, line: deque[_Waiter], urgent: bool) -> Slot:
        """Behind the head: try when woken. The head: ask Redis when a slot of this process is freed,
        or after a short, growing pause (at most 200 ms); in slow start, also when the window may
        ramp again, so a full window doubles every ``ramp_s``, not at the next poll after it."""
        pause = 0.005
        while True:
            if line[0] is not me or not (urgent or not self._lines[0]):
                await me.woken
                me.woken = asyncio.get_running_loop().create_future()
                if line[0] is me or (not urgent and self._lines[0]):
                    continue  # the head now (it asks below), or interactive calls go first
                slot = await self._attempt()
                if slot is not None:
                    return slot
                continue
            self._freed = False
            slot = await self._attempt()
            if slot is not None:
                return slot
            self._waits.inc()
            wait = pause
            if self.ramp_at is not None:
                wait = min(wait, max(self.ramp_at - asyncio.get_running_loop().time(), 0.001))
            if not await self._freed_within(wait):
                pause = min(pause * 2, 0.2)

    async def _freed_within(self, wait: float) -> bool:
        """Whether a slot of this process was freed, waited for ``wait`` seconds at most. Woken by
        :meth:`freed` itself, at the next turn of the loop (``wait_for`` would wait in a task of its
        own, two turns later, behind the answered calls that freed the slots)."""
        if self._freed:
            return True
        loop = asyncio.get_running_loop()
        head: asyncio.Future[None] = loop.create_future()
        self._heads.append(head)
        timer = loop.call_later(wait, _go_on, [head])
        try:
            await head
        finally:
            timer.cancel()
            self._heads.remove(head)
        return self._freed


def _go_on(behind: list[asyncio.Future[None]]) -> None:
    for caller in behind:
        if not caller.done():  # not cancelled meanwhile
            caller.set_result(None)


class Linger:
    """Every ``linger_s`` while ``pending()`` says there is something to tell: a ``tick()`` (the
    window's settle of what lingered), run as a background task. Owns the timer and every background
    task of the window (:meth:`spawn`), awaited by :meth:`close`."""

    def __init__(self, linger_s: float, tick: Callable[[], Coroutine[Any, Any, None]],
                 pending: Callable[[], bool]) -> None:
        self.linger_s = linger_s
        self._tick = tick
        self._pending = pending
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def arm(self) -> None:
        """A tick in ``linger_s``, unless one is due or the window closed."""
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._fire)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background; :meth:`close` waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _fire(self) -> None:
        self._timer = None
        self.spawn(self._tick()).add_done_callback(self._rearm)

    def _rearm(self, _task: asyncio.Task[None]) -> None:
        if self._pending():
            self.arm()

    async def close(self) -> None:
        """No tick from now on; the background tasks end first."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await asyncio.gather(*self._tasks, return_exceptions=True)
