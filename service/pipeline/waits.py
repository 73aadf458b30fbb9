"""Every record of this process that waits, why, since when and until when: one place to ask.

The waits of the pipeline are spread over its stages (a tenant's budget, the endpoint's breaker and
Retry-After, the rate limits, the fleet's window, the back-off between attempts, a call the endpoint
refused); each registers here while it lasts, with the time it ends by (``AGENT_LLM__MAX_WAIT_S`` or
the task's deadline, whichever comes first; see docs/RELIABILITY.md, "Liveness"). A stall names what
holds the work from here (``/readyz``), operators list it (``GET /waiting``), and a test can check
that no wait outlives its end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic

WHY = ("budget", "endpoint", "window", "refused", "backoff")  # the kinds of wait, a bounded label


@dataclass(slots=True)
class Waiting:
    task: str
    why: str  # one of WHY
    since: float  # monotonic
    until: float | None  # monotonic: the wait ends by then (an outcome), None for none of its own
    detail: Callable[[], str | None] | None = None  # what it waits for now (the breaker, Retry-After, ...)

    def describe(self) -> str:
        detail = self.detail() if self.detail is not None else None
        return f"{self.why} ({detail})" if detail else self.why


class Waits:
    """See the module docstring."""

    def __init__(self, clock: Callable[[], float] = monotonic) -> None:
        self.clock = clock
        self._waiting: dict[int, Waiting] = {}  # by the id of the registration that holds it

    def waiting(self, task: str, why: str, until: float | None = None,
                detail: Callable[[], str | None] | None = None) -> _Registered:
        """Register the wait of ``task`` for as long as the ``with`` block runs (a plain object, not a
        generator: it sits on every model call's path)."""
        return _Registered(self._waiting, Waiting(task, why, self.clock(), until, detail))

    def snapshot(self) -> list[Waiting]:
        """The waits now, the longest first."""
        return sorted(self._waiting.values(), key=lambda w: w.since)

    def __len__(self) -> int:
        return len(self._waiting)

    def counts(self) -> Counter[str]:
        return Counter(w.why for w in self._waiting.values())

    def overdue(self, slack_s: float = 0.0) -> list[Waiting]:
        """Waits past the time they should have ended by (none, unless a mechanism lost its deadline)."""
        now = self.clock()
        return [w for w in self._waiting.values() if w.until is not None and now > w.until + slack_s]

    def holding(self) -> str | None:
        """What most records wait for now, with how many wait and the longest wait (None: none wait)."""
        waits = self.snapshot()
        if not waits:
            return None
        why, n = self.counts().most_common(1)[0]
        oldest = next(w for w in waits if w.why == why)
        return f"{oldest.describe()}: {n} waiting, the longest {self.clock() - oldest.since:.0f} s"


class _Registered:
    __slots__ = ("_board", "_entry")

    def __init__(self, board: dict[int, Waiting], entry: Waiting) -> None:
        self._board, self._entry = board, entry

    def __enter__(self) -> Waiting:
        self._board[id(self)] = self._entry
        return self._entry

    def __exit__(self, *exc: object) -> None:
        del self._board[id(self)]
