"""The journal's decision fields: an approval at ``a:``, an operator's reconcile answer at ``o:``,
each with one meaning, and records written before ``o:`` existed read as they were."""

from __future__ import annotations

from dedup.effects import BUSY, DECISION_PREFIX, answer_of, approval_of, decision_field
from dedup.lifecycles.parked import DECISIONS


def test_the_tasks_busy_states_are_running_and_the_parked_ones() -> None:
    assert set(BUSY) == {"running", "waiting_approval", "waiting_children", "resuming"}


def test_an_approval_and_a_reconcile_answer_have_a_field_each_and_old_records_read_as_before() -> None:
    assert decision_field("approval", "file", 2) == "a:file:2"
    assert decision_field("reconcile", "file", 2) == "o:file:2"
    assert set(DECISION_PREFIX) == set(DECISIONS)
    approved, landed = {"decision": "approved"}, {"decision": "landed"}
    new = {"a:file:1": approved, "o:file:1": landed}
    assert approval_of(new, "file", 1) == approved and answer_of(new, "file", 1) == landed
    # before o: existed, the answer was stored at a:, over the approval
    old = {"a:file:1": landed}
    assert approval_of(old, "file", 1) is None and answer_of(old, "file", 1) == landed
    assert answer_of({"a:file:1": approved}, "file", 1) is None
    assert answer_of({"a:file:1": {"decision": "expired"}}, "file", 1) == {"decision": "expired"}
    assert approval_of({}, "file", 1) is None and answer_of({}, "file", 1) is None
