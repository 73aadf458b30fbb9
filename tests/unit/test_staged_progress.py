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


def test_a_transaction_that_never_commits_is_a_stall_named_and_one_that_commits_ends_it() -> None:
    async def test() -> None:
        clock = Clock()
        progress = Progress(stall_s=120, restart_s=600, clock=clock)
        transactions = Transactions()

        async def handler(r: Record) -> None:
            stage(Staged("results", r.key, b"outcome", []))

        runner = Runner({}, handler, RunnerConfig(topic=TOPIC), transactions=transactions,  # type: ignore[arg-type]
                        progress=progress)
        runner._thread.consumer = TransactionalConsumer()  # type: ignore[assignment]
        runner._thread.bind(asyncio.get_running_loop())
        await runner._assigned([TopicPartition(TOPIC, 0)])
        runner._dispatch([FakeMsg(0, i, f"k{i}".encode()) for i in range(3)])
        await until(lambda: runner.in_flight == 0, "records staged")
        await runner.commit()
        assert transactions.rounds == [(3, [(0, 3)])]
        progress.observe(runner.pending)
        assert runner.pending  # staged, not durable: the transaction failed
        clock.now += 121
        assert progress.stalled and progress.holding() == "transactions failing"
        transactions.failing = False
        await runner.commit()  # the same outcomes, tried again
        assert transactions.rounds[-1] == (3, [(0, 3)])
        progress.observe(runner.pending)
        assert not runner.pending and not progress.stalled and progress.stalled_s() == 0
        await close(runner)

    run(test)
