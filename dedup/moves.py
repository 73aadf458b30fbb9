"""A lifecycle table's moves as the ledger's scripts take them: per event, the states it may start
from and the state it leads to."""

from __future__ import annotations

from dedup.lifecycles.machine import Lifecycle

__all__ = ["Moves"]


class Moves:
    """A moving script's arguments, read from a lifecycle table once: for an event, the states it
    may start from (space-joined) and the state it leads to (``''`` for an event that leaves the
    state as it is, ``publish``). An event the table does not list starts from no state: refused."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self._args: dict[str, tuple[str, str]] = {}
        for event in lifecycle.events:
            targets = {t.target for t in lifecycle.transitions if t.event == event}
            self._args[event] = (" ".join(lifecycle.sources(event)), targets.pop() if len(targets) == 1 else "")

    def __call__(self, *events: str) -> list[str]:
        return [arg for event in events for arg in self._args.get(event, ("", ""))]

    def sources(self, event: str) -> str:
        return self._args.get(event, ("", ""))[0]
