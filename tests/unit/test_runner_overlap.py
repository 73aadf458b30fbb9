"""A screened batch is handed over one turn of the run loop later: the next batch is fetched and
screened while the ledger answers about the one before. The window counts both, each batch is
handed over in offset order, nothing is committed before it is, and a rebalance between the two
drops the revoked partition's records as before."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from consumers.records import Record
from tests.unit.test_runner import TOPIC, FakeMsg, ValueScreen, close, make_runner, run, until


class Fetching:
    """A consumer whose ``consume`` hands out the batches given, then nothing; it notes what was
    asked for, and runs ``during`` inside the fetch that hands out ``batches[at]``."""

    def __init__(self, batches: list[list[FakeMsg]], during: Callable[[], None] | None = None, at: int = -1) -> None:
        self.batches = batches
        self.asked: list[tuple[int, float]] = []
        self.during, self.at = during, at
        self.committed: list[list[tuple[int, int]]] = []

    def consume(self, n: int, timeout: float) -> list[Any]:
        if len(self.asked) == self.at and self.during is not None:
            self.during()
        self.asked.append((n, timeout))
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition]:
        self.committed.append([(tp.partition, tp.offset) for tp in offsets])
        return offsets

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        return None

    def pause(self, tps: list[TopicPartition]) -> None:
        return None

    def close(self) -> None:
        return None


class Answering(ValueScreen):
    """Answers about its first batch only once ``answer`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()

    async def __call__(self, records: Any) -> list[bool]:
        first = not self.batches
        flags = await super().__call__(records)
        if first:
            await self.answer.wait()
        return flags


def test_the_next_batch_is_fetched_and_screened_while_the_one_before_waits_for_its_answer() -> None:
    async def test() -> None:
        handled: list[int] = []
        release = asyncio.Event()

        async def handler(r: Record) -> None:
            handled.append(r.offset)
            if r.offset == 1:
                await release.wait()

        screen = Answering()
        runner, _fake = await make_runner(handler, [0], screen=screen, max_in_flight=6)
        fetching = runner._thread.consumer = Fetching([  # type: ignore[assignment]
            [FakeMsg(0, 0, b"a", b"done"), FakeMsg(0, 1, b"b", b"new"), FakeMsg(0, 2, b"c", b"done")],
            [FakeMsg(0, 3, b"d", b"new"), FakeMsg(0, 4, b"e", b"done"), FakeMsg(0, 5, b"f", b"done")],
        ])
        tracker = runner._partitions[(TOPIC, 0)].tracker
        assert await runner._poll()
        assert handled == [] and tracker.committable() is None  # being screened: not yet taken
        second = asyncio.create_task(runner._poll())
        await until(lambda: screen.batches == [[0, 1, 2], [3, 4, 5]], "the second batch's screen")
        assert not second.done() and tracker.committable() is None
        screen.answer.set()
        assert await second
        await until(lambda: handled == [1], "the first batch's new record")
        assert tracker.committable() == 1  # offset 1 runs: nothing after it commits
        assert not await runner._poll()  # nothing more: the second batch is handed over
        # a fetch while screening takes half the window, less what is held (offset 1) and what is
        # being screened (the second batch); with a batch being screened it does not wait
        assert fetching.asked == [(3, 0), (3, 0), (2, 0)]
        await until(lambda: handled == [1, 3] and runner.in_flight == 1, "the second batch")
        assert tracker.committable() == 1
        release.set()
        await until(lambda: runner.in_flight == 0, "offset 1")
        assert tracker.committable() == 6
        await close(runner)

    run(test)


def test_a_partition_revoked_while_its_batch_waits_for_the_next_fetch_drops_that_batch_only() -> None:
    async def test() -> None:
        handled: list[tuple[int, int]] = []

        async def handler(r: Record) -> None:
            handled.append((r.partition, r.offset))

        def rebalance() -> None:  # on the consumer's thread, as librdkafka calls it
            runner._thread.on_loop(runner._revoked([TopicPartition(TOPIC, 0)]))
            runner._thread.on_loop(runner._assigned([TopicPartition(TOPIC, 0)]))

        runner, _fake = await make_runner(handler, [0, 1], screen=ValueScreen())
        runner._thread.consumer = Fetching([  # type: ignore[assignment]
            [FakeMsg(0, 5, b"a", b"new"), FakeMsg(0, 6, b"b", b"new"), FakeMsg(1, 0, b"c", b"new")],
            [FakeMsg(0, 0, b"a", b"new"), FakeMsg(1, 1, b"d", b"done")],  # partition 0 read again from 0
        ], during=rebalance, at=1)
        assert await runner._poll()
        assert await runner._poll()
        assert not await runner._poll()
        await until(lambda: runner.in_flight == 0 and len(handled) == 2, "the records still owned")
        assert sorted(handled) == [(0, 0), (1, 0)]  # partition 0's offsets 5 and 6 were fetched by the old owner
        assert runner._partitions[(TOPIC, 0)].tracker.committable() == 1
        assert runner._partitions[(TOPIC, 1)].tracker.committable() == 2
        await close(runner)

    run(test)


def test_a_batch_being_screened_when_the_runner_stops_runs_before_the_final_commit() -> None:
    async def test() -> None:
        handled: list[int] = []

        async def handler(r: Record) -> None:
            handled.append(r.offset)

        class Stopping(ValueScreen):
            async def __call__(self, records: Any) -> list[bool]:
                if records[0].offset == 1:
                    runner.stop()  # the second batch is being screened: the loop ends after this turn
                return await super().__call__(records)

        runner, _fake = await make_runner(handler, [0], screen=Stopping(), poll_timeout_s=0.01)
        fetching = Fetching([[FakeMsg(0, 0, b"a", b"new")], [FakeMsg(0, 1, b"b", b"new")]])
        call = runner._thread.call

        async def calling(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return fetching if fn is Consumer else await call(fn, *args, **kwargs)

        runner._thread.call = calling  # type: ignore[method-assign]
        await runner.run()
        assert handled == [0, 1]
        assert fetching.committed[-1] == [(0, 2)]

    run(test)
