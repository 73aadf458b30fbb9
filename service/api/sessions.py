"""The sessions as operators see them and correct them (docs/SESSIONS.md, "Operators").

- ``GET /sessions``: the most recently changed sessions (``limit``), the last changed first.
- ``GET /sessions/{id}``: the session's kind, version, state, summary, its turns (a page of them:
  ``offset``, ``limit``; ``turns_total`` says how many there are), the task holding it and the queue
  as the ledger keeps them, and the seconds it has left before it expires (``ttl_s``).
- ``PUT /sessions/{id}`` (the admin token): ``{version, state}`` or ``{version, turns}`` replaces the
  state or the turns when the session is still at ``version`` (the one read); otherwise 409 with the
  current version, and nothing changed. Replacing the turns drops the summary. A task applying its
  update after the correction re-reads the session and reduces again (the ledger answers it ``moved``).
  The correction is checked against the session's kind (the one recorded in it) as this service's
  registry declares it, before anything is stored (:func:`kind_checked`): a kind that keeps a state
  (``Session(state=..., reduce=...)``) takes ``state``, which must load into its model
  (``Session.load``); a kind of turns takes ``turns``, each ``{task_id, input, result, at}``. Anything
  else is 422 with pydantic's errors (``loc`` under ``body``), nothing changed: stored, it would have
  been the dead letter ``session`` of every later turn. A session whose kind is not loaded here (or
  no longer declares a session) cannot be checked: 422 saying so, unless ``?force=true``, which
  stores the body as given (only the kind's check is skipped, never the version's). The kind is read
  with the version and the put is conditional on that version, so the check holds for the session
  written (an erasure moves the version on too: a session begun again since, of whichever kind, is
  never at the version read).
- ``DELETE /sessions/{id}`` (the admin token): erasure, every key of the session and its listing.

A session id is what the ledger's keys accept (``TASK_KEY_PATTERN``): anything else answers 422
without echoing the id (it may be 10 kB, or hold a lone surrogate no response can encode). The
body is read as the task contract reads JSON (no NaN or Infinity) and validated by
:class:`Correction`: a string that is not valid Unicode, a non-finite number, a turn without a
``task_id`` are 422; then against the kind, as above.

:func:`session_view` and :func:`listed_views` are what the command line (``agent-service session``)
and the console's Sessions page show too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Self

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from dedup.keys import TASK_KEY_PATTERN, is_valid_task_key
from dedup.ledger import Ledger
from dedup.sessions import SessionRecord
from service.agents.registry import AgentRegistry
from service.agents.tasks import loads
from service.api.schemas import ValidationErrorBody, error_responses
from service.api.security import Admin, Reader, ServiceDep

__all__ = ["Correction", "ListedView", "SessionView", "Turn", "kind_checked", "listed_views", "router", "session_view",
           "valid_session_id"]

router = APIRouter()

MAX_BODY_BYTES = 16 * 1024 * 1024
TURNS_PAGE = 100
MAX_TURNS_PAGE = 1000


class SummaryView(BaseModel):
    upto: int = Field(description="the summary stands for the turns [0, upto)")
    text: str


class SessionView(BaseModel):
    """A session as the ledger keeps it, with a page of its turns."""

    id: str
    kind: str = Field(description="the kind of its first task: only tasks of this kind may name it")
    version: int = Field(description="moves with every update and correction; a PUT names the one it read")
    state: Any = Field(description="the state a reducer keeps (null for a session of turns only)")
    summary: SummaryView | None = Field(description="the summary of the oldest turns, shown to steps in their place")
    turns_total: int = Field(description="the turns the session has had, the dropped ones included")
    turns_first: int = Field(description="the first turn still stored: older ones, covered by the summary, "
                                         "were dropped (TURNS_MAX)")
    turns_offset: int
    turns: list[dict[str, Any]] = Field(description="turns[i] is turn turns_offset + i: {task_id, input, result, at}")
    holder: str | None = Field(description="the task that holds the session now, or null")
    holder_fence: int
    holder_until: str | None = Field(description="when the holder's lease runs out unless renewed")
    queue: list[str] = Field(description="the tasks queued for it, head first (the holder among them until it applies)")
    ttl_s: int = Field(description="seconds before the session expires (each write sets its kind's ttl_s again)")


class ListedView(BaseModel):
    id: str
    updated: str = Field(description="when the session last changed")


class Correction(BaseModel):
    """An operator's correction: the version read, and the new state or the new turns (one of them)."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, le=2**53, strict=True)
    state: Any = Field(None, description="the new state (not null)")
    turns: list[dict[str, Any]] | None = Field(None, description="the new turns, each an object with a task_id")

    @model_validator(mode="after")
    def _one_and_storable(self) -> Self:
        if (self.state is None) == (self.turns is None):
            raise ValueError("give state or turns, one of them (and not null)")
        for turn in self.turns or ():
            task_id = turn.get("task_id")
            if not isinstance(task_id, str) or not is_valid_task_key(task_id):
                raise ValueError("each turn needs a task_id that is a valid task id")
        try:
            json.dumps([self.state, self.turns], allow_nan=False, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate: not valid Unicode text") from None
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"cannot be stored as JSON: {type(exc).__name__}") from None
        return self


