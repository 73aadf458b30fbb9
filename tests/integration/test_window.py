"""The fleet's adaptive window of open model calls, shared through Redis: slow start, additive
increase, multiplicative decrease, a restart after an outage, leases that free a dead replica's slots;
and three replicas started at once against a provider that refuses more than 20 concurrent calls."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from dedup.client import close, connect
from dedup.keys import Keys
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.llm.guard import endpoint_tag
from service.llm.window import AdaptiveWindow, Slot
from service.runtime.wiring import ensure_topics
from tests.support import (
    assert_one_result_each,
    classify,
    kill_worker,
    metric,
    produce,
    read_topic,
    running,
    spawn_worker,
    succeeded,
    wait_for,
)

pytestmark = pytest.mark.integration


def with_windows(redis_url: str, body: Callable[..., Awaitable[None]], replicas: int = 2, **options: Any) -> None:
    """``body`` gets ``replicas`` windows on one endpoint, as separate replicas would hold them. They
    tell the window of each answer as it comes (``linger_s=0``) and grow only by answers (``ramp_s=0``)
    unless told otherwise."""
    options.setdefault("linger_s", 0)
    options.setdefault("ramp_s", 0)

    async def main() -> None:
        client = connect(redis_url)
        prefix = f"t{uuid.uuid4().hex[:8]}"
        try:
            windows = [AdaptiveWindow(client, "http://llm:8080/v1", Metrics(), label="primary", key_prefix=prefix,
                                      **options) for _ in range(replicas)]
            await body(*windows)
        finally:
            await close(client)

    asyncio.run(main())


async def granted(window: AdaptiveWindow, n: int, timeout_s: float = 0.3) -> list[Slot]:
    """The slots among ``n`` acquisitions that were granted within ``timeout_s`` (the others given up)."""
    slots: list[Slot] = []
    for _ in range(n):
        try:
            slots.append(await asyncio.wait_for(window.acquire(), timeout_s))
        except TimeoutError:
            break
    return slots


def test_a_cold_window_opens_a_few_slots_then_doubles_per_round_trip(redis_url: str) -> None:
    async def body(a: AdaptiveWindow, b: AdaptiveWindow) -> None:
        first = await granted(a, 3) + await granted(b, 3)
        assert len(first) == 4  # the fleet's cold window, whichever replica asks
        for slot in first:
            await a.release(slot, "ok")
        assert a.size == 8  # slow start: one more per answer
        second = await granted(b, 10)
        assert len(second) == 8
        for slot in second:
            await b.release(slot, "ok")
        assert b.size == 16

    with_windows(redis_url, body, initial=4)


def test_a_full_cold_window_doubles_every_ramp_until_a_429(redis_url: str) -> None:
    """Answers of a 2 s model would double the window every 2 s; a full window that calls wait for
    doubles every ``ramp_s`` instead, and the first 429 ends the slow start."""

    async def body(a: AdaptiveWindow, _b: AdaptiveWindow) -> None:
        held = await granted(a, 4)
        asking = [asyncio.create_task(a.acquire()) for _ in range(100)]
        # 4 -> 8 -> ... -> 64 with no answer at all (the held slots are never released): only the
        # ramp can double it. Waited for, not timed: a loaded machine sees fewer ramps per second.
        deadline = time.monotonic() + 30
        while sum(task.done() for task in asking) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sum(task.done() for task in asking) >= 60
        assert a.size >= 64
        await a.release(held[0], "rate_limited")  # ends the slow start: no more doubling
        size = a.size
        await asyncio.sleep(0.4)  # four ramps, had it not ended
        assert a.size <= size
        for task in asking:
            task.cancel()
        await asyncio.gather(*asking, return_exceptions=True)

    with_windows(redis_url, body, initial=4, ramp_s=0.1)


def test_a_429_cuts_the_window_once_per_round_trip_then_it_grows_by_one(redis_url: str) -> None:
    async def body(a: AdaptiveWindow, b: AdaptiveWindow) -> None:
        slots = await granted(a, 10)
        assert len(slots) == 10
        await a.release(slots[0], "rate_limited")
        assert a.size == 7  # 10 x 0.7
        for slot in slots[1:4]:  # calls open before the cut bring the same news: no second cut
            await b.release(slot, "rate_limited")
        assert b.size == 7
        await asyncio.sleep(0.005)  # a later millisecond of Redis's clock than the cut: the window compares ms
        later = await granted(a, 1)
        await a.release(later[0], "timeout")  # a call that started after the cut can cut again
        assert a.size == 4  # floor(7 x 0.7)
        for slot in slots[4:]:
            await a.release(slot, "ok")
        # above ssthresh the window grows by 1/size per answer: about one slot per round trip
        assert 4 < a.size < 6

    with_windows(redis_url, body, initial=10, backoff=0.7)


def test_an_outage_starts_the_window_over_so_the_fleet_ramps_up_again(redis_url: str) -> None:
    async def body(a: AdaptiveWindow, b: AdaptiveWindow) -> None:
        slots = await granted(a, 10)
        for slot in slots[:-1]:
            await a.release(slot, "ok")
        assert a.size == 15
        await b.release(slots[-1], "outage")
        assert b.size == 8  # back to the initial window, below a threshold of 0.7 of the old one
        assert len(await granted(a, 10)) == 8

    with_windows(redis_url, body, initial=8, backoff=0.7)


def test_a_window_grows_only_while_it_is_used(redis_url: str) -> None:
    """One call at a time never teaches the window that 100 at once would be fine."""

    async def body(a: AdaptiveWindow, _b: AdaptiveWindow) -> None:
        for _ in range(50):
            (slot,) = await granted(a, 1)
            await a.release(slot, "ok")
        assert a.size <= 3

    with_windows(redis_url, body, initial=2)


def test_the_ceiling_caps_the_window(redis_url: str) -> None:
    async def body(a: AdaptiveWindow, _b: AdaptiveWindow) -> None:
        for _ in range(6):
            slots = await granted(a, 20)
            for slot in slots:
                await a.release(slot, "ok")
        assert a.size == 12
        assert len(await granted(a, 20)) == 12

    with_windows(redis_url, body, initial=4, maximum=12)


def test_a_dead_replicas_slots_are_freed_when_their_leases_run_out(redis_url: str) -> None:
    async def body(dead: AdaptiveWindow, alive: AdaptiveWindow) -> None:
        assert len(await granted(dead, 2)) == 2  # never released: the replica was killed
        assert await granted(alive, 1, timeout_s=0.1) == []
        started = time.monotonic()
        (slot,) = await granted(alive, 1, timeout_s=3)
        assert time.monotonic() - started >= 0.2
        await alive.release(slot, "ok")

    with_windows(redis_url, body, initial=2, lease_s=0.5)


def test_waiters_in_one_process_get_a_slot_as_soon_as_one_is_released(redis_url: str) -> None:
    async def body(a: AdaptiveWindow, _b: AdaptiveWindow) -> None:
        (held,) = await granted(a, 1)
        waiters = [asyncio.create_task(a.acquire()) for _ in range(3)]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waiters)
        await a.release(held, "none")  # tells the window nothing, but frees the slot
        done, _ = await asyncio.wait(waiters, timeout=1, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        for w in waiters:
            w.cancel()

    with_windows(redis_url, body, initial=1)


def test_slots_freed_together_reach_as_many_waiters_at_once(redis_url: str) -> None:
    """The answers of a wave of calls start the calls waiting behind them in the same turns of the
    loop, not one waiter per turn."""
    n = 12

    async def body(a: AdaptiveWindow, _b: AdaptiveWindow) -> None:
        held = await granted(a, n)
        assert len(held) == n
        waiters = [asyncio.create_task(a.acquire()) for _ in range(n)]
        await asyncio.sleep(0.3)  # refused by Redis: they wait in line
        assert a.full and not any(w.done() for w in waiters)
        for slot in held:  # answered: each kept for the process's next call, in one turn
            await a.release(slot, "ok")
        for _ in range(3):
            await asyncio.sleep(0)
        assert sum(w.done() for w in waiters) >= n - 1  # the head may be asking Redis meanwhile
        await asyncio.wait_for(asyncio.gather(*waiters), 5)

    with_windows(redis_url, body, initial=n, maximum=n, linger_s=5)


def test_interactive_calls_waiting_here_get_freed_slots_before_batch_ones(redis_url: str) -> None:
    async def body(a: AdaptiveWindow, _b: AdaptiveWindow) -> None:
        (held,) = await granted(a, 1)
        order: list[str] = []

        async def call(name: str, priority: str) -> None:
            slot = await a.acquire(priority)
            order.append(name)
            await asyncio.sleep(0.05)
            await a.release(slot, "none")

        batch = [asyncio.create_task(call(f"batch-{i}", "batch")) for i in range(3)]
        await asyncio.sleep(0.1)  # the batch calls wait first
        urgent = [asyncio.create_task(call(f"interactive-{i}", "interactive")) for i in range(2)]
        await asyncio.sleep(0.1)
        await a.release(held, "none")
        await asyncio.wait_for(asyncio.gather(*batch, *urgent), 10)
        # among calls of one priority the order is whichever asked Redis first
        assert set(order[:2]) == {"interactive-0", "interactive-1"}, order
        assert set(order[2:]) == {"batch-0", "batch-1", "batch-2"}, order

    with_windows(redis_url, body, initial=1, maximum=1)


async def script_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def test_a_busy_process_keeps_its_slots_and_tells_the_window_in_one_call(redis_url: str) -> None:
    """Two Redis calls per model call cost a busy replica half its throughput: an answered call's
    slot is kept for the next call of the process, and the answers reach the window together."""

    async def body(a: AdaptiveWindow, b: AdaptiveWindow) -> None:
        calls_before = await script_calls(a.redis)
        for _ in range(5):  # five rounds of four calls at once, back to back
            slots = await granted(a, 4)
            assert len(slots) == 4
            for slot in slots:
                await a.release(slot, "ok")
        calls = await script_calls(a.redis) - calls_before
        assert calls <= 6, calls  # 4 slots from Redis, the rest kept: against 40 calls without keeping
        assert a.size == 4  # the window has not heard of the answers yet
        await asyncio.sleep(0.5)
        # all 20 answers told in one call: one more slot per answer while the window is at least
        # half used (4 open at most), so 4 -> 9, as if each answer had been told on its own
        assert a.size == 9
        assert len(await granted(b, 24, timeout_s=0.1)) == 9  # and the kept slots were handed back

    with_windows(redis_url, body, initial=4, linger_s=0.05)


def test_calls_that_ask_at_once_share_one_call_to_redis(redis_url: str) -> None:
    """A fetch of records starts dozens of tasks in one turn of the event loop: their slots come
    from one script call, and what the window has no room for is refused to the rest."""

    async def body(a: AdaptiveWindow, _b: AdaptiveWindow) -> None:
        calls_before = await script_calls(a.redis)
        slots = await asyncio.wait_for(asyncio.gather(*(a.acquire() for _ in range(30))), 2)
        assert await script_calls(a.redis) - calls_before == 1
        assert len({slot.id for slot in slots}) == 30
        more = [asyncio.create_task(a.acquire()) for _ in range(20)]
        done, waiting = await asyncio.wait(more, timeout=0.3)
        assert not done and len(waiting) == 20  # the window is full: they wait
        await a.release(slots[0], "none")
        done, _ = await asyncio.wait(more, timeout=2, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        for task in more:
            task.cancel()
        await asyncio.gather(*more, return_exceptions=True)

    with_windows(redis_url, body, initial=30, maximum=30)


def test_a_replica_keeps_no_slot_while_another_waits_for_one(redis_url: str) -> None:
    """A kept slot goes back when its linger ends. A replica that has heard from Redis that another
    was refused a slot hands its slots back as soon as their calls end."""

    async def body(a: AdaptiveWindow, b: AdaptiveWindow) -> None:
        first, second = await granted(a, 2)
        started = time.monotonic()
        waiting = asyncio.create_task(b.acquire())  # refused: the window is full, and now wanted by b
        await asyncio.sleep(0.05)
        await a.release(first, "ok")  # a has not heard of b yet: it keeps the slot for its linger
        await asyncio.wait_for(waiting, 4)
        assert 0.9 < time.monotonic() - started < 3  # b got it when a's linger ended
        waiting = asyncio.create_task(b.acquire())
        await asyncio.sleep(0.05)
        released = time.monotonic()
        await a.release(second, "ok")  # a heard of b when it handed the first slot back
        await asyncio.wait_for(waiting, 2)
        assert time.monotonic() - released < 0.7  # at once, not after a's linger of 1 s

    with_windows(redis_url, body, initial=2, maximum=2, linger_s=1.0)


def test_a_kept_slot_is_handed_out_at_once_unless_a_call_of_the_process_waits_in_line(redis_url: str) -> None:
    async def body(a: AdaptiveWindow, _b: AdaptiveWindow) -> None:
        assert a.kept_slot() is None  # nothing kept: a call asks Redis
        first, second = await granted(a, 2)
        await a.release(first, "ok")  # kept for the next call
        kept = a.kept_slot()
        assert kept is not None and kept.id == first.id
        waiting = asyncio.create_task(a.acquire())  # the window is full: this call waits in line
        await asyncio.sleep(0.05)
        await a.release(kept, "ok")  # kept again, and wanted by the call in line
        assert a.kept_slot() is None  # the line goes first
        got = await asyncio.wait_for(waiting, 2)
        assert got.id == first.id
        for slot in (got, second):
            await a.release(slot, "none")

    with_windows(redis_url, body, initial=2, maximum=2, linger_s=1.0)


def test_a_busy_replica_lets_a_waiting_one_in(redis_url: str) -> None:
    """A replica whose calls never stop would reuse its kept slots for ever; once it hears that
    another waits (within a tick of its linger) it stops keeping them."""

    async def body(a: AdaptiveWindow, b: AdaptiveWindow) -> None:
        stop = asyncio.Event()

        async def busy() -> None:
            while not stop.is_set():
                slot = await a.acquire()
                await asyncio.sleep(0.002)
                await a.release(slot, "ok")

        loops = [asyncio.create_task(busy()) for _ in range(2)]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        slot = await asyncio.wait_for(b.acquire(), 5)
        waited = time.monotonic() - started
        stop.set()
        await b.release(slot, "ok")
        await asyncio.gather(*loops)
        assert waited < 2, waited  # it would wait for ever if a kept its slots

    with_windows(redis_url, body, initial=2, maximum=2, linger_s=0.02)


def test_a_429_hands_back_the_kept_slots_with_the_cut(redis_url: str) -> None:
    async def body(a: AdaptiveWindow, b: AdaptiveWindow) -> None:
        slots = await granted(a, 10)
        for slot in slots[:-1]:
            await a.release(slot, "ok")  # kept
        await a.release(slots[-1], "rate_limited")
        assert a.size == 13  # the nine answers (10 -> 19), then the cut: floor(19 x 0.7)
        assert len(await granted(b, 20, timeout_s=0.1)) == 13  # every kept slot is free again

    with_windows(redis_url, body, initial=10, backoff=0.7, linger_s=10)


def run_fleet(settings: Settings, fake: FakeLLM, tmp_path: Path, tasks: int, window_on: bool, name: str
              ) -> dict[str, Any]:
    """Three ``agent-service run`` replicas started at once on a backlog of ``tasks``, on topics and a
    group of their own; the server's statistics and the time to the last result."""
    kafka = settings.kafka.model_copy(update={
        "input_topic": f"{settings.kafka.input_topic}.{name}", "results_topic": f"{settings.kafka.results_topic}.{name}",
        "dlq_topic": f"{settings.kafka.dlq_topic}.{name}", "group_id": f"{settings.kafka.group_id}.{name}"})
    s = settings.model_copy(update={"kafka": kafka, "llm": settings.llm.model_copy(update={"window": window_on})})
    ensure_topics(s)
    ids = [f"{name}-{i}" for i in range(tasks)]
    produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(i.encode(), classify(i, f"text {i}")) for i in ids])
    fake.reset()
    workers = []
    started = time.monotonic()
    try:
        for n in range(3):
            replica = s.model_copy(update={"worker_id": f"{s.worker_id}-{name}-{n}"})
            workers.append(spawn_worker(replica, str(tmp_path / f"{name}-{n}.log")))
        succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=tasks, timeout_s=240, idle_s=0.5))
        elapsed = time.monotonic() - started
    finally:
        for worker in workers:
            kill_worker(worker)
    stats = fake.stats()
    assert_one_result_each(s.kafka.bootstrap_servers, s.kafka.results_topic, ids, stats["completions_by_step"])
    client = redis.Redis.from_url(s.redis.url.get_secret_value())
    try:
        key = Keys(s.redis.key_prefix).endpoint(endpoint_tag(fake.base_url), "window")
        window = float(client.hget(key, "cwnd") or 0)
    finally:
        client.close()
    return {"tasks": tasks, "seconds": round(elapsed, 1), "requests": stats["requests"],
            "429s": stats["over_concurrency"], "peak_open": stats["peak_open"],
            "window": round(window, 1) if window_on else None}


