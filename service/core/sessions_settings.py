"""``AGENT_SESSIONS__*``: how a task of a session waits for its turn (docs/SESSIONS.md, "In the pipeline").

A model of its own beside :mod:`service.core.settings` (which includes it as ``Settings.sessions``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SessionsSettings(BaseModel):
    """``poll_s``: how often a waiting task asks again whether it is the session's head;
    ``max_wait_s``: the longest it waits (or its deadline, if sooner), then dead letter
    ``session_busy``; ``stall_s``: a free session whose head does not come for this long passes the
    head over (dedup.sessions)."""

    poll_s: float = Field(0.5, gt=0, le=60)
    max_wait_s: float = Field(300.0, gt=0, le=86_400)
    stall_s: float = Field(120.0, ge=0, le=86_400)
