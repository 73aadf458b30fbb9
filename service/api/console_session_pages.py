"""The console's Sessions pages: ``/ui/sessions`` lists the most recently changed sessions (and opens
one by id), ``/ui/sessions/{id}`` shows one: its kind, version, the task holding it and the queue, its
summary and state, and its turns, a page at a time (``?offset=``), each linked to its task.

They read what ``GET /sessions`` and ``GET /sessions/{id}`` read (:func:`service.api.sessions.listed_views`,
:func:`service.api.sessions.session_view`), behind the console's login
(:func:`service.api.console.login_unless_reader`). Correcting or erasing a session is the API's and
the command line's (``PUT``/``DELETE /sessions/{id}``, ``agent-service session delete``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from dedup.keys import is_valid_task_key
from service.api.console import login_unless_reader, render
from service.api.console import router as console_router
from service.api.sessions import TURNS_PAGE, listed_views, session_view

router = APIRouter(prefix="/ui", include_in_schema=False, dependencies=console_router.dependencies)

LISTED = 100


def _refused(request: Request, query: str, status: int, error: str) -> Response:
    return render(request, "sessions.html", status, sessions=[], query=query[:200], error=error)


async def _shown(request: Request, session_id: str, offset: int) -> Response:
    if not is_valid_task_key(session_id):
        return _refused(request, session_id, 400, "not a valid session id")
    record = await request.app.state.service.ledger.sessions.get(session_id)
    if record is None:
        return _refused(request, session_id, 404, "no such session (never created, expired or erased)")
    return render(request, "session.html", record=session_view(record, max(0, offset), TURNS_PAGE), page=TURNS_PAGE)


@router.get("/sessions")
async def sessions_page(request: Request, id: str = "") -> Response:
    refused = login_unless_reader(request)
    if refused is not None:
        return refused
    if id.strip():
        return await _shown(request, id.strip(), 0)
    listed = await listed_views(request.app.state.service.ledger, LISTED)
    return render(request, "sessions.html", sessions=listed, query="", error="")


@router.get("/sessions/{session_id:path}")
async def session_page(request: Request, session_id: str, offset: int = 0) -> Response:
    refused = login_unless_reader(request)
    if refused is not None:
        return refused
    return await _shown(request, session_id, offset)
