"""The HTTP bodies of the API: what its routes accept and answer, as OpenAPI shows them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.metrics import DLQ_REASONS


class ErrorBody(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[ValidationIssue]


class Health(BaseModel):
    """``stalled`` (503) once work has waited ``AGENT_LIVENESS__RESTART_S`` without a record finishing:
    a restart is the way out."""

    status: Literal["ok", "stalled"] = "ok"


class Readiness(BaseModel):
    """``ready`` follows the dependencies (Redis, broker, an assignment), never one record.

    ``status`` is ``degraded`` while the model endpoint cannot serve any task (a revoked key, an
    unknown model, nothing listening): the process is fine and stays ready, consumption waits, and
    ``degraded`` names each endpoint that cannot serve, the primary's and the fallbacks', by host and
    port, with the reason (never the endpoint's own error text).
    """

    ready: bool
    status: Literal["ok", "degraded", "unready"] = "ok"
    checks: dict[str, bool]
    degraded: dict[str, str] = Field(default_factory=dict)
    stalled: str | None = Field(None, description="while work is pending and no record finished for "
                                "AGENT_LIVENESS__STALL_S (check `progress` false): the mechanism that holds it, "
                                "e.g. `breaker open on host:port`, `window`, `retry-after`, `budget`, "
                                "`redis outage`, `paused`")
    stalled_s: float = Field(0.0, description="seconds since a record last finished while work is pending")


class TaskAccepted(BaseModel):
    task_id: str
    topic: str


class TaskView(BaseModel):
    """A ledger record (:meth:`dedup.ledger.TaskRecord.to_json`)."""

    model_config = ConfigDict(extra="allow")

    task_id: str
    state: str = Field(description="running, succeeded, failed, dead, waiting_approval, waiting_children or "
                       "resuming")
    outcome: Literal["succeeded", "failed"] | None = Field(None, description="how the task ended: succeeded, "
                                                           "or failed (dead); null while it may still run")
    kind: str | None = None
    fence: int
    attempts: int
    claims: int = 0
    fingerprint: str
    owner: str | None = None
    lease_until_ms: int | None = None
    result: Any = None
    result_digest: str | None = None
    model: str | None = None
    prompt_version: str | None = None
    published: bool = False
    published_by: str | None = Field(None, description="coordinates (topic[partition]@offset) of the record that "
                                     "published the outcome; null: not published")
    published_how: str | None = Field(None, description="staged (in a transaction, before the send) or acked "
                                      "(after the broker's acknowledgement); null: not published, or not said")
    error: str | None = None
    dead_reason: str | None = None
    created_at_ms: int | None = None
    completed_at_ms: int | None = None
    steps: dict[str, Any] = Field(default_factory=dict)
    generation: int = 1
    waiting: dict[str, Any] | None = Field(None, description="what a parked task waits for")
    tool_calls: list[dict[str, Any]] = Field(default_factory=list, description="each tool call: step, ordinal, "
                                             "key, tool, state, outcome, digests, result, fence, worker")
    decisions: list[dict[str, Any]] = Field(default_factory=list, description="approvals and reconcile answers")
    undos: list[dict[str, Any]] = Field(default_factory=list, description="compensations of tool calls")
    audit: list[dict[str, Any]] = Field(default_factory=list, description="the audit trail, oldest first")
    parent: dict[str, Any] | None = Field(None, description="the task that delegated this one: id, step; null for "
                                          "a root")
    children: list[dict[str, Any]] = Field(default_factory=list, description="the children of its delegating steps, "
                                           "in declared order: step, n, id, kind, topic, state (succeeded or dead "
                                           "once its reply is folded, with result or reason and error; else the "
                                           "child's own state, or pending)")


class DeadLetterCoordinates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    partition: int = Field(ge=0, le=2**31 - 1)
    offset: int = Field(ge=0, le=2**63 - 1)


class ReplayRequest(BaseModel):
    """Either ``items`` (exact dead letters) or ``reason`` (up to ``limit`` with that reason)."""

    model_config = ConfigDict(extra="forbid")

    items: list[DeadLetterCoordinates] | None = Field(None, min_length=1, max_length=1000)
    reason: str | None = Field(None, json_schema_extra={"enum": list(DLQ_REASONS)})
    limit: int = Field(100, ge=1, le=10_000)

    @model_validator(mode="after")
    def _one_selector(self) -> ReplayRequest:
        if (self.items is None) == (self.reason is None):
            raise ValueError("give either items or reason")
        if self.reason is not None and self.reason not in DLQ_REASONS:
            raise ValueError(f"reason must be one of {', '.join(DLQ_REASONS)}")
        return self


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entry for these error statuses."""
    return {code: {"model": ErrorBody} for code in codes}
