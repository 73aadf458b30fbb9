"""The life of a window slot: every move the table :data:`service.llm.slots.SLOT` lists is made by the
holder the table names, and a move the table does not list is refused.

The two moves that end in Redis (``held --settle--> returned``, a call's outcome told at once, and
``held --expire--> returned``, a lease running out) are walked by tests/integration/test_window.py.
"""

from __future__ import annotations

import pytest

from dedup.lifecycles.machine import IllegalTransition
from service.llm.slots import SLOT, Batch, KeptSlots, Slot

REDIS_MOVES = {("held", "settle"), ("held", "expire")}
LEASE_MS = 60_000


def slot(name: str, granted_at: float = 100.0) -> Slot:
    return Slot(name, 0, granted_at)


class Walk:
    """Checks each observed move against the table and remembers it."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def moved(self, source: str, event: str, target: str) -> None:
        assert SLOT.move(source, event) == target
        self.seen.add((source, event))


def test_every_transition_of_the_table_is_made_by_its_holder() -> None:
    walk = Walk()

    # asked -> granted -> held: the batch holds what Redis granted until its caller takes it
    batch = Batch()
    batch.join()
    assert batch.answer([slot("a")]) == []
    assert [s.id for s in batch.slots] == ["a"]
    walk.moved("asked", "grant", "granted")
    taken = batch.take()
    assert taken is not None and taken.id == "a" and not batch.slots
    walk.moved("granted", "take", "held")

    # granted -> kept: the caller of a granted slot was cancelled, before or after the answer
    kept = KeptSlots()
    batch = Batch()
    batch.join()
    batch.join()
    assert batch.leave() is None  # cancelled before the answer: no longer counted
    orphans = batch.answer([slot("b"), slot("c")])
    assert [s.id for s in orphans] == ["c"]
    assert kept.keep(orphans, now=100.0)
    walk.moved("granted", "orphan", "kept")
    late = batch.leave()  # cancelled after the answer: the slot it would have taken
    assert late is not None and late.id == "b"

    # held -> kept after an answer; kept -> held for the next call
    assert kept.keep([slot("d")], now=100.0)
    walk.moved("held", "answer", "kept")
    reused, aged = kept.reuse(now=100.0, young_ms=LEASE_MS / 2)
    assert reused is not None and reused.id == "d" and not aged
    walk.moved("kept", "reuse", "held")

    # kept -> stale: a lease half gone when a call would take it; a cut
    reused, aged = kept.reuse(now=100.0 + LEASE_MS / 1000, young_ms=LEASE_MS / 2)
    assert reused is None and aged  # "c", granted at 100.0, is too old at 160.0
    walk.moved("kept", "age", "stale")
    assert kept.keep([slot("e")], now=101.0)
    assert kept.cut()
    walk.moved("kept", "cut", "stale")
    assert not kept.cut()  # nothing kept any more

    # stale -> returned at the next settle; kept -> returned once kept idle_s without a call
    assert kept.keep([slot("f")], now=102.0)
    assert kept.keep([slot("g")], now=103.0)
    assert kept.hand_back(cutoff=102.0) == ["c", "e", "f"]
    walk.moved("stale", "settle", "returned")
    walk.moved("kept", "linger", "returned")
    assert kept.pending  # "g" is younger than the cutoff
    assert kept.hand_back(cutoff=103.0) == ["g"]
    assert not kept.pending

    # after the window closed, a slot given back or orphaned goes to the closing settle
    kept.close()
    assert not kept.keep([slot("h")], now=104.0)
    walk.moved("held", "close", "stale")
    assert not kept.keep([slot("i")], now=104.0)
    walk.moved("granted", "close", "stale")
    assert kept.hand_back(cutoff=0.0) == ["h", "i"]

    every = {(t.source, t.event) for t in SLOT.transitions}
    assert walk.seen == every - REDIS_MOVES


def test_a_failed_batch_gives_its_error_to_every_caller() -> None:
    batch = Batch()
    batch.join()
    batch.fail(ConnectionError("down"))
    with pytest.raises(ConnectionError):
        batch.take()


@pytest.mark.parametrize(("source", "event"), [
    ("stale", "reuse"),  # a stale slot is never lent again
    ("granted", "answer"),  # a slot no call held has no answer
    ("kept", "take"),
    ("returned", "reuse"),
    ("asked", "take"),
])
def test_a_move_the_table_does_not_list_is_refused(source: str, event: str) -> None:
    with pytest.raises(IllegalTransition):
        SLOT.move(source, event)