def test_three_replicas_started_at_once_converge_to_the_providers_limit(
    make_settings: Any, tmp_path: Path
) -> None:
    """A provider that answers 429 above 20 concurrent calls, 0.2 s a call, and three replicas of 64
    tasks in flight each started at once on a backlog: with the window the fleet ramps up to the limit
    and stays near it; the same fleet without it opens up to 192 calls at once."""
    with FakeLLM(latency_s=0.2, max_concurrency=20) as fake:
        base = make_settings(max_in_flight=64, kafka={"topic_partitions": 6})
        s: Settings = base.model_copy(update={"llm": base.llm.model_copy(
            update={"base_url": fake.base_url, "max_attempts": 8, "backoff_max_s": 0.2})})
        windowed = run_fleet(s, fake, tmp_path, 600, True, "aimd")
        print(f"\nwith the window:    {windowed}")
        unlimited = run_fleet(s, fake, tmp_path, 300, False, "open")
        print(f"without the window: {unlimited}")
    # the stated bound: the slow-start overshoot of one round trip, then about one 429 per cut
    assert windowed["429s"] <= 40, windowed
    assert unlimited["429s"] > 5 * windowed["429s"], (windowed, unlimited)
    # it converged to the limit: between cuts the window saws from 0.7 x 20 up to just above 20
    assert 0.7 * 0.7 * 20 <= windowed["window"] <= 24, windowed


