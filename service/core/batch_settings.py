"""``AGENT_BATCH__*``: the batch lane (service.pipeline.batch_lane): which calls go through the
provider's Batch API at its lower price, how they are grouped, and how long they may wait there.

A model of its own beside :mod:`service.core.settings` (which includes it as ``Settings.batch``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BatchSettings(BaseModel):
    """``enabled``: the lane is used at all (a kind with ``batch = True``); ``priority``: a task whose
    event says ``"priority": "batch"`` in so many words goes through it too (``interactive`` never
    does); ``max_size`` / ``max_age_s``: a group's calls are sealed into a batch when it holds this many,
    or its oldest waited this long; ``deadline_share``: a task with a deadline waits for its batch at
    most this share of the time it had left (then it goes online, with the rest); ``max_wait_s``: the
    longest a task without a deadline waits (the provider's window is 24 h); ``lease_s``: how long
    one worker keeps a batch to submit and poll it before another may."""

    enabled: bool = True
    priority: bool = False
    max_size: int = Field(1000, ge=1, le=50_000)
    max_age_s: float = Field(10.0, ge=0)
    deadline_share: float = Field(0.5, gt=0, le=1)
    max_wait_s: float = Field(86_400.0, gt=0)
    lease_s: float = Field(60.0, gt=0)
