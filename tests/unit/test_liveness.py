"""Progress and liveness: a stall is measured and named; an outage never pauses consumption for good.

The runner is driven with the fake consumer of ``test_runner``; the processor is the real one, its
record path replaced by one that fails while "Redis" is down, so its own outage flag and gate decide.
"""

from __future__ import annotations

import asyncio

from confluent_kafka import TopicPartition

from consumers.progress import Progress
from consumers.records import Record
from dedup.ledger import LedgerUnavailable
from service.agents.registry import AgentRegistry
from service.core.metrics import Metrics
from service.core.settings import LivenessSettings
from service.pipeline.base import ProcessorConfig
from service.pipeline.processor import TaskProcessor
from service.runtime.liveness import Liveness
from tests.unit.test_runner import TOPIC, FakeMsg, close, make_runner, run, until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_stall_is_measured_only_while_work_is_pending_and_named_by_the_first_cause_that_answers() -> None:
    clock = Clock()
    progress = Progress(stall_s=120, restart_s=600, clock=clock)
    progress.observe(False)
    clock.now += 1000  # idle for long: no stall
    assert progress.stalled_s() == 0 and not progress.stalled and progress.alive
    progress.observe(True)
    clock.now += 60
    assert progress.stalled_s() == 60 and not progress.stalled
    progress.finished()  # a record finished: the clock starts again
    clock.now += 100
    assert progress.stalled_s() == 100 and not progress.stalled
    clock.now += 30
    assert progress.stalled
    progress.causes += [lambda: None, lambda: 1 / 0, lambda: "breaker open on llm:443",  # type: ignore[list-item]
                        lambda: "paused"]
    assert progress.holding() == "breaker open on llm:443"
    assert progress.alive
    clock.now += 600
    assert not progress.alive
    progress.observe(False)  # nothing pending any more
    assert progress.stalled_s() == 0 and not progress.stalled and progress.alive


def test_restart_s_zero_never_fails_liveness() -> None:
    clock = Clock()
    progress = Progress(stall_s=1, restart_s=0, clock=clock)
    progress.observe(True)
    clock.now += 10_000
    assert progress.stalled and progress.alive


class Ledger:
    """Enough of a ledger for a processor that never reaches it."""


def processor(metrics: Metrics) -> TaskProcessor:
    return TaskProcessor.build(ledger=Ledger(), agents=AgentRegistry(), llm=None, outputs=None,  # type: ignore[arg-type]
                               metrics=metrics, config=ProcessorConfig(), worker_id="w", model_name="m")


def test_an_outage_whose_records_lost_their_partitions_ends_when_the_dependencies_answer() -> None:
    """The records that met the outage are revoked in a rebalance while it lasts; the partitions
    assigned then are paused at once. Redis comes back: a probe (not a record) ends the outage."""

    async def test() -> None:
        redis_up = False
        metrics = Metrics()
        proc = processor(metrics)

        async def process(record: Record, held: object = None) -> None:
            if not redis_up:
                raise LedgerUnavailable("redis: connection refused")

        proc._process = process  # type: ignore[method-assign]
        runner, fake = await make_runner(proc._process_bounded, [0, 1], gate=lambda: proc.accepting)

        async def redis_answers() -> bool:
            return redis_up

        async def broker_answers() -> bool:
            return True

        liveness = Liveness(runner, proc, metrics, {"redis": redis_answers, "kafka": broker_answers},
                            LivenessSettings(probe_interval_s=0.01))
        runner._dispatch([FakeMsg(0, 0, b"a"), FakeMsg(1, 0, b"b")])
        await until(lambda: runner.retrying == 2, "both records retrying")
        assert proc.outage is not None and not proc.accepting
        await runner._backpressure.room()
        assert fake.paused == {(TOPIC, 0), (TOPIC, 1)}
        await liveness.tick()
        assert proc.holding() == "redis outage"

        # a rebalance while Redis is down: the retrying records lose their partitions ...
        await runner._revoked([TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
        await until(lambda: runner.in_flight == 0, "the revoked records to stop")
        # ... and the group hands out a partition again, paused at once while the outage lasts
        await runner._assigned([TopicPartition(TOPIC, 2)])
        await runner._backpressure.room()
        assert fake.paused >= {(TOPIC, 2)}

        redis_up = True  # Redis is back; no record is left that could say so
        for _ in range(200):
            await liveness.tick()
            await runner._backpressure.room()
            if (TOPIC, 2) not in fake.paused:
                break
            await asyncio.sleep(0.01)
        assert proc.outage is None, "the outage outlived Redis"
        assert (TOPIC, 2) not in fake.paused, "partition 2 stays paused for good"
        await close(runner)

    run(test)


def test_the_stall_gauge_follows_pending_work_and_names_a_recent_wait() -> None:
    async def test() -> None:
        metrics = Metrics()
        proc = processor(metrics)
        release = asyncio.Event()

        async def handler(record: Record) -> None:
            await release.wait()

        clock = Clock()
        runner, _fake = await make_runner(handler, [0], progress=Progress(stall_s=5, restart_s=50, clock=clock))
        liveness = Liveness(runner, proc, metrics, {}, LivenessSettings(stall_s=5), clock=clock)
        await liveness.tick()
        assert metrics.registry.get_sample_value("agent_stalled_seconds") == 0
        runner._dispatch([FakeMsg(0, 0, b"a")])
        await liveness.tick()
        clock.now += 3
        metrics.llm_window_waits.labels(endpoint="primary").inc()
        await liveness.tick()
        clock.now += 3
        await liveness.tick()
        assert metrics.registry.get_sample_value("agent_stalled_seconds") == 6
        assert runner.progress.stalled and runner.progress.holding() == "window"
        release.set()
        await until(lambda: runner.in_flight == 0, "the record")
        await liveness.tick()
        assert metrics.registry.get_sample_value("agent_stalled_seconds") == 0
        assert not runner.progress.stalled
        await close(runner)

    run(test)
