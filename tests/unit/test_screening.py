"""While batches are screened whole (a replay), a batch's screen runs while the runner fetches the
next and starts its screen: batches still reach the handler in the order fetched, the first batch not screened whole ends
the overlap, a rebalance during the next fetch drops the held batch's records of the partition it
moved, and a stop drops the held batch uncommitted."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from consumers.records import Record
from tests.unit.test_runner import TOPIC, FakeConsumer, FakeMsg, ValueScreen, close, make_runner, run, until


class Fetching(FakeConsumer):
    """Hands out the batches given, one per ``consume`` (``on_fetch`` runs first, on the consumer
    thread, as a rebalance callback would); records how many records each ``consume`` asked for."""

    def __init__(self, batches: list[list[FakeMsg]], on_fetch: Any = None) -> None:
        super().__init__()
        self.batches = batches
        self.asked: list[int] = []
        self.on_fetch = on_fetch

    def consume(self, n: int, timeout: float) -> list[Any]:
        self.asked.append(n)
        if self.on_fetch is not None:
            self.on_fetch(len(self.asked))
        return self.batches.pop(0) if self.batches else []

    def close(self) -> None:
        pass


def done(p: int, o: int) -> FakeMsg:
    return FakeMsg(p, o, f"k{o}".encode(), b"done")


def new(p: int, o: int) -> FakeMsg:
    return FakeMsg(p, o, f"k{o}".encode(), b"new")


async def started(max_in_flight: int, batches: list[list[FakeMsg]], handled: list[int],
                  on_fetch: Any = None) -> tuple[Any, Fetching, ValueScreen]:
    async def handler(r: Record) -> None:
        handled.append(r.offset)

    screen = ValueScreen()
    runner, _fake = await make_runner(handler, [0], screen=screen, max_in_flight=max_in_flight,
                                      max_in_flight_per_partition=max_in_flight, poll_timeout_s=0.01)
    fetching = Fetching(batches, on_fetch)
    runner._thread.consumer = fetching  # type: ignore[assignment]
    return runner, fetching, screen


def test_batches_screened_whole_overlap_the_next_fetch_and_reach_the_handler_in_order() -> None:
    async def test() -> None:
        handled: list[int] = []
        runner, fetching, screen = await started(8, [
            [done(0, 0), done(0, 1)], [done(0, 2), done(0, 3)], [done(0, 4), new(0, 5)], [new(0, 6)],
        ], handled)
        assert await runner._poll()  # screened before it is handed over: nothing tells yet
        assert runner._screening.held == 0 and runner._screening.whole
        assert await runner._poll()  # the batch before was screened whole: this one is held
        assert runner._screening.held == 2
        assert runner.pending, "a held batch is work waiting"
        assert await runner._poll()  # starts the next one's screen, then hands the held batch over
        assert runner._screening.held == 2 and fetching.asked[2] == 8  # a held batch takes no room
        assert await runner._poll()
        assert runner._screening.held == 1 and not runner._screening.whole  # [4, 5] was not screened whole
        assert not await runner._poll()  # nothing more: the last batch held is handed over at once
        assert runner._screening.held == 0
        assert screen.batches == [[0, 1], [2, 3], [4, 5], [6]]
        await until(lambda: runner.in_flight == 0 and handled == [5, 6], "the records not screened out")
        await runner.commit()
        assert fetching.commits[-1] == [(TOPIC, 0, 7)]
        await close(runner)

    run(test)


def test_a_rebalance_during_the_next_fetch_drops_the_held_batch_of_the_partition_it_moved() -> None:
    async def test() -> None:
        handled: list[int] = []
        holder: list[Any] = []

        def rebalance(call: int) -> None:
            if call == 3:  # while the second batch is held: revoked and assigned again (a new state)
                runner = holder[0]
                runner._thread.on_loop(runner._revoked([TopicPartition(TOPIC, 0)]))
                runner._thread.on_loop(runner._assigned([TopicPartition(TOPIC, 0)]))

        runner, fetching, _screen = await started(8, [
            [done(0, 0), done(0, 1)], [done(0, 2), new(0, 3)],
            [done(0, 2), new(0, 3)],  # the new assignment starts over from the committed offset
        ], handled, rebalance)
        holder.append(runner)
        assert await runner._poll()
        await runner.commit()
        assert await runner._poll()
        assert runner._screening.held == 2
        assert await runner._poll()  # the held batch's partition moved meanwhile: dropped
        assert not await runner._poll()
        await until(lambda: runner.in_flight == 0 and handled == [3], "the new assignment's record")
        assert runner._partitions[(TOPIC, 0)].tracker.committable() == 4  # offset 3 handled once, 2 screened
        await close(runner)

    run(test)


def test_a_stop_drops_the_held_batch_uncommitted() -> None:
    async def test() -> None:
        handled: list[int] = []
        runner, fetching, _screen = await started(8, [[done(0, 0)], [done(0, 1), new(0, 2)]], handled)
        assert await runner._poll()
        assert await runner._poll()
        assert runner._screening.held == 2
        await runner._drain()
        assert runner._screening.held == 0
        assert handled == [] and runner._partitions[(TOPIC, 0)].tracker.committable() == 1
        assert fetching.commits[-1] == [(TOPIC, 0, 1)]  # the group reads the held batch again

    run(test)


def test_a_held_batch_whose_read_is_out_is_work_waiting_that_names_the_screen() -> None:
    async def test() -> None:
        handled: list[int] = []
        runner, _fetching, screen = await started(8, [[done(0, 0)], [done(0, 1)]], handled)
        assert await runner._poll()  # screened whole and handed over: finished at once
        await until(lambda: runner.in_flight == 0, "the screened record")
        assert not runner.pending and runner._holding() is None
        screen.hang = True  # the ledger never answers the next read
        assert await runner._poll()  # held while its read is out
        assert runner._screening.held == 1
        # work waits, so a screen that never answers is a stall the liveness check sees, and says why
        assert runner.pending and runner._holding() == "screening"
        await runner._drain()  # the read is cancelled, the batch dropped uncommitted
        assert not runner.pending and handled == []

    run(test)
