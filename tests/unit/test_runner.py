"""The runner's loop-side logic, driven directly with a fake consumer: no broker, no network."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumers.partitions import RunnerConfig, RunnerMetrics
from consumers.progress import Progress
from consumers.records import Record
from consumers.runner import Runner

TOPIC = "t"


class FakeMsg:
    def __init__(self, partition: int, offset: int, key: bytes | None, value: bytes | None = b"v",
                 headers: Any = None, timestamp: Any = (1, 1000), topic: str = TOPIC) -> None:
        self._p, self._o, self._k, self._v, self._h, self._ts, self._t = (
            partition, offset, key, value, headers, timestamp, topic)

    def error(self) -> Any:
        return None

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v

    def headers(self) -> Any:
        if isinstance(self._h, BaseException):
            raise self._h
        return self._h

    def timestamp(self) -> Any:
        if isinstance(self._ts, BaseException):
            raise self._ts
        return self._ts


class FakeConsumer:
    """Stands in for confluent_kafka.Consumer: records pause/resume/commit calls."""

    def __init__(self) -> None:
        self.paused: set[tuple[str, int]] = set()
        self.commits: list[list[tuple[str, int, int]]] = []
        self.fail_commits = 0
        self.calls: list[str] = []

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition]:
        sent = [(tp.topic, tp.partition, tp.offset) for tp in offsets]
        self.commits.append(sent)
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return offsets

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float | None = None,
                              cached: bool = False) -> tuple[int, int]:
        self.calls.append(f"watermark cached={cached} timeout={timeout}")
        return 0, 10

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        self.calls.append("position")
        return [TopicPartition(tp.topic, tp.partition, 4) for tp in tps]

    def committed(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("committed() is a broker round trip")


class Lag(RunnerMetrics):
    def __init__(self) -> None:
        self.values: dict[int, int | None] = {}

    def lag(self, topic: str, partition: int, lag: int | None) -> None:
        self.values[partition] = lag


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


async def make_runner(handler: Callable[[Record], Awaitable[None]], partitions: list[int],
                      gate: Callable[[], bool] | None = None, screen: Any = None,
                      progress: Progress | None = None, metrics: RunnerMetrics | None = None,
                      **cfg: Any) -> tuple[Runner, FakeConsumer]:
    config = RunnerConfig(topic=TOPIC, retry_base_s=0.005, retry_max_s=0.01, **cfg)
    runner = Runner({}, handler, config, metrics=metrics, gate=gate, screen=screen, progress=progress)
    fake = FakeConsumer()
    runner._thread.consumer = fake  # type: ignore[assignment]
    runner._thread.bind(asyncio.get_running_loop())
    await runner._assigned([TopicPartition(TOPIC, p) for p in partitions])
    return runner, fake


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def close(runner: Runner) -> None:
    await runner._dispatcher.cancel()
    runner._thread.shutdown(wait=True)


async def all_open_once_released(runner: Runner, fake: FakeConsumer, *release: asyncio.Event) -> None:
    """Release the held records; once they finished, every partition is resumed. Closes the runner."""
    for event in release:
        event.set()
    await until(lambda: runner.in_flight == 0, "records")
    await runner._backpressure.room()
    assert fake.paused == set()
    await close(runner)


def test_a_failing_record_holds_only_its_key_and_its_partitions_commit_mark() -> None:
    async def test() -> None:
        done: list[tuple[int, int]] = []
        broken = True

        async def handler(r: Record) -> None:
            if r.key == b"bad" and broken:
                raise ConnectionError("redis down")
            done.append((r.partition, r.offset))

        runner, fake = await make_runner(handler, [0, 1])
        runner._dispatch([
            FakeMsg(0, 0, b"bad"), FakeMsg(0, 1, b"good"), FakeMsg(0, 2, b"bad"), FakeMsg(0, 3, None),
            FakeMsg(1, 0, b"x"), FakeMsg(1, 1, b"bad"),
        ])
        await until(lambda: len(done) == 3 and runner.retrying == 2, "the other keys and partitions")
        assert sorted(done) == [(0, 1), (0, 3), (1, 0)]
        await asyncio.sleep(0.05)  # several retries go by
        assert (0, 2) not in done  # same key waits behind the failing record
        assert runner.retrying == 2
        assert runner.healthy
        assert runner.last_error is not None and "redis down" in runner.last_error
        assert await runner._backpressure.room() > 0
        assert fake.paused == set()  # no partition paused because of one record's retries
        assert not any(p.paused for p in runner._partitions.values())
        await runner.commit()
        assert sorted(fake.commits[-1]) == [(TOPIC, 0, 0), (TOPIC, 1, 1)]  # stops at the failing records

        broken = False
        await until(lambda: runner.in_flight == 0, "all records")
        assert runner.retrying == 0
        assert (0, 2) in done and done.index((0, 0)) < done.index((0, 2))
        await runner.commit()
        assert sorted(fake.commits[-1]) == [(TOPIC, 0, 4), (TOPIC, 1, 2)]
        assert all(p.held == 0 for p in runner._partitions.values())
        await close(runner)

    run(test)


def test_a_failed_commit_is_sent_again_at_the_next_commit() -> None:
    async def test() -> None:
        async def handler(r: Record) -> None:
            return None

        runner, fake = await make_runner(handler, [0])
        runner._dispatch([FakeMsg(0, 0, b"a"), FakeMsg(0, 1, b"b")])
        await until(lambda: runner.in_flight == 0, "records")
        fake.fail_commits = 1
        await runner.commit()
        assert fake.commits == [[(TOPIC, 0, 2)]]
        assert runner._partitions[(TOPIC, 0)].tracker.last_committed is None
        await runner.commit()  # retried
        assert fake.commits == [[(TOPIC, 0, 2)], [(TOPIC, 0, 2)]]
        assert runner._partitions[(TOPIC, 0)].tracker.last_committed == 2
        await runner.commit()  # nothing new: nothing sent
        assert len(fake.commits) == 2
        await close(runner)

    run(test)


def test_a_retry_across_revoke_and_reassign_leaves_the_new_partition_alone() -> None:
    async def test() -> None:
        broken = True
        calls: list[int] = []

        async def handler(r: Record) -> None:
            calls.append(r.offset)
            if broken:
                raise ConnectionError("broker down")

        runner, fake = await make_runner(handler, [0])
        tp = TopicPartition(TOPIC, 0)
        runner._dispatch([FakeMsg(0, 5, b"k"), FakeMsg(0, 6, b"k"), FakeMsg(0, 7, b"other")])
        await until(lambda: runner.retrying == 2, "retries")
        old = runner._partitions[(TOPIC, 0)]
        offsets, _staged = await runner._revoked([tp])
        assert [(o.partition, o.offset) for o in offsets] == [(0, 5)]
        await runner._assigned([tp])
        new = runner._partitions[(TOPIC, 0)]
        assert new is not old
        broken = False  # the next attempt would succeed: it must not happen for the old state
        await until(lambda: runner.in_flight == 0, "the old records to stop")
        assert runner.retrying == 0
        assert old.held == 0 and new.held == 0
        assert len(new.tracker) == 0 and new.tracker.committable() is None
        assert 6 not in calls  # the queued record of the revoked partition never started
        calls.clear()

        # the new assignment reads the records again and finishes them normally
        runner._dispatch([FakeMsg(0, 5, b"k"), FakeMsg(0, 6, b"k"), FakeMsg(0, 7, b"other")])
        await until(lambda: runner.in_flight == 0, "the re-read records")
        assert sorted(calls) == [5, 6, 7]
        assert new.held == 0 and new.tracker.committable() == 8
        await runner.commit()
        assert fake.commits[-1] == [(TOPIC, 0, 8)]
        await close(runner)

    run(test)


def test_a_retry_across_reassign_with_the_same_key_already_queued() -> None:
    async def test() -> None:
        broken = True

        async def handler(r: Record) -> None:
            if broken:
                raise ConnectionError("broker down")

        runner, _fake = await make_runner(handler, [0])
        tp = TopicPartition(TOPIC, 0)
        runner._dispatch([FakeMsg(0, 5, b"k")])
        await until(lambda: runner.retrying == 1, "retry")
        await runner._revoked([tp])
        await runner._assigned([tp])
        new = runner._partitions[(TOPIC, 0)]
        runner._dispatch([FakeMsg(0, 5, b"k")])  # queued behind the old, still retrying, record
        assert new.held == 1 and runner.in_flight == 2
        broken = False
        await until(lambda: runner.in_flight == 0, "both")
        assert new.held == 0 and new.tracker.committable() == 6
        await close(runner)

    run(test)


def test_the_gate_pauses_and_resumes_every_partition() -> None:
    async def test() -> None:
        usable = True

        async def handler(r: Record) -> None:
            return None

        runner, fake = await make_runner(handler, [0, 1, 2], gate=lambda: usable)
        assert await runner._backpressure.room() > 0
        assert fake.paused == set() and not runner.gated
        usable = False
        assert await runner._backpressure.room() == 1  # keep polling: rebalances and membership
        assert fake.paused == {(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)}
        assert runner.gated and runner.healthy
        assert await runner._backpressure.room() == 1
        usable = True
        assert await runner._backpressure.room() > 0
        assert fake.paused == set() and not runner.gated
        await close(runner)

    run(test)


def test_a_partition_paused_at_its_own_limit_resumes_while_the_others_keep_the_window_busy() -> None:
    """Other partitions with a backlog refill every slot freed: the window never falls to its own
    low-water mark, and a partition paused at its own limit must not wait for it to."""
    async def test() -> None:
        release = {p: asyncio.Event() for p in (0, 1, 2)}

        async def handler(r: Record) -> None:
            await release[r.partition].wait()

        runner, fake = await make_runner(handler, [0, 1, 2], max_in_flight=10, max_in_flight_per_partition=4)
        runner._dispatch([FakeMsg(0, i, f"a{i}".encode()) for i in range(4)])
        await runner._backpressure.room()
        assert fake.paused == {(TOPIC, 0)}  # at its own limit while the window has room
        runner._dispatch([FakeMsg(1, i, f"b{i}".encode()) for i in range(4)]
                         + [FakeMsg(2, i, f"c{i}".encode()) for i in range(2)])
        release[0].set()
        await until(lambda: runner._partitions[(TOPIC, 0)].held == 0, "partition 0's records")
        assert runner.in_flight == 6  # above the window's low-water mark (5)
        await runner._backpressure.room()
        assert fake.paused == {(TOPIC, 1)}  # partition 0 open again; 1 is now at its own limit
        for event in release.values():
            event.set()
        await until(lambda: runner.in_flight == 0, "records")
        await close(runner)

    run(test)


def test_a_cancelled_error_the_record_did_not_ask_for_is_a_failed_attempt_not_a_lost_slot() -> None:
    """The handler awaited a future another party cancelled: the record is tried again and finishes,
    rather than leaving its window slot, its key and its partition's commit mark held for good."""
    async def test() -> None:
        attempts = 0

        async def handler(r: Record) -> None:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                elsewhere: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_soon(elsewhere.cancel)
                await elsewhere

        runner, _fake = await make_runner(handler, [0])
        runner._dispatch([FakeMsg(0, 0, b"k"), FakeMsg(0, 1, b"k")])
        await until(lambda: runner.in_flight == 0, "both records of the key")
        assert attempts == 3 and runner._partitions[(TOPIC, 0)].tracker.committable() == 2
        await close(runner)

    run(test)


