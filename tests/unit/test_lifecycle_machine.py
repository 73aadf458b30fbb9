"""The lifecycle table itself: what it moves, what it refuses, what it refuses to be built from, and
how it is drawn."""

from __future__ import annotations

import pytest

from dedup.lifecycles import IllegalTransition, Lifecycle, Transition

DOOR = Lifecycle(
    name="door",
    initial="new",
    states={"shut": "closed", "open": "open", "gone": "taken off its hinges"},
    transitions=(
        Transition("new", "hang", "shut"),
        Transition("shut", "open", "open", "unlocked"),
        Transition("open", "shut", "shut"),
        Transition("shut", "remove", "gone"),
        Transition("open", "remove", "gone"),
    ),
    final=frozenset({"gone"}),
)


def test_a_listed_move_is_made() -> None:
    assert DOOR.move("shut", "open") == "open"
    assert DOOR.transition("shut", "open").guard == "unlocked"
    assert DOOR.allows("open", "shut") and not DOOR.allows("open", "open")
    assert DOOR.walk(["hang", "open", "shut", "remove"]) == "gone"
    assert DOOR.walk(["shut"], start="open") == "shut"


def test_a_move_the_table_does_not_list_is_refused() -> None:
    with pytest.raises(IllegalTransition) as refused:
        DOOR.move("gone", "open")
    assert (refused.value.lifecycle, refused.value.source, refused.value.event) == ("door", "gone", "open")
    assert "no transition on 'open' from 'gone'" in str(refused.value)
    with pytest.raises(IllegalTransition):
        DOOR.walk(["hang", "shut"])
    with pytest.raises(IllegalTransition):
        DOOR.sources("paint")


def test_sources_and_targets_of_an_event() -> None:
    assert DOOR.sources("remove") == ("shut", "open")
    assert DOOR.sources("hang") == ("new",)
    assert DOOR.target("remove") == "gone"
    assert DOOR.events == ("hang", "open", "shut", "remove")
    two = Lifecycle("two", "new", {"a": "", "b": ""}, (Transition("new", "go", "a"), Transition("a", "go", "b")))
    with pytest.raises(ValueError, match="not one state"):
        two.target("go")


@pytest.mark.parametrize(("transitions", "final", "why"), [
    ((Transition("new", "go", "x"),), frozenset(), "unknown state 'x'"),
    ((Transition("new", "go", "a"), Transition("new", "go", "b")), frozenset(), "two transitions on 'go'"),
    ((Transition("new", "go", "a"), Transition("a", "on", "b")), frozenset({"a"}), "final state 'a'"),
    ((Transition("new", "go", "a"),), frozenset(), r"no transition reaches \['b'\]"),
])
def test_a_table_that_contradicts_itself_is_refused(transitions: tuple[Transition, ...], final: frozenset[str],
                                                    why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Lifecycle("bad", "new", {"a": "", "b": ""}, transitions, final)


def test_the_table_is_drawn_as_the_docs_show_it() -> None:
    assert DOOR.mermaid().splitlines() == [
        "stateDiagram-v2",
        "    [*] --> shut: hang",
        "    shut --> open: open [unlocked]",
        "    open --> shut: shut",
        "    shut --> gone: remove",
        "    open --> gone: remove",
        "    gone --> [*]",
    ]
    rows = DOOR.table().splitlines()
    assert rows[:2] == ["| from | event | guard | to |", "|---|---|---|---|"]
    assert rows[3] == "| shut | `open` | unlocked | open |"
    assert len(rows) == 2 + len(DOOR.transitions)
