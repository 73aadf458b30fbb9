"""``AGENT_SESSIONS__*``: how a task of a session waits for its turn (docs/SESSIONS.md, "In the pipeline").

A model of its own beside :mod:`service.core.settings` (which includes it as ``Settings.sessions``)."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, Field, model_validator


class SessionsSettings(BaseModel):
    """``poll_s``: how often a waiting task asks again whether it is the session's head;
    ``max_wait_s``: the longest it waits (or its deadline, if sooner), then dead letter
    ``session_busy``; ``stall_s``: a free session whose head does not come for this long passes the
    head over (dedup.sessions). ``stall_s`` must be longer than ``poll_s`` (a waiter would pass a
    live head between two of its polls) and than the ledger's lease (checked by ``Settings``: a
    holder's redelivery waits out its old lease before it enters again)."""

    poll_s: float = Field(0.5, gt=0, le=60)
    max_wait_s: float = Field(300.0, gt=0, le=86_400)
    stall_s: float = Field(120.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _stall_outlasts_a_poll(self) -> Self:
        if self.stall_s <= self.poll_s:
            raise ValueError(f"sessions.stall_s={self.stall_s} must be longer than sessions.poll_s={self.poll_s}: "
                             "a waiter would pass over a live head between two of its polls")
        return self
