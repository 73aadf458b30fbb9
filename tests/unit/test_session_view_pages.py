"""The API's and the console's view of a session counts turns from the first turn ever, also when the
oldest, summarised ones were dropped from the store (``SessionRecord.first_turn``)."""

from __future__ import annotations

from dedup.sessions import SessionRecord, Summary
from service.api.sessions import session_view


def _record(first_turn: int, stored: int) -> SessionRecord:
    turns = [{"task_id": f"t{first_turn + i}", "input": {}, "result": {}, "at": "2026-01-01T00:00:00Z"}
             for i in range(stored)]
    return SessionRecord(id="s", kind="chat", version=9, state=None, summary=Summary(upto=first_turn + 1, text="so far"),
                         turns=turns, holder=None, holder_fence=0, holder_until_ms=0, queue=[], ttl_s=60,
                         first_turn=first_turn)


def test_turn_numbers_are_absolute_when_the_oldest_were_dropped() -> None:
    record = _record(first_turn=1000, stored=5)
    whole = session_view(record)
    assert (whole.turns_total, whole.turns_first, whole.turns_offset) == (1005, 1000, 1000)
    assert [t["task_id"] for t in whole.turns] == [f"t{n}" for n in range(1000, 1005)]
    page = session_view(record, 1002, 2)
    assert (page.turns_offset, [t["task_id"] for t in page.turns]) == (1002, ["t1002", "t1003"])
    before = session_view(record, 10, 2)  # a page before the first stored turn starts at it
    assert (before.turns_offset, [t["task_id"] for t in before.turns]) == (1000, ["t1000", "t1001"])
    assert session_view(record, 2000, 2).turns == []


def test_nothing_dropped_counts_from_zero() -> None:
    page = session_view(_record(first_turn=0, stored=3), 1, 5)
    assert (page.turns_total, page.turns_first, page.turns_offset, len(page.turns)) == (3, 0, 1, 2)
