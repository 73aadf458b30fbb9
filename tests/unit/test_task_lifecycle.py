"""The table of a task in the ledger: every move it lists, every move it refuses, and that the
ledger's scripts take their moves from it (no script names a state it moves a task to)."""

from __future__ import annotations

import itertools

import pytest

from dedup import children_scripts, scripts
from dedup.ledger import Moves
from dedup.lifecycles import IllegalTransition
from dedup.lifecycles.task import DEAD, FAILED, NEW, PARKED, RESUMING, RUNNING, SUCCEEDED, TASK, WAITING_CHILDREN


def test_every_listed_move_is_made_and_every_other_is_refused() -> None:
    listed = {(t.source, t.event): t.target for t in TASK.transitions}
    for source, event in itertools.product([TASK.initial, *TASK.states], TASK.events):
        if (source, event) in listed:
            assert TASK.move(source, event) == listed[(source, event)]
        else:
            with pytest.raises(IllegalTransition):
                TASK.move(source, event)


def test_a_tasks_paths() -> None:
    assert TASK.walk(["claim", "complete", "publish"]) == SUCCEEDED
    assert TASK.walk(["claim", "take_over", "fail", "claim", "die", "publish", "revive", "claim"]) == RUNNING
    assert TASK.walk(["claim", "park", "decide", "claim", "complete", "rerun", "claim"]) == RUNNING
    assert TASK.walk(["claim", "take_over", "crash"]) == DEAD
    assert TASK.walk(["claim", "expire", "rerun"]) == RESUMING
    assert TASK.walk(["claim", "park_children", "children_ended", "claim", "park_children", "decide"]) == RESUMING
    assert TASK.walk(["cancel", "publish", "revive", "claim"]) == RUNNING
    for illegal in (["complete"], ["claim", "complete", "complete"], ["claim", "die", "complete"],
                    ["claim", "complete", "park"], ["claim", "park", "claim"], ["claim", "publish"],
                    ["claim", "fail", "revive"], ["claim", "complete", "revive"], ["claim", "park", "rerun"],
                    ["claim", "park_children", "claim"], ["claim", "park_children", "rerun"],
                    ["claim", "park", "children_ended"], ["claim", "children_ended"], ["claim", "cancel"],
                    ["cancel", "claim"], ["claim", "park_children", "park_children"], ["claim", "fail", "cancel"]):
        with pytest.raises(IllegalTransition):
            TASK.walk(illegal)


def test_the_states_are_the_ledgers_and_none_is_final() -> None:
    assert TASK.initial == NEW
    assert set(TASK.states) == {RUNNING, PARKED, WAITING_CHILDREN, RESUMING, SUCCEEDED, FAILED, DEAD}
    assert PARKED == "waiting_approval"  # the value the hash's state field holds
    assert WAITING_CHILDREN == "waiting_children"
    assert not TASK.final  # a compensated task runs again, a dead one is revived
    # who published is no state: publishing leaves the state as it is, from a done state only
    assert {(t.source, t.target) for t in TASK.transitions if t.event == "publish"} == {
        (SUCCEEDED, SUCCEEDED), (DEAD, DEAD)}


def test_the_scripts_arguments_are_read_from_the_table() -> None:
    moves = Moves(TASK)
    assert moves("claim") == ["new failed resuming", RUNNING]
    assert moves("take_over", "crash") == [RUNNING, RUNNING, RUNNING, DEAD]
    assert moves("fail") == [RUNNING, FAILED] and moves("die") == [RUNNING, DEAD]
    assert moves("publish") == ["succeeded dead", ""] and moves.sources("publish") == "succeeded dead"
    assert moves("revive") == [DEAD, FAILED]
    assert moves("cancel") == [NEW, DEAD]  # the claim of a task without a hash, marked cancelled
    assert moves("park_children", "children_ended") == [RUNNING, WAITING_CHILDREN, WAITING_CHILDREN, RESUMING]
    assert moves.sources("decide") == f"{PARKED} {WAITING_CHILDREN}"
    assert moves("no such event") == ["", ""]  # starts from no state: refused by the script


@pytest.mark.parametrize("name", ["CLAIM", "EXPIRE", "COMPLETE", "FAIL", "MARK", "REVIVE", "FINISHED",
                                  "children.PLAN", "children.PARK", "children.FOLD"])
def test_no_moving_script_names_a_state_it_moves_from_or_to(name: str) -> None:
    module, _, script = name.rpartition(".")
    lua = getattr(children_scripts if module else scripts, script)
    for state in (NEW, RUNNING, SUCCEEDED, FAILED, DEAD, PARKED, WAITING_CHILDREN, RESUMING):
        assert f"'{state}'" not in lua, f"{name} names {state}: it must take it from TASK"
    assert "among(" in lua or "among_set(" in lua  # the states come in as an argument
