"""The runner says when it read its first record and when records finish, screened or handled: what
a benchmark reads to time a run to the microsecond, and an operator to see that records move."""

from __future__ import annotations

import time
from typing import Any

from consumers.partitions import RunnerMetrics
from consumers.records import Record
from tests.unit.test_runner import TOPIC, FakeMsg, ValueScreen, close, make_runner, run, until


class Clock(RunnerMetrics):
    def __init__(self) -> None:
        self.firsts = 0
        self.finished_n: list[int] = []

    def first_record(self) -> None:
        self.firsts += 1

    def finished(self, n: int) -> None:
        self.finished_n.append(n)


class Fetching:
    """A consumer whose ``consume`` hands out the batches given, then nothing."""

    def __init__(self, batches: list[list[FakeMsg]]) -> None:
        self.batches = batches

    def consume(self, n: int, timeout: float) -> list[Any]:
        return self.batches.pop(0) if self.batches else []


def test_the_first_fetched_record_is_told_once_and_every_finish_screened_or_handled() -> None:
    async def test() -> None:
        handled: list[int] = []

        async def handler(r: Record) -> None:
            handled.append(r.offset)

        clock = Clock()
        runner, _fake = await make_runner(handler, [0], screen=ValueScreen(), metrics=clock, poll_timeout_s=0.01)
        runner._thread.consumer = Fetching([  # type: ignore[assignment]
            [FakeMsg(0, 0, b"a", b"done"), FakeMsg(0, 1, b"b", b"new"), FakeMsg(0, 2, b"c", b"done")],
            [FakeMsg(0, 3, b"d", b"new")],
        ])
        assert await runner._poll()
        assert clock.firsts == 1
        assert clock.finished_n == [2]  # the screened records, at once, in one word
        assert await runner._poll()
        assert not await runner._poll()  # nothing more to fetch
        await until(lambda: handled == [1, 3] and runner.in_flight == 0, "the records not screened out")
        assert clock.firsts == 1  # the first record only
        assert clock.finished_n == [2, 1, 1]  # and each handled record as its outcome is durable
        await close(runner)

    run(test)


def test_a_batch_screened_whole_finishes_in_one_word_and_moves_the_commit_mark_past_it() -> None:
    async def test() -> None:
        handled: list[int] = []

        async def handler(r: Record) -> None:
            handled.append(r.offset)

        clock = Clock()
        runner, fake = await make_runner(handler, [0, 1], screen=ValueScreen(), metrics=clock, poll_timeout_s=0.01)
        runner._thread.consumer = Fetching([  # type: ignore[assignment]
            [FakeMsg(0, 4, b"a", b"done"), FakeMsg(1, 9, b"a", b"done"), FakeMsg(0, 5, None, b"done")],
        ])
        runner._thread.consumer.commit = fake.commit  # type: ignore[attr-defined]
        assert await runner._poll()
        assert clock.finished_n == [3] and handled == [] and runner.in_flight == 0
        await runner.commit()
        assert sorted(fake.commits[-1]) == [(TOPIC, 0, 6), (TOPIC, 1, 10)]
        await close(runner)

    run(test)


def test_the_service_exports_both_as_unix_times() -> None:
    from service.core.metrics import Metrics
    from service.runtime.wiring import _RunnerMetrics

    metrics = Metrics()
    told = _RunnerMetrics(metrics)
    read = metrics.registry.get_sample_value
    assert read("agent_first_record_timestamp_seconds") == read("agent_last_finish_timestamp_seconds") == 0
    before = time.time()
    told.first_record()
    told.finished(3)
    assert before <= read("agent_first_record_timestamp_seconds") <= read("agent_last_finish_timestamp_seconds") <= time.time()