class Turn(BaseModel):
    """A turn as a kind of turns keeps it and shows it to its steps: each field present (other
    fields are kept as given)."""

    model_config = ConfigDict(extra="allow")

    task_id: str = Field(pattern=TASK_KEY_PATTERN)
    input: Any = Field(description="the task's input")
    result: Any = Field(description="the task's result")
    at: Any = Field(description="when the turn was applied")


_TURNS = TypeAdapter(list[Turn])


def _invalid(loc: tuple[str | int, ...], kind: str, msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body", *loc), "msg": msg}])


def _refused(field: str, exc: ValidationError) -> RequestValidationError:
    return RequestValidationError([
        {"type": e["type"], "loc": ("body", field, *e["loc"]), "msg": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)])


def kind_checked(body: Correction, kind: str, agents: AgentRegistry, *, force: bool = False) -> None:
    """Raise the 422 of a correction the session's ``kind`` would not load (see the module's doc);
    ``force`` lets through the correction of a session whose kind is not loaded (or declares no
    session), never one that a loaded kind refuses."""
    agent = agents.get(kind) if kind in agents.kinds() else None
    declared = agent.session if agent is not None else None
    if declared is None:
        if force:
            return
        why = "is not loaded here" if agent is None else "declares no session here"
        raise _invalid((), "kind_not_loaded", f"the session's kind {kind!r} {why}: a correction cannot be checked "
                       "against it; put it with ?force=true to store it as given")
    if declared.turns and body.turns is None:
        raise _invalid(("state",), "kind_keeps_turns", f"kind {kind!r} keeps the turns, not a state: put turns")
    if not declared.turns and body.turns is not None:
        raise _invalid(("turns",), "kind_keeps_state", f"kind {kind!r} keeps a state (its reduce's), not the "
                       "turns: put a state")
    field = "turns" if body.turns is not None else "state"
    try:
        if body.turns is not None:
            _TURNS.validate_python(body.turns)
        else:
            declared.load(body.state)
    except ValidationError as exc:
        raise _refused(field, exc) from None
    except (ValueError, TypeError) as exc:  # a model's own validator that raises past pydantic
        raise _invalid((field,), "value_error", f"does not load: {type(exc).__name__}: {str(exc)[:500]}") from None


class Corrected(BaseModel):
    id: str
    version: int = Field(description="the session's version after the correction")


class Deleted(BaseModel):
    id: str
    deleted: bool


class Conflict(BaseModel):
    detail: str
    version: int = Field(description="the session's current version: read it again, then correct")


def iso_ms(ms: int) -> str:
    """``2026-12-06T02:00:03.120Z``: a time in ms since the epoch, in UTC."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def session_view(record: SessionRecord, offset: int = 0, limit: int | None = None) -> SessionView:
    """``record`` with its turns ``[offset, offset + limit)`` (all from ``offset`` when ``limit`` is None);
    turn numbers are absolute: an offset before the first turn still stored starts at it."""
    first = record.first_turn
    offset = max(offset, first)
    start = offset - first
    end = None if limit is None else start + limit
    summary = SummaryView(upto=record.summary.upto, text=record.summary.text) if record.summary else None
    return SessionView(
        id=record.id, kind=record.kind, version=record.version, state=record.state, summary=summary,
        turns_total=first + len(record.turns), turns_first=first, turns_offset=offset, turns=record.turns[start:end],
        holder=record.holder,
        holder_fence=record.holder_fence, queue=record.queue, ttl_s=record.ttl_s,
        holder_until=iso_ms(record.holder_until_ms) if record.holder is not None and record.holder_until_ms else None)


async def listed_views(ledger: Ledger, limit: int) -> list[ListedView]:
    """The ``limit`` most recently changed sessions, the last changed first."""
    return [ListedView(id=entry.id, updated=iso_ms(entry.updated_ms)) for entry in await ledger.sessions.list(limit)]


def valid_session_id(session_id: str) -> str:
    """The path's session id, or 422 (without the id in the answer: it may not even be encodable)."""
    if not is_valid_task_key(session_id):
        raise RequestValidationError([{"type": "string_pattern_mismatch", "loc": ("path", "session_id"),
                                       "msg": f"not a session id: it must match {TASK_KEY_PATTERN}"}])
    return session_id


SessionId = Annotated[str, Path(description=f"a session id, matching {TASK_KEY_PATTERN}")]
_CORRECTION_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": Correction.model_json_schema(ref_template="#/components/schemas/{model}")}}}}
_INVALID: dict[int | str, dict[str, Any]] = {422: {"model": ValidationErrorBody}}
_FORCE = ("store the correction as given when the session's kind is not loaded here (or declares no session), "
          "so it cannot be checked; a loaded kind's check is never skipped")


async def _correction(request: Request) -> Correction:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise HTTPException(413, f"body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return Correction.model_validate(loads(body))
    except ValidationError as exc:
        raise RequestValidationError([
            {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)]) from None
    except (ValueError, RecursionError) as exc:  # not JSON, NaN, nested too deep
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                       "msg": f"body is not JSON: {type(exc).__name__}"}]) from None