def test_a_stop_before_the_wait_for_room_ends_that_wait() -> None:
    """stop() while the runner applied pauses, just before it waits for room: the wait must not
    clear that wake and sit out its whole pause delay."""
    async def test() -> None:
        release = asyncio.Event()

        async def handler(r: Record) -> None:
            await release.wait()

        runner, _fake = await make_runner(handler, [0], max_in_flight=1, pause_after_s=60.0)
        runner._dispatch([FakeMsg(0, 0, b"k")])
        assert await runner._backpressure.room() == 0  # full, not paused yet: the runner would wait
        runner.stop()
        await asyncio.wait_for(runner._backpressure.wait_for_room(), 5)  # not the 60 s pause delay
        release.set()
        await until(lambda: runner.in_flight == 0, "the record")
        await close(runner)

    run(test)


class ErrorMsg(FakeMsg):
    def __init__(self, error: KafkaError) -> None:
        super().__init__(0, -1, None)
        self._error = error

    def error(self) -> Any:
        return self._error


def test_a_fatal_consumer_error_ends_the_run_and_a_passing_one_does_not() -> None:
    async def test() -> None:
        async def handler(r: Record) -> None:
            return None

        runner, _fake = await make_runner(handler, [0])
        passing = ErrorMsg(KafkaError(KafkaError._TRANSPORT, "broker down"))
        assert runner._records([passing, FakeMsg(0, 1, b"k")])[0].offset == 1  # logged, skipped
        # as a consumer hands it over: the code _FATAL (librdkafka's fencing reason in the text), the flag unset
        fenced = ErrorMsg(KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other consumer"))
        with pytest.raises(KafkaException) as raised:
            runner._records([FakeMsg(0, 2, b"k"), fenced])
        assert raised.value.args[0].code() == KafkaError._FATAL
        with pytest.raises(KafkaException):  # and one flagged fatal, whatever its code
            runner._records([ErrorMsg(KafkaError(KafkaError._FENCED, "fenced", fatal=True))])
        await close(runner)

    run(test)


def test_a_partition_capped_then_paused_with_the_full_window_waits_for_the_window() -> None:
    """Paused at its own limit first, then held with every partition by the full window: it waits for
    the window like the others, rather than jumping ahead of partitions paused by the same window."""
    async def test() -> None:
        release = {p: asyncio.Event() for p in (0, 1, 2)}

        async def handler(r: Record) -> None:
            await release[r.partition].wait()

        runner, fake = await make_runner(handler, [0, 1, 2], max_in_flight=10, max_in_flight_per_partition=4,
                                         pause_after_s=0.0)
        runner._dispatch([FakeMsg(0, i, f"a{i}".encode()) for i in range(4)])
        await runner._backpressure.room()
        assert fake.paused == {(TOPIC, 0)}
        runner._dispatch([FakeMsg(1, i, f"b{i}".encode()) for i in range(4)]
                         + [FakeMsg(2, i, f"c{i}".encode()) for i in range(2)])
        await runner._backpressure.room()  # the window full: every partition paused
        release[0].set()
        await until(lambda: runner.in_flight == 6, "partition 0's records")
        await runner._backpressure.room()
        assert fake.paused == {(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)}  # the window still above its low-water mark
        await all_open_once_released(runner, fake, *release.values())

    run(test)


@pytest.mark.parametrize("why", ["gate", "full window"])
def test_partitions_paused_for_the_gate_or_a_full_window_wait_for_the_window_to_resume(why: str) -> None:
    async def test() -> None:
        usable = why != "gate"
        release = asyncio.Event()

        async def handler(r: Record) -> None:
            await release.wait()

        runner, fake = await make_runner(handler, [0, 1], gate=lambda: usable, max_in_flight=4,
                                         pause_after_s=0.0 if why == "full window" else 60.0)
        runner._dispatch([FakeMsg(1, i, str(i).encode()) for i in range(4)])
        await runner._backpressure.room()
        assert fake.paused == {(TOPIC, 0), (TOPIC, 1)}
        usable = True
        await runner._backpressure.room()
        assert fake.paused == {(TOPIC, 0), (TOPIC, 1)}  # partition 0 holds nothing; the window is still full
        await all_open_once_released(runner, fake, release)

    run(test)


def test_lag_uses_only_local_state() -> None:
    async def test() -> None:
        async def handler(r: Record) -> None:
            return None

        config = RunnerConfig(topic=TOPIC)
        metrics = Lag()
        runner = Runner({}, handler, config, metrics)
        fake = FakeConsumer()
        runner._thread.consumer = fake  # type: ignore[assignment]
        runner._thread.bind(asyncio.get_running_loop())
        await runner._assigned([TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
        runner._dispatch([FakeMsg(0, 7, b"a")])
        await until(lambda: runner.in_flight == 0, "record")
        await runner._commits.report_lag()
        assert metrics.values == {0: 2, 1: 6}  # high 10 - tracker mark 8; - local position 4
        assert all(c.startswith("watermark cached=True timeout=None") or c == "position" for c in fake.calls)
        await close(runner)

    run(test)


def test_odd_records_never_break_dispatch() -> None:
    async def test() -> None:
        seen: list[Record] = []

        async def handler(r: Record) -> None:
            seen.append(r)

        runner, _fake = await make_runner(handler, [0])

        class NoTopic(FakeMsg):
            def topic(self) -> str:
                raise RuntimeError("broken message")

        runner._dispatch([
            FakeMsg(0, 0, None, None, headers=[("a", None), ("b", b"\xff\xfe")], timestamp=(0, -1)),
            FakeMsg(0, 1, b"k", b"v", headers=UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")),
            NoTopic(0, 2, b"k"),
            FakeMsg(0, 3, b"\xff\xfe", b"\xff", headers=[(b"\xffname", "text")], timestamp=RuntimeError("x")),
        ])
        await until(lambda: len(seen) == 3, "records")
        by_offset = {r.offset: r for r in seen}
        assert by_offset[0].key is None and by_offset[0].value is None
        assert by_offset[0].headers == [("a", b""), ("b", b"\xff\xfe")]
        assert by_offset[0].timestamp_ms is None
        assert by_offset[1].headers == []
        assert by_offset[3].headers == [("\ufffdname", b"text")] and by_offset[3].timestamp_ms is None
        assert by_offset[3].key == b"\xff\xfe"
        await close(runner)

    run(test)


def test_record_from_message_keeps_ordinary_fields() -> None:
    r = Record.from_message(FakeMsg(3, 9, b"k", b"v", headers=[("traceparent", b"00-x")], timestamp=(1, 1234)))
    assert (r.topic, r.partition, r.offset, r.key, r.value) == (TOPIC, 3, 9, b"k", b"v")
    assert r.headers == [("traceparent", b"00-x")] and r.timestamp_ms == 1234


def test_a_window_full_of_slow_records_waits_longer_before_it_pauses() -> None:
    """Records that take 0.2 s each keep a healthy window full that long: it pauses only after twice
    that, not after pause_after_s (pausing throws librdkafka's prefetch away and refills at half)."""
    async def test() -> None:
        release = asyncio.Event()

        async def handler(r: Record) -> None:
            if r.offset < 4:
                await asyncio.sleep(0.2)
            else:
                await release.wait()

        runner, fake = await make_runner(handler, [0], max_in_flight=4, pause_after_s=0.05)
        runner._dispatch([FakeMsg(0, i, str(i).encode()) for i in range(4)])
        await until(lambda: runner.in_flight == 0, "the slow records")
        assert runner._backpressure.pause_after_s() == pytest.approx(0.4, abs=0.1)
        runner._dispatch([FakeMsg(0, i, str(i).encode()) for i in range(4, 8)])
        await runner._backpressure.room()  # full: notes when it filled
        await asyncio.sleep(0.1)  # past pause_after_s, not past twice a record's time
        await runner._backpressure.room()
        assert fake.paused == set()
        await asyncio.sleep(0.4)
        await runner._backpressure.room()
        assert fake.paused == {(TOPIC, 0)}
        release.set()
        await until(lambda: runner.in_flight == 0, "records")
        await close(runner)

    run(test)


class ValueScreen:
    """Names the records whose value is b"done"; or fails, or hangs, as told."""

    def __init__(self, fail: BaseException | None = None, hang: bool = False, wanted: bool = True) -> None:
        self.fail, self.hang, self._wanted = fail, hang, wanted
        self.batches: list[list[int]] = []

    def wanted(self) -> bool:
        return self._wanted

    async def __call__(self, records: Any) -> list[bool]:
        self.batches.append([r.offset for r in records])
        if self.hang:
            await asyncio.sleep(60)
        if self.fail is not None:
            raise self.fail
        return [r.value == b"done" for r in records]


async def dispatch_screened(runner: Runner, msgs: list[FakeMsg]) -> None:
    """What the run loop does with a fetched batch."""
    records = runner._records(msgs)
    runner._dispatcher.dispatch(records, await runner._screened(records))


def test_records_the_screen_names_finish_without_the_handler_and_commit_in_order() -> None:
    async def test() -> None:
        release = asyncio.Event()
        handled: list[int] = []

        async def handler(r: Record) -> None:
            handled.append(r.offset)
            if r.offset == 0:
                await release.wait()

        screen = ValueScreen()
        runner, fake = await make_runner(handler, [0], screen=screen)
        await dispatch_screened(runner, [
            FakeMsg(0, 0, b"a", b"new"), FakeMsg(0, 1, b"a", b"done"), FakeMsg(0, 2, b"b", b"done"),
            FakeMsg(0, 3, b"c", b"new"),
        ])
        assert screen.batches == [[0, 1, 2, 3]]
        await until(lambda: handled == [0, 3] and runner.in_flight == 1, "the records not screened out")
        await runner.commit()
        assert fake.commits in ([], [[(TOPIC, 0, 0)]])  # offset 0 is still running: nothing after it commits
        release.set()
        await until(lambda: runner.in_flight == 0, "the first record")
        await runner.commit()
        assert fake.commits[-1] == [(TOPIC, 0, 4)]
        assert handled == [0, 3]  # the screened records never reached the handler
        await close(runner)

    run(test)


@pytest.mark.parametrize("screen", [
    ValueScreen(fail=ConnectionError("redis down")), ValueScreen(hang=True), ValueScreen(wanted=False),
], ids=["fails", "hangs", "not-wanted"])
def test_a_screen_that_fails_hangs_or_is_not_wanted_leaves_every_record_to_the_handler(screen: ValueScreen) -> None:
    async def test() -> None:
        handled: list[int] = []

        async def handler(r: Record) -> None:
            handled.append(r.offset)

        runner, fake = await make_runner(handler, [0], screen=screen, screen_timeout_s=0.05)
        await dispatch_screened(runner, [FakeMsg(0, 0, b"a", b"done"), FakeMsg(0, 1, b"b", b"new")])
        await until(lambda: runner.in_flight == 0, "both records")
        assert sorted(handled) == [0, 1]
        assert screen.batches == ([] if not screen._wanted else [[0, 1]])
        await runner.commit()
        assert fake.commits == [[(TOPIC, 0, 2)]]
        await close(runner)

    run(test)


def test_a_batch_whose_partition_is_revoked_and_assigned_again_while_screened_is_dropped() -> None:
    async def test() -> None:
        handled: list[int] = []

        async def handler(r: Record) -> None:
            handled.append(r.offset)

        class Rebalancing(ValueScreen):
            async def __call__(self, records: Any) -> list[bool]:
                await runner._revoked([TopicPartition(TOPIC, 0)])
                await runner._assigned([TopicPartition(TOPIC, 0)])  # a new state: fetching starts over
                return [False for _ in records]

        runner, _fake = await make_runner(handler, [0], screen=Rebalancing())
        msgs = [FakeMsg(0, 7, b"a"), FakeMsg(0, 8, b"b")]
        records = runner._records(msgs)
        owners = dict(runner._partitions)
        runner._dispatcher.dispatch(records, await runner._screened(records), owners)
        await asyncio.sleep(0.02)
        assert handled == [] and runner.in_flight == 0
        assert runner._partitions[(TOPIC, 0)].tracker.committable() is None  # the new owner starts at the committed offset
        await close(runner)

    run(test)
