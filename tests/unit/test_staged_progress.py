"""Transactions on: a record whose outcome is staged is durable only once its transaction commits.
A transaction path that fails every round (a topic that cannot be written, an ACL) is a stall the
watchdog names, not records that keep "finishing" while nothing is ever committed."""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka import TopicPartition

from consumers.partitions import RunnerConfig
from consumers.progress import Progress
from consumers.records import Record
from consumers.runner import Runner
from consumers.transactions import Staged, TransactionFailed, stage
from tests.unit.test_runner import TOPIC, FakeConsumer, FakeMsg, close, run, until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Transactions:
    """Stands in for the transactional producer: fails every round while ``failing``."""

    def __init__(self) -> None:
        self.failing = True
        self.rounds: list[tuple[int, list[tuple[int, int]]]] = []

    def commit(self, items: list[Staged], offsets: list[TopicPartition], group_metadata: Any) -> None:
        self.rounds.append((len(items), [(tp.partition, tp.offset) for tp in offsets]))
        if self.failing:
            raise TransactionFailed("UNKNOWN_TOPIC_OR_PART: a topic that cannot be written")


class TransactionalConsumer(FakeConsumer):
    def consumer_group_metadata(self) -> Any:
        return object()


async def transactional_runner(handler: Any, transactions: Transactions, progress: Progress) -> Runner:
    runner = Runner({}, handler, RunnerConfig(topic=TOPIC), transactions=transactions,  # type: ignore[arg-type]
                    progress=progress)
    runner._thread.consumer = TransactionalConsumer()  # type: ignore[assignment]
    runner._thread.bind(asyncio.get_running_loop())
    await runner._assigned([TopicPartition(TOPIC, 0)])
    return runner


def test_a_transaction_that_never_commits_is_a_stall_named_and_one_that_commits_ends_it() -> None:
    async def test() -> None:
        clock = Clock()
        progress = Progress(stall_s=120, restart_s=600, clock=clock)
        transactions = Transactions()

        async def handler(r: Record) -> None:
            stage(Staged("results", r.key, b"outcome", []))

        runner = await transactional_runner(handler, transactions, progress)
        runner._dispatch([FakeMsg(0, i, f"k{i}".encode()) for i in range(3)])
        await until(lambda: runner.in_flight == 0, "records staged")
        await runner.commit()
        assert transactions.rounds == [(3, [(0, 3)])]
        progress.observe(runner.pending)
        assert runner.pending  # staged, not durable: the transaction failed
        clock.now += 60
        runner._dispatch([FakeMsg(0, 3, b"k3")])  # staged while transactions fail: no progress
        await until(lambda: runner.in_flight == 0, "the fourth record staged")
        clock.now += 61
        assert progress.stalled and progress.holding() == "transactions failing"
        transactions.failing = False
        await runner.commit()  # the same outcomes, tried again
        assert transactions.rounds[-1] == (4, [(0, 4)])
        progress.observe(runner.pending)
        assert not runner.pending and not progress.stalled and progress.stalled_s() == 0
        await close(runner)

    run(test)


def test_records_staged_behind_a_slow_head_are_progress_while_transactions_commit() -> None:
    """A slow record at a partition's head keeps the records behind it out of every transaction (an
    offset commits only below the first unfinished record): while transactions do not fail, their
    staging is progress, or a healthy worker with one long task would be reported stalled."""
    async def test() -> None:
        clock = Clock()
        progress = Progress(stall_s=120, restart_s=600, clock=clock)
        transactions = Transactions()
        transactions.failing = False
        release = asyncio.Event()

        async def handler(r: Record) -> None:
            if r.offset == 0:
                await release.wait()
            stage(Staged("results", r.key, b"outcome", []))

        runner = await transactional_runner(handler, transactions, progress)
        runner._dispatch([FakeMsg(0, 0, b"slow")])
        progress.observe(runner.pending)
        clock.now += 100
        runner._dispatch([FakeMsg(0, 1, b"quick")])
        await until(lambda: runner.in_flight == 1, "the record behind the head staged")
        await runner.commit()
        assert all(items == 0 for items, _offsets in transactions.rounds)  # nothing below the head to carry
        clock.now += 100
        progress.observe(runner.pending)
        assert runner.pending and not progress.stalled and progress.stalled_s() == 100
        release.set()
        await until(lambda: runner.in_flight == 0, "the head")
        await runner.commit()
        assert transactions.rounds[-1] == (2, [(0, 2)])
        await close(runner)

    run(test)
