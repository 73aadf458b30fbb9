"""The fleet window's memory (service.llm.window_scripts), on a real redis-server: the largest window
that ran a round trip full without a 429 is remembered per endpoint, a cold window (idle, a restart,
another worker) opens at it, a 429 above it cuts back to it, and a stale memory decays."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from dedup.client import RedisClient, close, connect
from dedup.keys import Keys
from service.core.metrics import Metrics
from service.llm.tags import endpoint_tag
from service.llm.window import AdaptiveWindow, Slot

URL = "http://llm:8080/v1"


Body = Callable[[Callable[[], AdaptiveWindow], Callable[..., Awaitable[None]], Callable[[], Awaitable[int]]],
               Awaitable[None]]


def run(redis_url: str, body: Body, **options: Any) -> None:
    """``body`` gets a factory of windows on one endpoint (each as a new worker holds it), a coroutine
    that forgets the window as its idle expiry does (the memory stays; ``idle(s)`` ages it by ``s``
    seconds as well, an idle period that long), and one that reads the remembered window. Answers reach the window one by one (``linger_s=0``) and only answers grow it
    (``ramp_s=0``)."""
    options.setdefault("linger_s", 0)
    options.setdefault("ramp_s", 0)

    async def main() -> None:
        client: RedisClient = connect(redis_url)
        prefix = f"m{uuid.uuid4().hex[:8]}"
        keys = Keys(prefix)
        tag = endpoint_tag(URL)

        def window() -> AdaptiveWindow:
            return AdaptiveWindow(client, URL, Metrics(), label="primary", key_prefix=prefix, **options)

        async def idle(aged_s: float = 0.0) -> None:
            await client.delete(keys.endpoint(tag, "window"), keys.endpoint(tag, "slots"))
            if aged_s:
                await client.hincrby(keys.endpoint(tag, "memory"), "at", -int(aged_s * 1000))

        async def memory() -> int:
            return int(await client.hget(keys.endpoint(tag, "memory"), "safe") or 0)

        try:
            await body(window, idle, memory)
        finally:
            await close(client)

    asyncio.run(main())


async def take(window: AdaptiveWindow, n: int, timeout_s: float = 0.2) -> list[Slot]:
    """The slots among ``n`` acquisitions granted within ``timeout_s`` each."""
    slots: list[Slot] = []
    for _ in range(n):
        try:
            slots.append(await asyncio.wait_for(window.acquire(), timeout_s))
        except TimeoutError:
            break
    return slots


async def full_round(window: AdaptiveWindow) -> int:
    """Fill the window, then answer every call: one round trip of a full window. Returns its size."""
    slots = await take(window, 1000)
    for slot in slots:
        await window.release(slot, "ok")
    return len(slots)


async def learn(window: AdaptiveWindow, rounds: int) -> None:
    """Slow start until 16 calls are open and one of them gets a 429, then ``rounds`` full round trips."""
    slots = await take(window, 1000)
    while len(slots) < 16:
        for slot in slots:
            await window.release(slot, "ok")
        slots = await take(window, 1000)
    await window.release(slots[0], "rate_limited")  # 16 at once was one too many: 11 from now on
    for slot in slots[1:]:
        await window.release(slot, "ok")
    for _ in range(rounds):
        await full_round(window)


def test_a_cold_window_opens_at_the_window_the_fleet_remembered(redis_url: str) -> None:
    async def body(window: Callable[[], AdaptiveWindow], idle: Callable[[], Awaitable[None]],
                   memory: Callable[[], Awaitable[int]]) -> None:
        first = window()
        await learn(first, rounds=3)
        learned = await memory()
        assert 11 <= learned <= first.size  # a window that ran a round trip full, after the cut to 11
        await idle()
        second = window()  # another worker, or the same one restarted, after the window went idle
        assert len(await take(second, 100)) == learned
        assert second.size == learned

    run(redis_url, body, initial=4, backoff=0.7, memory_s=60)


def test_without_memory_a_cold_window_starts_small(redis_url: str) -> None:
    async def body(window: Callable[[], AdaptiveWindow], idle: Callable[[], Awaitable[None]],
                   memory: Callable[[], Awaitable[int]]) -> None:
        await learn(window(), rounds=3)
        await idle()
        assert len(await take(window(), 100)) == 4
        assert await memory() == 0

    run(redis_url, body, initial=4, backoff=0.7, memory_s=0)


def test_a_429_above_the_memory_cuts_back_to_it_at_it_steps_back_one_slot_and_below_it_cuts_as_ever(
        redis_url: str) -> None:
    async def body(window: Callable[[], AdaptiveWindow], _idle: Callable[[], Awaitable[None]],
                   memory: Callable[[], Awaitable[int]]) -> None:
        w = window()
        await learn(w, rounds=3)
        for _ in range(3):  # a round trip more if the last proof was of the window's own size
            if int(w.size) > await memory():
                break
            await full_round(w)
        remembered = await memory()
        assert int(w.size) > remembered >= 11
        (probe,) = await take(w, 1)
        await w.release(probe, "rate_limited")  # above what ran: back to it, not to 0.7 of the window
        assert w.size == remembered
        assert await memory() == remembered
        await asyncio.sleep(0.01)  # a call that starts after the cut (in Redis ms) may cut again
        (probe,) = await take(w, 1)
        await w.release(probe, "rate_limited")  # refused at the window that ran a moment ago: one slot back
        assert w.size == remembered - 1
        assert await memory() == remembered  # the memory stands
        await asyncio.sleep(0.01)
        (probe,) = await take(w, 1)
        await w.release(probe, "rate_limited")  # refused below it: the memory was wrong
        assert w.size == int((remembered - 1) * 0.7)  # an ordinary cut
        assert await memory() == int((remembered - 1) * 0.7)  # and the memory goes down with it

    run(redis_url, body, initial=4, backoff=0.7, memory_s=60)


def test_a_429_at_a_stale_memory_is_an_ordinary_cut(redis_url: str) -> None:
    async def body(window: Callable[[], AdaptiveWindow], idle: Callable[[float], Awaitable[None]],
                   memory: Callable[[], Awaitable[int]]) -> None:
        await learn(window(), rounds=3)
        remembered = await memory()
        await idle(90)  # half as long again as memory_s: trusted at 0.5 ** 0.5 of it
        w = window()
        slots = await take(w, 1000)
        assert len(slots) == int(remembered * 0.5 ** 0.5) < remembered
        await w.release(slots[0], "rate_limited")  # at the window it trusts, but not a fresh one
        assert w.size == int(len(slots) * 0.7)
        assert await memory() == int(len(slots) * 0.7)

    run(redis_url, body, initial=4, backoff=0.7, memory_s=60)


def test_a_stale_memory_decays_and_is_slow_started_back_to(redis_url: str) -> None:
    async def body(window: Callable[[], AdaptiveWindow], idle: Callable[[], Awaitable[None]],
                   memory: Callable[[], Awaitable[int]]) -> None:
        first = window()
        await learn(first, rounds=3)
        remembered = await memory()
        assert remembered >= 11
        await idle()
        await asyncio.sleep(1.0)  # trusted whole for 0.3 s, then halved per 0.3 s: at most a fifth of it
        second = window()
        size = await full_round(second)
        assert 1 <= size <= remembered // 4, (size, remembered)
        # the memory is the slow start's threshold: the window doubles back up to it, then +1 per round
        sizes = [await full_round(second) for _ in range(6)]
        assert sizes[:2] == [2 * size, 4 * size], sizes
        assert remembered <= sizes[-1] <= remembered + 3, (sizes, remembered)

    run(redis_url, body, initial=1, backoff=0.7, memory_s=0.3)
