"""The routes of tasks that act: their tool calls and audit trail, parked tasks and the decisions
on them, and compensation."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from dedup.keys import TASK_KEY_PATTERN
from service.api.schemas import error_responses
from service.api.security import Admin, Reader, ServiceDep
from service.pipeline.base import utcnow
from service.pipeline.parking import Busy, Compensation, Decided, NotDecidable, compensate, decide
from service.pipeline.tools import safe_text

log = logging.getLogger(__name__)
router = APIRouter()
TaskId = Annotated[str, Path(pattern=TASK_KEY_PATTERN, max_length=200)]
PARKED_STATES = ("waiting_approval", "waiting_children")  # a person's decision, or its children's replies


class ParkedTask(BaseModel):
    task_id: str
    kind: str | None
    waiting: dict[str, Any] | None = Field(description="what the task waits for: what (approval, reconcile or "
                                           "children), step, ordinal, tool, key, arguments, reason, since_ms, "
                                           "deadline_ms; for children, the ids it waits on (children)")
    deadline_ms: float


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approve: bool
    reason: str = Field("", max_length=500)
    by: str = Field("admin api", min_length=1, max_length=200)


class ReconcileAnswer(BaseModel):
    """An operator's answer for a call whose outcome the tool could not tell: it ``landed`` (and
    ``result`` is what it returned: the model sees it) or did not (it runs again, same key)."""

    model_config = ConfigDict(extra="forbid")

    landed: bool
    result: Any = None
    reason: str = Field("", max_length=500)
    by: str = Field("admin api", min_length=1, max_length=200)


class CompensateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rerun: bool = Field(False, description="then run the task again as a new generation (new tool call keys)")
    by: str = Field("admin api", min_length=1, max_length=200)


class DecisionView(BaseModel):
    status: Literal["decided", "resumed_again"]
    task_id: str
    decision: str


class CompensationView(BaseModel):
    task_id: str
    undone: list[str]
    already: list[str]
    skipped: list[str]
    failed: dict[str, str]
    rerun: bool


@router.get("/parked", response_model=list[ParkedTask], dependencies=Reader, tags=["parked tasks"],
            responses=error_responses(401, 403, 503))
async def list_parked(service: ServiceDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[ParkedTask]:
    out = []
    for task_key, deadline in await service.ledger.effects.parked(limit=limit):
        record = await service.ledger.get(task_key)
        if record is None or record.state not in PARKED_STATES:
            continue
        raw = record.fields.get("waiting")
        waiting = json.loads(raw) if raw else None
        if isinstance(waiting, dict) and isinstance(waiting.get("reason"), str):
            waiting["reason"] = safe_text(waiting["reason"])  # a reason stored before URLs were cut down
        out.append(ParkedTask(task_id=task_key, kind=record.fields.get("kind"), waiting=waiting, deadline_ms=deadline))
    return out


async def _decide(service: ServiceDep, task_id: str, decision: str, by: str, reason: str,
                  result: Any = None) -> DecisionView:
    try:
        done: Decided = await decide(service.ledger, service.publisher.send, service.metrics, utcnow(), task_id,
                                     decision, by=by, reason=reason, result=result,
                                     audit_topic=service.settings.kafka.audit_topic)
    except KeyError:
        raise HTTPException(404, "unknown task") from None
    except NotDecidable as exc:
        raise HTTPException(409, str(exc)) from None
    return DecisionView(status=done.status, task_id=task_id, decision=done.decision)


@router.post("/tasks/{task_id:path}/approval", response_model=DecisionView, dependencies=Admin,
             tags=["parked tasks"], responses=error_responses(401, 403, 404, 409, 503))
async def approve(service: ServiceDep, task_id: TaskId, body: Approval) -> DecisionView:
    """Approve or reject the tool call a parked task waits on; the task resumes on any replica, once."""
    return await _decide(service, task_id, "approved" if body.approve else "rejected", body.by, body.reason)


@router.post("/tasks/{task_id:path}/reconcile", response_model=DecisionView, dependencies=Admin,
             tags=["parked tasks"], responses=error_responses(401, 403, 404, 409, 503))
async def reconcile(service: ServiceDep, task_id: TaskId, body: ReconcileAnswer) -> DecisionView:
    """Say whether the call a parked task waits on landed, after checking the downstream by hand."""
    return await _decide(service, task_id, "landed" if body.landed else "absent", body.by, body.reason, body.result)


@router.post("/tasks/{task_id:path}/compensate", response_model=CompensationView, dependencies=Admin,
             tags=["tasks"], responses=error_responses(401, 403, 404, 409, 503))
async def compensate_task(service: ServiceDep, task_id: TaskId, body: CompensateRequest) -> CompensationView:
    """Undo the task's side effects in reverse order, each once; optionally run it again."""
    try:
        report: Compensation = await compensate(
            service.ledger, service.agents, service.publisher.send, service.metrics, utcnow, task_id, by=body.by,
            rerun=body.rerun, audit_topic=service.settings.kafka.audit_topic)
    except KeyError:
        raise HTTPException(404, "unknown task") from None
    except Busy as exc:
        raise HTTPException(409, str(exc)) from None
    log.info("task_id=%s compensated by %s: undone %d, already %d, skipped %d, failed %d%s", task_id, body.by,
             len(report.undone), len(report.already), len(report.skipped), len(report.failed),
             ", running again" if report.rerun else "")
    return CompensationView(**vars(report))
