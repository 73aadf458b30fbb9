"""The tables of a tool call and of a parked task: every move they list, the moves they refuse, and
what the code reads from them (the decisions a wait accepts, the ledger's states a script compares)."""

from __future__ import annotations

import itertools

import pytest

from dedup.lifecycles import IllegalTransition, Lifecycle
from dedup.lifecycles.parked import DECISIONS, LEDGER_STATE, PARKED, WAITING, ledger_states, parked_state
from dedup.lifecycles.tool_call import OUTCOME_EVENT, TOOL_CALL, call_state


@pytest.mark.parametrize("machine", [TOOL_CALL, PARKED], ids=lambda m: m.name)
def test_every_listed_move_is_made_and_every_other_is_refused(machine: Lifecycle) -> None:
    listed = {(t.source, t.event): t.target for t in machine.transitions}
    for source, event in itertools.product([machine.initial, *machine.states], machine.events):
        if (source, event) in listed:
            assert machine.move(source, event) == listed[(source, event)]
        else:
            with pytest.raises(IllegalTransition):
                machine.move(source, event)


def test_a_tool_calls_paths() -> None:
    assert TOOL_CALL.walk(["ask", "intend", "run", "undo"]) == "undone"
    assert TOOL_CALL.walk(["ask", "refuse"]) == "refused"
    assert TOOL_CALL.walk(["ask", "intend", "refuse"]) == "refused"
    assert TOOL_CALL.walk(["ask", "intend", "fail", "absent", "run"]) == "executed"
    assert TOOL_CALL.walk(["ask", "intend", "recover", "land", "undo"]) == "undone"
    for illegal in (["ask", "run"], ["ask", "intend", "land"], ["ask", "refuse", "undo"],
                    ["ask", "intend", "run", "run"], ["ask", "intend", "run", "undo", "undo"]):
        with pytest.raises(IllegalTransition):
            TOOL_CALL.walk(illegal)


def test_a_calls_state_is_read_from_its_journal_record() -> None:
    assert call_state(None) == "asked"
    assert call_state({"state": "intent"}) == "intended"
    assert call_state({"state": "invalid"}) == call_state({"state": "limit"}) == "refused"
    assert call_state({"state": "done", "outcome": "refused"}) == "refused"
    assert call_state({"state": "done", "outcome": "executed"}) == "executed"
    assert call_state({"state": "done", "outcome": "reconciled_landed"}) == "reconciled"
    assert call_state({"state": "done", "outcome": "executed"}, {"state": "done"}) == "undone"
    assert call_state({"state": "done", "outcome": "executed"}, {"state": "intent"}) == "executed"
    with pytest.raises(ValueError):
        call_state({"state": "done", "outcome": "teleported"})
    assert set(OUTCOME_EVENT.values()) <= set(TOOL_CALL.events)


def test_a_parked_tasks_paths() -> None:
    assert PARKED.walk(["park_approval", "approved", "resume", "resume"]) == "resuming"
    assert PARKED.walk(["park_reconcile", "absent", "resume"]) == "resuming"
    assert PARKED.walk(["park_reconcile", "expired", "resume"]) == "resuming"
    assert PARKED.walk(["rerun", "resume"]) == "resuming"
    assert PARKED.walk(["park_children", "children_ended", "resume", "resume"]) == "resuming"
    assert PARKED.walk(["park_children", "expired", "resume"]) == "resuming"
    for illegal in (["park_approval", "landed"], ["park_reconcile", "approved"], ["park_approval", "resume"],
                    ["park_approval", "approved", "rejected"], ["approved"], ["park_approval", "park_reconcile"],
                    ["park_children", "approved"], ["park_children", "landed"], ["park_approval", "children_ended"],
                    ["park_children", "resume"], ["children_ended"], ["park_children", "children_ended",
                                                                       "children_ended"]):
        with pytest.raises(IllegalTransition):
            PARKED.walk(illegal)


def test_the_decisions_a_wait_accepts_come_from_the_table() -> None:
    assert DECISIONS == {"approval": ("approved", "rejected", "expired"), "reconcile": ("landed", "absent", "expired"),
                         "children": ("children_ended", "expired"),
                         "batch": ("batch_done", "batch_failed", "expired")}
    assert set(WAITING.values()) == {"waiting_approval", "waiting_reconcile", "waiting_children", "waiting_batch"}


def test_the_ledgers_states_of_the_parked_states() -> None:
    assert set(LEDGER_STATE) == set(PARKED.states)
    assert ledger_states(PARKED.sources("expired")) == ("waiting_approval", "waiting_children")
    assert ledger_states(PARKED.sources("children_ended")) == ("waiting_children",)
    assert parked_state("waiting_children") == parked_state("waiting_children", "children") == "waiting_children"
    assert LEDGER_STATE[PARKED.target("approved")] == "resuming"
    assert parked_state("waiting_approval", "reconcile") == "waiting_reconcile"
    assert parked_state("waiting_approval", "batch") == "waiting_batch"
    assert parked_state("waiting_approval") == "waiting_approval"
    assert parked_state("resuming", listed=True) == "decided"
    assert parked_state("resuming") == "resuming"
    assert parked_state("running") is None and parked_state("succeeded") is None


def test_the_parked_moves_agree_with_the_tasks_table() -> None:
    """The ledger's side of a parked task's moves is the task's: park, park_children, decide,
    children_ended, rerun (a resumption leaves the ledger's state as it is)."""
    from dedup.lifecycles.task import TASK

    task_event = {"park_approval": "park", "park_reconcile": "park", "park_batch": "park",
                  "park_children": "park_children", "batch_done": "decide", "batch_failed": "decide",
                  "children_ended": "children_ended", "rerun": "rerun",
                  **{d: "decide" for d in ("approved", "rejected", "landed", "absent", "expired")}}
    for t in PARKED.transitions:
        if t.event == "resume":
            assert LEDGER_STATE[t.source] == LEDGER_STATE[t.target]
            continue
        target = LEDGER_STATE[t.target]
        if t.source == PARKED.initial:  # from the task's own life: parked by its holder, or compensated
            assert target == TASK.target(task_event[t.event])
        else:
            assert TASK.move(LEDGER_STATE[t.source], task_event[t.event]) == target, t
    for what, waiting in WAITING.items():
        assert LEDGER_STATE[PARKED.move(PARKED.initial, f"park_{what}")] in TASK.sources("decide")
        assert set(ledger_states([waiting])) <= set(TASK.sources("decide"))
    assert TASK.allows(LEDGER_STATE["resuming"], "claim")
