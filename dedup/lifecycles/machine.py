"""A lifecycle as data: its states, the events that move it, and the guard of each move.

The table is the one description of a lifecycle. The code that moves a state asks it which move an
event makes (:meth:`Lifecycle.move`), or which states an event may start from
(:meth:`Lifecycle.sources`, handed to the Lua scripts that move a state atomically), so a move the
table does not list is refused, not made; and the docs draw the same table
(:meth:`Lifecycle.mermaid`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class IllegalTransition(ValueError):
    """An event that the lifecycle does not allow from the given state."""

    def __init__(self, lifecycle: str, source: str, event: str) -> None:
        super().__init__(f"{lifecycle}: no transition on {event!r} from {source!r}")
        self.lifecycle = lifecycle
        self.source = source
        self.event = event


@dataclass(frozen=True)
class Transition:
    """``event`` moves ``source`` to ``target`` when ``guard`` holds (a sentence, as the code checks it)."""

    source: str
    event: str
    target: str
    guard: str = ""


@dataclass(frozen=True)
class Lifecycle:
    """States (name -> meaning), the initial pseudo-state, the final states and the transitions.

    ``(source, event)`` names at most one transition: two moves on one event from one state are
    two events (their guards tell them apart).
    """

    name: str
    initial: str
    states: Mapping[str, str]
    transitions: tuple[Transition, ...]
    final: frozenset[str] = frozenset()
    _index: dict[tuple[str, str], Transition] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], Transition] = {}
        for t in self.transitions:
            for state in (t.source, t.target):
                if state != self.initial and state not in self.states:
                    raise ValueError(f"{self.name}: transition {t} names an unknown state {state!r}")
            if (t.source, t.event) in index:
                raise ValueError(f"{self.name}: two transitions on {t.event!r} from {t.source!r}")
            if t.source in self.final:
                raise ValueError(f"{self.name}: final state {t.source!r} has a transition out")
            index[(t.source, t.event)] = t
        object.__setattr__(self, "_index", index)
        unreachable = set(self.states) - {t.target for t in self.transitions}
        if unreachable:
            raise ValueError(f"{self.name}: no transition reaches {sorted(unreachable)}")

    @property
    def events(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.event for t in self.transitions))

    def allows(self, source: str, event: str) -> bool:
        return (source, event) in self._index

    def transition(self, source: str, event: str) -> Transition:
        """The transition ``event`` makes from ``source``; :class:`IllegalTransition` when none."""
        try:
            return self._index[(source, event)]
        except KeyError:
            raise IllegalTransition(self.name, source, event) from None

    def move(self, source: str, event: str) -> str:
        """The state ``event`` moves ``source`` to; :class:`IllegalTransition` when the table has no such move."""
        return self.transition(source, event).target

    def sources(self, event: str) -> tuple[str, ...]:
        """The states ``event`` may start from, in table order."""
        found = tuple(t.source for t in self.transitions if t.event == event)
        if not found:
            raise IllegalTransition(self.name, "*", event)
        return found

    def target(self, event: str) -> str:
        """The one state ``event`` leads to (``ValueError`` when the event leads to several)."""
        targets = {t.target for t in self.transitions if t.event == event}
        if len(targets) != 1:
            raise ValueError(f"{self.name}: {event!r} leads to {sorted(targets)}, not one state")
        return targets.pop()

    def walk(self, events: Iterable[str], start: str | None = None) -> str:
        """The state after ``events`` from ``start`` (the initial pseudo-state by default)."""
        state = self.initial if start is None else start
        for event in events:
            state = self.move(state, event)
        return state

    def mermaid(self) -> str:
        """The table as a Mermaid state diagram (what docs/ARCHITECTURE.md shows)."""
        lines = ["stateDiagram-v2"]
        for t in self.transitions:
            source = "[*]" if t.source == self.initial else t.source
            label = f"{t.event} [{t.guard}]" if t.guard else t.event
            label = label.replace(";", ",")  # Mermaid reads a semicolon as the end of a statement
            lines.append(f"    {source} --> {t.target}: {label}")
        lines.extend(f"    {state} --> [*]" for state in sorted(self.final))
        return "\n".join(lines)

    def table(self) -> str:
        """The table as Markdown rows: from, event, guard, to."""
        rows = ["| from | event | guard | to |", "|---|---|---|---|"]
        rows.extend(f"| {t.source} | `{t.event}` | {t.guard or ''} | {t.target} |" for t in self.transitions)
        return "\n".join(rows)
