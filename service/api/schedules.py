"""The schedules as operators see them: ``GET /schedules`` and ``GET /schedules/{name}``.

Each schedule of the deployment (``AGENT_SCHEDULER__SCHEDULES`` and the kinds file's, as
:func:`service.agents.loading.schedules_from_settings` reads them, once per app) is shown with its
declaration and what the ledger keeps of it (docs/SCHEDULES.md): the ``last`` slot handled, the
slots produced and skipped, the fire time of the newest slot produced, who holds its lease; and,
computed from ``last``, the next slot, its fire time and ``late_s``: how long that slot has been due
without being produced (0 when it is not due yet). A schedule the ledger has not seen yet (no
replica has run it) is read as starting at ``now - grace_s``, as the scheduler would start it.

:func:`schedule_view` is what the command line (``agent-service schedule list|show``) and the
console's Schedules page show too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Request
from pydantic import BaseModel, Field

from dedup.ledger import Ledger
from service.agents.loading import schedules_from_settings
from service.api.protocol import Served
from service.api.schemas import error_responses
from service.api.security import Reader, ServiceDep
from service.core.schedule_spec import ScheduleSpec, from_ms, slot_text

__all__ = ["ScheduleView", "deployment_schedules", "router", "schedule_view", "schedule_views"]

router = APIRouter()


class ScheduleView(BaseModel):
    """A schedule's declaration, and its state in the ledger."""

    name: str
    kind: str
    cron: str | None = Field(description="five-field cron expression read in `timezone`; null for an interval")
    every_s: int | None = Field(description="the interval in seconds; null for a cron schedule")
    timezone: str
    jitter_s: float
    catch_up: Literal["all", "latest", "none"]
    max_catch_up: int
    grace_s: float = Field(description="as in effect: the declared grace, or min(60 s, the period)")
    deadline_s: float = Field(description="as in effect: the declared deadline, or the period, at most 24 h")
    tenant: str | None
    priority: Literal["interactive", "batch"]
    seen: bool = Field(description="whether the ledger has the schedule (false until a replica first runs it)")
    last: str | None = Field(description="the newest slot handled (produced or skipped), e.g. 2026-12-06T02:00:00Z")
    produced: int
    skipped: int
    last_fired: str | None = Field(description="the fire time of the newest slot produced")
    holder: str | None = Field(description="the replica that produces its slots now (its lease), or null")
    next_slot: str | None = Field(description="the slot after `last`: the next one to produce")
    next_fire: str | None = Field(description="when `next_slot` fires: the slot plus its jitter")
    late_s: float = Field(description="how long `next_slot` has been due without being produced; 0 when not due")


def iso(moment: datetime) -> str:
    """``2026-12-06T02:00:03.120Z``: an instant in UTC, to the millisecond."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def schedule_view(ledger: Ledger, spec: ScheduleSpec, now: datetime) -> ScheduleView:
    """What ``spec`` looks like at ``now``: its declaration and its state in ``ledger``."""
    state = await ledger.schedules.status(spec.name)
    holder = await ledger.schedules.holder(spec.name)
    after = from_ms(state.last_ms) if state is not None else now - timedelta(seconds=spec.effective_grace_s)
    following = spec.next_slot(after)
    fire = spec.fire_time(following) if following is not None else None
    late = max(0.0, (now - fire).total_seconds()) if fire is not None else 0.0
    fired = state.last_fired_ms if state is not None else None
    return ScheduleView(
        name=spec.name, kind=spec.kind, cron=spec.cron, every_s=spec.every_s, timezone=spec.timezone,
        jitter_s=spec.jitter_s, catch_up=spec.catch_up, max_catch_up=spec.max_catch_up,
        grace_s=spec.effective_grace_s, deadline_s=spec.effective_deadline_s, tenant=spec.tenant,
        priority=spec.priority, seen=state is not None,
        last=slot_text(from_ms(state.last_ms)) if state is not None else None,
        produced=state.produced if state is not None else 0, skipped=state.skipped if state is not None else 0,
        last_fired=iso(from_ms(fired)) if fired is not None else None, holder=holder,
        next_slot=slot_text(following) if following is not None else None,
        next_fire=iso(fire) if fire is not None else None, late_s=round(late, 3),
    )


async def schedule_views(ledger: Ledger, specs: list[ScheduleSpec], now: datetime) -> list[ScheduleView]:
    """:func:`schedule_view` of each spec, in their declared order."""
    return [await schedule_view(ledger, spec, now) for spec in specs]


def deployment_schedules(request: Request) -> list[ScheduleSpec]:
    """The schedules of the service the app serves, read once per app."""
    specs: list[ScheduleSpec] | None = getattr(request.app.state, "schedules", None)
    if specs is None:
        service: Served = request.app.state.service
        specs = schedules_from_settings(service.settings, service.agents)
        request.app.state.schedules = specs
    return specs


@router.get("/schedules", response_model=list[ScheduleView], dependencies=Reader, tags=["schedules"],
            responses=error_responses(401, 403, 503))
async def list_schedules(request: Request, service: ServiceDep) -> list[ScheduleView]:
    """Every schedule of the deployment, in declared order: its declaration, last and next slot, counts."""
    return await schedule_views(service.ledger, deployment_schedules(request), datetime.now(UTC))


@router.get("/schedules/{name}", response_model=ScheduleView, dependencies=Reader, tags=["schedules"],
            responses=error_responses(401, 403, 404, 503))
async def get_schedule(request: Request, service: ServiceDep,
                       name: Annotated[str, Path(max_length=200)]) -> ScheduleView:
    """One schedule; 404 when the deployment declares none of that name."""
    spec = next((s for s in deployment_schedules(request) if s.name == name), None)
    if spec is None:
        raise HTTPException(404, "unknown schedule")
    return await schedule_view(service.ledger, spec, datetime.now(UTC))
