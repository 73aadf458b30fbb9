"""The board of waiting records: what waits, why, since and until when."""

from __future__ import annotations

from service.pipeline.waits import Waits


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_wait_is_listed_while_it_lasts_and_named_by_what_most_records_wait_for() -> None:
    clock = Clock()
    waits = Waits(clock)
    assert waits.holding() is None and not waits.snapshot()
    with waits.waiting("a", "endpoint", until=130.0, detail=lambda: "breaker"):
        clock.now += 5
        with waits.waiting("b", "window", until=110.0), waits.waiting("c", "window", until=140.0):
            clock.now += 2
            assert [w.task for w in waits.snapshot()] == ["a", "b", "c"]  # the longest first
            assert waits.counts() == {"endpoint": 1, "window": 2}
            assert waits.holding() == "window: 2 waiting, the longest 2 s"
            assert not waits.overdue()
            clock.now += 10  # b should have ended by 110
            assert [w.task for w in waits.overdue()] == ["b"]
        assert waits.holding() == "endpoint (breaker): 1 waiting, the longest 17 s"
    assert len(waits) == 0


def test_a_wait_that_raises_is_gone_from_the_board() -> None:
    waits = Waits()
    try:
        with waits.waiting("a", "budget", until=None):
            raise RuntimeError("over budget")
    except RuntimeError:
        pass
    assert not waits.snapshot()
