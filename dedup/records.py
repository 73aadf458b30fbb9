"""What the ledger answers: a claim, an attempt, a completion, a stored task and who published it.

Plain values, read from the task hash (:mod:`dedup.scripts` lists its fields). Who published a
task's outcome is two fields, read by :func:`publication`: ``published_by`` (the coordinates of
the record that published it; absent: not published) and ``published_how`` (``staged``: marked in
a transaction before the send; ``acked``: marked after the broker's acknowledgement). The previous
version kept one field, ``published`` (``'0'``, ``'1'`` or the coordinates). This version writes it
beside ``published_by`` with the same value, for the previous version's workers during a rolling
upgrade; where it differs, one of them wrote it after, so it is read in their place, its ``how``
unknown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Decision = Literal["claimed", "succeeded", "busy", "conflict", "dead", "parked", "crashed", "cancelled"]
Renewal = Literal["renewed", "done", "lost"]
PublishedHow = Literal["staged", "acked"]
HOWS: tuple[PublishedHow, ...] = ("staged", "acked")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def publication(by: Any, how: Any, legacy: Any = None) -> tuple[str | None, PublishedHow | None]:
    """``(published_by, published_how)`` from the fields ``published_by``, ``published_how`` and the
    previous version's ``published``; ``(None, None)`` when the outcome was not published."""
    old = _text(legacy)
    if old is not None and old != _text(by):  # written by the previous version after: the newer
        return (None if old in ("", "0") else old), None
    who = _text(by) or None
    said = _text(how)
    return who, (said if who is not None and said in HOWS else None)


@dataclass(frozen=True, slots=True)
class Attempt:
    step: int  # attempts of this step, this one included
    total: int  # model calls made for the task, this one included


@dataclass(frozen=True, slots=True)
class Claim:
    decision: Decision
    fence: int
    attempts: int
    lease_remaining_ms: int
    # who published the outcome: the coordinates of the record that did (None: not published)
    published_by: str | None
    # how: 'staged' in a transaction before the send, 'acked' after the broker's ack (None: not
    # published, or marked by the previous version, which did not say)
    published_how: PublishedHow | None = None

    @property
    def published(self) -> bool:
        return self.published_by is not None


@dataclass(frozen=True, slots=True)
class Completion:
    status: Literal["ok", "stale", "already"]
    fence: int
    digest: str
    marked: bool = False  # published (staged) by the record named with the result, in the same script


@dataclass(slots=True)
class TaskRecord:
    task_key: str
    state: str
    fence: int
    attempts: int
    fingerprint: str
    fields: dict[str, str]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, task_key: str, fields: Mapping[str, str], steps: dict[str, dict[str, Any]]) -> TaskRecord:
        return cls(task_key=task_key, state=fields.get("state", ""), fence=int(fields.get("fence", "0")),
                   attempts=int(fields.get("attempts", "0")), fingerprint=fields.get("fingerprint", ""),
                   fields=dict(fields), steps=steps)

    @property
    def event(self) -> bytes | None:
        value = self.fields.get("event")
        return value.encode() if value is not None else None

    @property
    def published_by(self) -> str | None:
        """The coordinates of the record that published the outcome (None: not published)."""
        return self._publication[0]

    @property
    def published_how(self) -> PublishedHow | None:
        """``staged`` (in a transaction, before the send) or ``acked`` (after the broker's ack)."""
        return self._publication[1]

    @property
    def published(self) -> bool:
        """Whether the outcome reached its topic (or, in a transaction, was staged for it)."""
        return self.published_by is not None

    @property
    def _publication(self) -> tuple[str | None, PublishedHow | None]:
        f = self.fields
        return publication(f.get("published_by"), f.get("published_how"), f.get("published"))

    def to_json(self) -> dict[str, Any]:
        f = self.fields
        result = f.get("result")
        by, how = self._publication
        return {
            "task_id": self.task_key,
            "state": self.state,
            "kind": f.get("kind"),
            "fence": self.fence,
            "attempts": self.attempts,
            "claims": int(f.get("claims", "0")),
            "deaths": int(f.get("deaths", "0")),
            "fingerprint": self.fingerprint,
            "owner": f.get("owner"),
            "lease_until_ms": int(f["lease_until"]) if f.get("lease_until") else None,
            "result": json.loads(result) if result is not None else None,
            "result_digest": f.get("result_digest"),
            "model": f.get("model"),
            "prompt_version": f.get("prompt_version"),
            "published": by is not None,
            "published_by": by,
            "published_how": how,
            "error": f.get("error"),
            "dead_reason": f.get("dead_reason"),
            "created_at_ms": int(f["created_at"]) if f.get("created_at") else None,
            "completed_at_ms": int(f["completed_at"]) if f.get("completed_at") else None,
            "steps": self.steps,
            "generation": int(f.get("generation", "1")),
            "waiting": json.loads(f["waiting"]) if f.get("waiting") else None,
        }
