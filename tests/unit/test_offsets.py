"""The offset tracker commits only contiguous prefixes of finished records, in any finish order."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.offsets import OffsetTracker


@st.composite
def offsets_and_order(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    gaps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=60))
    start = draw(st.integers(0, 1000))
    offsets, o = [], start
    for g in gaps:
        offsets.append(o)
        o += g  # compaction and transaction markers leave gaps
    order = draw(st.permutations(offsets))
    return offsets, list(order)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offsets_and_order())
def test_commit_is_always_the_first_unfinished_offset(case: tuple[list[int], list[int]]) -> None:
    offsets, order = case
    tracker = OffsetTracker()
    for o in offsets:
        tracker.add(o)
    finished: set[int] = set()
    last_commit = -1
    for o in order:
        tracker.finish(o)
        finished.add(o)
        unfinished = [x for x in offsets if x not in finished]
        expected = unfinished[0] if unfinished else offsets[-1] + 1
        got = tracker.committable()
        assert got == expected
        assert all(x in finished for x in offsets if x < got)  # everything below is durable
        assert got >= last_commit  # never moves backwards
        last_commit = got
    assert len(tracker) == 0


def test_take_commit_offers_a_position_until_it_is_confirmed() -> None:
    t = OffsetTracker()
    assert t.take_commit() is None
    t.add(5)
    t.add(6)
    assert t.take_commit() == 5
    assert t.take_commit() == 5  # not confirmed yet (the commit may have failed): offered again
    t.committed(5)
    assert t.last_committed == 5
    assert t.take_commit() is None
    t.finish(6)
    assert t.take_commit() is None
    t.finish(5)
    assert t.take_commit() == 7
    t.committed(7)
    assert t.take_commit() is None


def test_a_failed_commit_is_offered_again_and_a_stale_confirm_never_moves_back() -> None:
    t = OffsetTracker()
    t.add(0)
    t.finish(0)
    offset = t.take_commit()
    assert offset == 1
    # the commit failed: no confirm; more records finish meanwhile
    t.add(1)
    t.finish(1)
    assert t.take_commit() == 2
    t.committed(2)
    t.committed(1)  # a late confirm of an older commit
    assert t.last_committed == 2
    assert t.take_commit() is None


def test_offsets_out_of_order_are_refused() -> None:
    t = OffsetTracker()
    t.add(10)
    with pytest.raises(ValueError):
        t.add(9)
    t.finish(10)
    with pytest.raises(ValueError):
        t.add(3)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, 3), st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_a_record_finished_as_it_arrives_moves_the_mark_as_adding_and_finishing_it_would(
        steps: list[tuple[int, bool, bool]]) -> None:
    """Screened records (finished on arrival) between records that run, some finishing at once:
    ``add_finished`` leaves the tracker where ``add`` then ``finish`` would, at every step."""
    fast, slow = OffsetTracker(), OffsetTracker()
    running: list[int] = []
    offset = 0
    for gap, screened, finish_one in steps:
        offset += gap
        if screened:
            fast.add_finished(offset)
            slow.add(offset)
            slow.finish(offset)
        else:
            fast.add(offset)
            slow.add(offset)
            running.append(offset)
        if finish_one and running:
            o = running.pop(0)
            fast.finish(o)
            slow.finish(o)
        assert (fast.committable(), len(fast)) == (slow.committable(), len(slow))
    with pytest.raises(ValueError):
        fast.add_finished(offset)  # not twice, nor below what it passed
