"""The line of calls waiting for a slot: a call woken by an answered call's freed slot, the head of the
line or one behind it, goes out (its request written, as aiohttp writes it from a task of its own)
before the answered call's task goes on with its own work."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter

from service.llm.slots import Slot
from service.llm.waiters import Waiters


def _waits() -> Counter:
    return Counter("waits", "waits", registry=CollectorRegistry())


def test_a_woken_call_is_written_before_the_answered_call_goes_on() -> None:
    async def scenario() -> list[str]:
        events: list[str] = []
        free: list[Slot] = []

        async def attempt() -> Slot | None:
            return free.pop() if free else None

        waiters = Waiters(attempt, _waits())

        async def call(name: str) -> None:
            await waiters.acquire("batch")
            events.append(f"{name} started")
            written = asyncio.get_running_loop().create_task(_write(events, name))  # as aiohttp's write_bytes
            await written

        async def answered(name: str) -> None:
            free.append(Slot(name, 0, 0.0))
            assert waiters.freed()
            await waiters.behind_woken()
            events.append(f"{name} goes on")

        calls = [asyncio.create_task(call(n)) for n in ("first", "second")]
        for _ in range(5):  # both in line, the first asking as the head
            await asyncio.sleep(0)
        assert waiters.waiting
        await asyncio.gather(answered("a"), answered("b"), *calls)
        return events

    events = asyncio.run(scenario())
    for woken in ("first", "second"):  # the head of the line, and the call behind it
        assert events.index(f"{woken} started") < events.index(f"{woken} written") < events.index("a goes on")
        assert events.index(f"{woken} written") < events.index("b goes on")


def test_a_slot_freed_with_nobody_in_line_wakes_no_call() -> None:
    async def scenario() -> tuple[bool, bool]:
        waiters = Waiters(_none, _waits())
        first = waiters.freed()
        return first, waiters.freed()

    assert asyncio.run(scenario()) == (False, False)


async def _none() -> Slot | None:
    return None


async def _write(events: list[str], name: str) -> None:
    events.append(f"{name} written")