def test_a_task_waits_for_a_slot_only_until_its_deadline(make_settings: Any, fake_llm: FakeLLM) -> None:
    """Another replica holds the fleet's only slot: a task with a deadline is dead-lettered as
    expired when it passes, and one without waits and runs once the slot is free."""
    s: Settings = make_settings(llm={"window_initial": 1, "window_max": 1})
    deadline = datetime.now(UTC) + timedelta(seconds=3)

    async def scenario() -> tuple[float, float, float]:
        async with running(s, fake_llm.base_url) as svc:
            other = AdaptiveWindow(svc.redis, fake_llm.base_url, Metrics(), label="primary", initial=1, maximum=1,
                                   key_prefix=s.redis.key_prefix)
            held = await other.acquire()
            started = time.monotonic()
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [
                (b"late", classify("late", deadline=deadline.isoformat())), (b"patient", classify("patient"))])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "expired"}) == 1, 20,
                           what="the task with a deadline expired")
            expired_after = time.monotonic() - started
            calls_while_held = fake_llm.stats()["requests"]
            await other.release(held, "ok")
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, 20,
                           what="the patient task ran")
            return expired_after, calls_while_held, metric(svc, "agent_llm_window_waits_total", {"endpoint": "primary"})

    expired_after, calls_while_held, waits = asyncio.run(scenario())
    assert calls_while_held == 0 and waits >= 1
    assert expired_after < 8, expired_after
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    assert [m.key for m in dead] == [b"late"] and dead[0].headers["dlq.reason"] == b"expired"
