"""The console's Schedules page (``/ui/schedules``): each schedule of the deployment, its clock and
catch-up policy, the last slot handled, the slots produced and skipped, the next slot and when it
fires, and how late it is (a row stands out once a due slot waits longer than its grace).

It reads what ``GET /schedules`` reads (:func:`service.api.schedules.schedule_views`), behind the
console's session (:func:`service.api.console.login_unless_reader`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.console import login_unless_reader, render
from service.api.console import router as console_router
from service.api.schedules import deployment_schedules, schedule_views

router = APIRouter(prefix="/ui", include_in_schema=False, dependencies=console_router.dependencies)


@router.get("/schedules")
async def schedules_page(request: Request) -> Response:
    refused = login_unless_reader(request)
    if refused is not None:
        return refused
    ledger = request.app.state.service.ledger
    views = await schedule_views(ledger, deployment_schedules(request), datetime.now(UTC))
    return render(request, "schedules.html", schedules=views)
