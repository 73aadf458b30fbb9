"""Attempts a claim counted with it (:data:`dedup.scripts.CLAIM_ATTEMPT`) that no call took yet.

Most tasks claim, then call the model for their one step at once: the claim counts that call's
attempt in the same script, and the step's first :meth:`~dedup.ledger.Ledger.begin_attempt` takes
it here instead of asking Redis again. The attempt is counted under the claim's new fence, open
until its outcome is known, exactly as a separate count right after the claim would be: a holder
that dies before its outcome is known has it given back by the claim that takes the task over.

One is taken only by the same task, fence and step, and only while the claim's own lease surely
holds (younger than a lease renewal, a third of the lease): an older one is given back and the
attempt counted anew, so a holder that lost its fence meanwhile is refused as before. One no call
takes (the task ended or parked before its call, or its step re-used from the journal) is given
back when the task's run ends (:meth:`~dedup.ledger.Ledger.give_back_first_attempt`).

In-process bookkeeping only: nothing here is shared between workers; the counts are Redis's.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic

__all__ = ["FirstAttempts", "Kept"]


@dataclass(frozen=True, slots=True)
class Kept:
    step: str
    step_attempts: int  # -2: the step had used all of its attempts (nothing counted)
    total: int
    at: float  # monotonic seconds


class FirstAttempts:
    def __init__(self, lease_ms: int) -> None:
        self.max_age_s = lease_ms / 3000
        self._kept: dict[tuple[str, int], Kept] = {}

    def keep(self, task_key: str, fence: int, step: str, step_attempts: int, total: int) -> None:
        self._kept[(task_key, fence)] = Kept(step, step_attempts, total, monotonic())

    def take(self, task_key: str, fence: int, step: str) -> Kept | None:
        """The attempt the claim counted for ``step`` under ``fence``; None when there is none for it."""
        kept = self._kept.get((task_key, fence))
        if kept is None or kept.step != step:
            return None
        del self._kept[(task_key, fence)]
        return kept

    def fresh(self, kept: Kept) -> bool:
        """Whether the claim that counted ``kept`` surely still holds its lease."""
        return monotonic() - kept.at <= self.max_age_s

    def drop(self, task_key: str, fence: int) -> Kept | None:
        """Forget the attempt kept for the task under ``fence``; returned when one was counted."""
        kept = self._kept.pop((task_key, fence), None)
        return kept if kept is not None and kept.step_attempts > 0 else None

    def __len__(self) -> int:
        return len(self._kept)