@router.get("/sessions", response_model=list[ListedView], dependencies=Reader, tags=["sessions"],
            responses={**error_responses(401, 403, 503), **_INVALID})
async def list_sessions(service: ServiceDep,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[ListedView]:
    """The most recently changed sessions (expired and erased ones left out), the last changed first."""
    return await listed_views(service.ledger, limit)


@router.get("/sessions/{session_id:path}", response_model=SessionView, dependencies=Reader, tags=["sessions"],
            responses={**error_responses(400, 401, 403, 404, 503), **_INVALID})
async def get_session(service: ServiceDep, session_id: SessionId,
                      offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
                      limit: Annotated[int, Query(ge=1, le=MAX_TURNS_PAGE)] = TURNS_PAGE) -> SessionView:
    """One session and a page of its turns; 404 when there is none (never created, expired or erased)."""
    record = await service.ledger.sessions.get(valid_session_id(session_id))
    if record is None:
        raise HTTPException(404, "unknown session")
    return session_view(record, offset, limit)


@router.put("/sessions/{session_id:path}", response_model=Corrected, dependencies=Admin, tags=["sessions"],
            openapi_extra=_CORRECTION_BODY,
            responses={**error_responses(400, 401, 403, 404, 413, 503), 409: {"model": Conflict}, **_INVALID})
async def put_session(request: Request, service: ServiceDep, session_id: SessionId,
                      force: Annotated[bool, Query(description=_FORCE)] = False) -> Corrected | JSONResponse:
    """Replace the state or the turns when the session is at ``version`` and its kind loads them:
    409 with the current version otherwise (nothing changed), 422 when the kind refuses them (or is
    not loaded here, unless ``force``), 404 when there is no such session."""
    sid = valid_session_id(session_id)
    body = await _correction(request)
    sessions = service.ledger.sessions
    current = await sessions.get(sid)
    if current is not None and current.version == body.version:
        kind_checked(body, current.kind, service.agents, force=force)
        answer = await sessions.put(sid, body.version, state=body.state, turns=body.turns)
        if answer == "ok":
            return Corrected(id=sid, version=body.version + 1)
        current = await sessions.get(sid) if answer == "conflict" else None
    if current is None:
        raise HTTPException(404, "unknown session")
    return JSONResponse(Conflict(detail=f"the session is at version {current.version}, not {body.version}",
                                 version=current.version).model_dump(), status_code=409)


@router.delete("/sessions/{session_id:path}", response_model=Deleted, dependencies=Admin, tags=["sessions"],
               responses={**error_responses(400, 401, 403, 404, 503), **_INVALID})
async def delete_session(service: ServiceDep, session_id: SessionId) -> Deleted:
    """Erase the session: its state, summary, turns, queue and listing. 404 when there was none."""
    sid = valid_session_id(session_id)
    if not await service.ledger.sessions.delete(sid):
        raise HTTPException(404, "unknown session")
    return Deleted(id=sid, deleted=True)
