"""``AGENT_SESSIONS__*``: how a task of a session waits for its turn (docs/SESSIONS.md, "In the pipeline").

A model of its own beside :mod:`service.core.settings` (which includes it as ``Settings.sessions``)."""

from __future__ import annotations

from typing import Protocol, Self, TypeVar

from pydantic import BaseModel, Field, model_validator


class SessionsSettings(BaseModel):
    """``poll_s``: how often a waiting task asks again whether it is the session's head;
    ``max_wait_s``: the longest it waits (or its deadline, if sooner), then dead letter
    ``session_busy``; ``stall_s``: a free session whose head does not come for this long passes the
    head over (dedup.sessions). ``stall_s`` must be longer than ``poll_s`` (a waiter would pass a
    live head between two of its polls) and than the ledger's lease (checked by ``Settings``: a
    holder's redelivery waits out its old lease before it enters again: :func:`stall_outlasts_lease`)."""

    poll_s: float = Field(0.5, gt=0, le=60)
    max_wait_s: float = Field(300.0, gt=0, le=86_400)
    stall_s: float = Field(120.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _stall_outlasts_a_poll(self) -> Self:
        if self.stall_s <= self.poll_s:
            raise ValueError(f"sessions.stall_s={self.stall_s} must be longer than sessions.poll_s={self.poll_s}: "
                             "a waiter would pass over a live head between two of its polls")
        return self


class _Leased(Protocol):
    @property
    def lease_ms(self) -> int: ...


class _WithSessions(Protocol):
    @property
    def sessions(self) -> SessionsSettings: ...

    @property
    def ledger(self) -> _Leased: ...


S = TypeVar("S", bound=_WithSessions)


def stall_outlasts_lease(settings: S) -> S:
    """``Settings``' check: a session's holder that stopped is redelivered once its lease ran out, so
    a stall not longer than the lease would pass it over before it can come back."""
    if settings.sessions.stall_s * 1000 <= settings.ledger.lease_ms:
        raise ValueError(f"sessions.stall_s={settings.sessions.stall_s} must be longer than the lease "
                         f"(ledger.lease_ms={settings.ledger.lease_ms})")
    return settings
