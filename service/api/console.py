"""The operator console: server-rendered pages under ``/ui`` on the admin HTTP app.

Security is the API's: the same tokens (``AGENT_READ_TOKEN``, ``AGENT_ADMIN_TOKEN``,
``AGENT_READS_OPEN``) are typed once into a login form, which sets a session cookie (HttpOnly,
SameSite=Strict, Secure over https) signed with a key every replica shares: from
``AGENT_HTTP__SESSION_SECRET``, or else derived from the admin and read tokens (a token change ends
every session). The cookie holds the role (``read`` or ``admin``) and a session id, never a token;
it lives :data:`SESSION_MAX_AGE_S`. Every form carries a CSRF token derived from the session id and
every POST checks it. A logout revokes the session on every replica: its id is kept in Redis until
the cookie would have expired anyway (and in the process, pruned as sessions expire, which is all
that holds while Redis does not answer). Reads need
either role (or ``AGENT_READS_OPEN``), writes the admin role. Templates autoescape every value,
and each page answers with a Content-Security-Policy that loads nothing from outside the service.

The sessions are :mod:`service.api.console_sessions`'s; what a page shows, computed from the
metrics, the ledger's records and the forms, is :mod:`service.api.console_views`'s.

Writes go through the code the API uses: :func:`service.pipeline.parking.decide` for approvals
and :func:`service.pipeline.dlq.replay` (which re-checks the ledger) for dead letters. Dead letters
are read with :func:`service.pipeline.dlq.peek`, a consumer outside every group.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape

from dedup.keys import is_valid_task_key
from service.api import console_views as views
from service.api import peeking
from service.api.console_batches import batch_of, batches_waiting
from service.api.console_sessions import (
    NO_SESSION,
    SESSION_MAX_AGE_S,
    RevokedInRedis,
    Role,
    Session,
    Sessions,
    role_for,
    secret_values,
    session_key,
)
from service.api.effects import PARKED_STATES
from service.api.protocol import Served
from service.core.metrics import DLQ_REASONS
from service.pipeline import dlq
from service.pipeline.base import utcnow
from service.pipeline.parking import DECISIONS, NotDecidable, decide, side_effects
from service.pipeline.tools import safe_text
from service.pipeline.tree import task_tree

PERSONS = ("approved", "rejected", "landed", "absent")  # the decisions a person takes (expiry is the sweeper's)

__all__ = ["NO_SESSION", "SESSION_MAX_AGE_S", "RevokedInRedis", "Role", "Session", "Sessions", "install",
           "login_unless_reader", "render", "role_for", "router", "session_key", "templates"]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "agent_console"
LOGIN_COOKIE = "agent_console_login"
MAX_FORM_BYTES = 64 * 1024
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                   trim_blocks=True, lstrip_blocks=True)
templates = Jinja2Templates(env=_env)
_env.filters["ms"] = views.iso_ms
_env.filters["pretty"] = views.pretty


async def _load_session(request: Request) -> None:
    """Read the request's session once, before any route of the console (revocations are in Redis)."""
    sessions: Sessions = request.app.state.console_sessions
    found = await sessions.read(request.cookies.get(COOKIE))
    request.state.console_session = found if found is not None else NO_SESSION


def _session(request: Request) -> Session:
    found = getattr(request.state, "console_session", None)
    return found if isinstance(found, Session) else NO_SESSION


def _may_read(request: Request, session: Session) -> bool:
    return session.role is not None or bool(request.app.state.service.settings.reads_open)


def _service(request: Request) -> Served:
    return request.app.state.service  # type: ignore[no-any-return]


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"


def _set_cookie(response: Response, request: Request, name: str, value: str, path: str = "/ui") -> None:
    response.set_cookie(name, value, max_age=SESSION_MAX_AGE_S, path=path, httponly=True, samesite="strict",
                        secure=_secure(request))


def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def login_unless_reader(request: Request) -> Response | None:
    """None when the request may read; else the redirect to the login form (for pages of other modules)."""
    return None if _may_read(request, _session(request)) else _to_login(request)


def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    session = _session(request)
    context.setdefault("session", session)
    context.setdefault("reads_open", bool(_service(request).settings.reads_open))
    return _headers(templates.TemplateResponse(request, name, context, status_code=status))


def _refuse(request: Request, status: int, message: str) -> Response:
    return render(request, "error.html", status, message=message)


def _to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _headers(RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303))


def _safe_next(target: str) -> str:
    """Only a path of the console: never another host (``//x``, ``/\\x``), never a scheme."""
    if target.startswith("/ui") and not target.startswith(("//", "/\\")) and "\\" not in target:
        return target
    return "/ui"


async def _form(request: Request) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body (what every form of the console sends), at most
    :data:`MAX_FORM_BYTES`; anything else reads as an empty form."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=2000)


def _one(form: dict[str, list[str]], key: str, default: str = "") -> str:
    values = form.get(key)
    return values[0] if values else default


async def _writer(request: Request) -> tuple[Session, dict[str, list[str]]] | Response:
    """The admin session and the form of a POST whose CSRF token matches it; else the refusal."""
    session = _session(request)
    form = await _form(request)
    if session.role is None:
        return _refuse(request, 401, "Log in with the admin token to change anything.")
    if not hmac.compare_digest(_one(form, "csrf").encode(), session.csrf.encode()):
        return _refuse(request, 403, "The form's CSRF token does not match your session: reload the page.")
    if not session.admin:
        return _refuse(request, 403, "Only the admin role may do this: log in with the admin token.")
    return session, form


# ---------------------------------------------------------------------------- routes

router = APIRouter(prefix="/ui", include_in_schema=False, dependencies=[Depends(_load_session)])


@router.get("/login")
async def login_page(request: Request, next: str = "/ui", error: str = "") -> Response:
    sessions: Sessions = request.app.state.console_sessions
    cookie, csrf = sessions.login_nonce()
    admin, read = secret_values(_service(request))
    response = render(request, "login.html", csrf=csrf, next=_safe_next(next), error=error[:200],
                      disabled=not admin and not read)
    _set_cookie(response, request, LOGIN_COOKIE, cookie, path="/ui/login")
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    sessions: Sessions = request.app.state.console_sessions
    form = await _form(request)
    expected = sessions.login_csrf(request.cookies.get(LOGIN_COOKIE))
    if expected is None or not hmac.compare_digest(_one(form, "csrf").encode(), expected.encode()):
        return _refuse(request, 403, "The login form expired: load it again.")
    role = role_for(_service(request), _one(form, "token"))
    target = _safe_next(_one(form, "next", "/ui"))
    if role is None:
        log.warning("console: a login with a wrong token from %s", request.client.host if request.client else "-")
        return _headers(RedirectResponse("/ui/login?" + urlencode({"next": target, "error": "wrong token"}), 303))
    cookie, _ = sessions.issue(role)
    response = _headers(RedirectResponse(target, status_code=303))
    _set_cookie(response, request, COOKIE, cookie)
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    log.info("console: %s session opened", role)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session = _session(request)
    form = await _form(request)
    if session.role is not None:
        if not hmac.compare_digest(_one(form, "csrf").encode(), session.csrf.encode()):
            return _refuse(request, 403, "The form's CSRF token does not match your session.")
        await request.app.state.console_sessions.revoke(session)
    response = _headers(RedirectResponse("/ui/login", status_code=303))
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- overview


@router.get("")
async def overview(request: Request) -> Response:
    session = _session(request)
    if not _may_read(request, session):
        return _to_login(request)
    service = _service(request)
    samples = views.samples(request.app.state.registry or service.metrics.registry)
    now = time.monotonic()
    consumed = views.total(samples, "agent_messages_consumed_total")
    finished = views.total(samples, "agent_tasks_total")
    last = request.app.state.console_last
    rate = None
    if last is not None and now - last[0] >= 0.5:
        rate = ((consumed - last[1]) / (now - last[0]), (finished - last[2]) / (now - last[0]))
    if last is None or now - last[0] >= 0.5:
        request.app.state.console_last = (now, consumed, finished)
    dead = {lab.get("reason", ""): v for lab, v in samples.get("agent_dead_letters_total", []) if v}
    recent, window_s = views.recent(request.app.state.console_dead, now, dead)
    try:
        parked_now: int | None = await service.ledger.effects.parked_count()
    except Exception as exc:  # noqa: BLE001 - the overview shows what it can
        log.warning("console: parked count failed: %s", exc)
        parked_now = None
    return render(
        request, "overview.html", rate=rate, consumed=consumed, dead=dead, recent=recent,
        window_min=round(window_s / 60), parked_now=parked_now, now=views.iso_ms(time.time() * 1000),
        **views.overview_figures(samples),
    )


# -- tasks


@router.get("/tasks")
async def task_lookup(request: Request, id: str = "") -> Response:
    session = _session(request)
    if not _may_read(request, session):
        return _to_login(request)
    task_id = id.strip()
    if task_id:
        if is_valid_task_key(task_id):
            return _headers(RedirectResponse("/ui/tasks/" + quote(task_id, safe=""), status_code=303))
        return render(request, "lookup.html", 400, query=task_id, error="not a valid task id")
    return render(request, "lookup.html", query="", error="")


@router.get("/tasks/{task_id:path}")
async def task_detail(request: Request, task_id: str) -> Response:
    session = _session(request)
    if not _may_read(request, session):
        return _to_login(request)
    if not is_valid_task_key(task_id):
        return render(request, "lookup.html", 400, query=task_id, error="not a valid task id")
    service = _service(request)
    stored = await service.ledger.get(task_id)
    if stored is None:
        return render(request, "lookup.html", 404, query=task_id, error="no such task in the ledger")
    record = stored.to_json()
    effects = await side_effects(service.ledger, task_id)
    tree = await task_tree(service.ledger, task_id, stored.fields)
    kind = record.get("kind") or ""
    agent = service.agents.get(kind) if kind in service.agents.kinds() else None
    versions = views.prompt_versions(agent)
    rows = views.step_rows(record, dict(agent.graph) if agent is not None else None)
    return render(request, "task.html", task=record, effects=effects, tree=tree, rows=rows, versions=versions,
                  published_by=stored.published_by,
                  max_depth=max((r["depth"] for r in rows), default=0))


# -- dead letters


PAGE = 25


@router.get("/dlq")
async def dead_letters(request: Request, reason: str = "", task: str = "", since: str = "", until: str = "",
                       scan: int = 200, page: int = 1) -> Response:
    session = _session(request)
    if not _may_read(request, session):
        return _to_login(request)
    scan = min(max(scan, 1), 1000)
    page = max(page, 1)
    try:
        letters = await peeking.peek(_service(request).settings.kafka, scan)
    except peeking.PeekBusy:
        return _refuse(request, 429, "Another dead-letter read is running: reload in a moment.")
    since_ms, until_ms = views.parse_time(since), views.parse_time(until)
    picked = [
        d for d in reversed(letters)  # newest first
        if (not reason or d.reason == reason) and (not task or task in (d.task_id or d.key or ""))
        and (since_ms is None or (d.timestamp_ms or 0) >= since_ms)
        and (until_ms is None or (d.timestamp_ms or 0) <= until_ms)
    ]
    pages = max(1, -(-len(picked) // PAGE))
    page = min(page, pages)
    query = {"reason": reason, "task": task, "since": since, "until": until, "scan": scan}
    return render(request, "dlq.html", letters=picked[(page - 1) * PAGE:page * PAGE], total=len(picked),
                  scanned=len(letters), page=page, pages=pages, reasons=DLQ_REASONS, f=query,
                  link=lambda p: "/ui/dlq?" + urlencode({**query, "page": p}))


@router.get("/dlq/{partition}/{offset}")
async def dead_letter(request: Request, partition: int, offset: int) -> Response:
    session = _session(request)
    if not _may_read(request, session):
        return _to_login(request)
    if partition < 0 or offset < 0 or partition >= 2**31 or offset >= 2**63:
        return _refuse(request, 400, "no such coordinates")
    try:
        found = await peeking.peek(_service(request).settings.kafka, 1, partition, offset)
    except peeking.PeekBusy:
        return _refuse(request, 429, "Another dead-letter read is running: reload in a moment.")
    letter = next((d for d in found if d.partition == partition and d.offset == offset), None)
    if letter is None:
        return _refuse(request, 404, f"no dead letter at partition {partition}, offset {offset}")
    return render(request, "letter.html", d=letter, preview=2000)


async def _selected(request: Request) -> Response | tuple[dict[str, list[str]], list[tuple[int, int]]]:
    """An admin's form and the dead letters it selects, or the refusal to answer with."""
    checked = await _writer(request)
    if isinstance(checked, Response):
        return checked
    _, form = checked
    return form, views.selection(form)


@router.post("/dlq/replay/confirm")
async def replay_confirm(request: Request) -> Response:
    checked = await _selected(request)
    if isinstance(checked, Response):
        return checked
    _, selection = checked
    if not selection:
        return _refuse(request, 400, "Select at least one dead letter to replay.")
    return render(request, "replay_confirm.html", selection=selection)


@router.post("/dlq/replay")
async def replay(request: Request) -> Response:
    checked = await _selected(request)
    if isinstance(checked, Response):
        return checked
    form, selection = checked
    if not selection or _one(form, "confirm") != "yes":
        return _refuse(request, 400, "Nothing confirmed: select dead letters and confirm the replay.")
    service = _service(request)
    report = await dlq.replay(service.settings.kafka, service.ledger, selection, None)
    log.info("console dlq replay: replayed=%d already_succeeded=%d not_found=%d failed=%d",
             report.replayed, report.already_succeeded, report.not_found, report.failed)
    return render(request, "replay_report.html", report=report)


# -- approvals


@router.get("/parked")
async def parked(request: Request) -> Response:
    session = _session(request)
    if not _may_read(request, session):
        return _to_login(request)
    service = _service(request)
    rows = []
    for task_key, deadline in await service.ledger.effects.parked(limit=200):
        record = await service.ledger.get(task_key)
        if record is None or record.state not in PARKED_STATES:
            continue
        waiting = json.loads(record.fields["waiting"]) if record.fields.get("waiting") else {}
        if isinstance(waiting.get("reason"), str):
            waiting["reason"] = safe_text(waiting["reason"])  # a reason stored before URLs were cut down
        what = waiting.get("what", "approval")
        rows.append({"task_id": task_key, "kind": record.fields.get("kind"), "waiting": waiting,
                     "deadline_ms": deadline, "choices": [d for d in DECISIONS.get(what, ()) if d in PERSONS],
                     "batch": await batch_of(service.ledger, waiting) if what == "batch" else None})
    return render(request, "parked.html", rows=rows, batches=await batches_waiting(service.ledger))


@router.post("/tasks/{task_id:path}/decision")
async def decision(request: Request, task_id: str) -> Response:
    checked = await _writer(request)
    if isinstance(checked, Response):
        return checked
    _, form = checked
    if not is_valid_task_key(task_id):
        return _refuse(request, 400, "not a valid task id")
    choice = _one(form, "decision")
    if choice not in PERSONS:
        return _refuse(request, 400, "Choose a decision.")
    service = _service(request)
    try:
        await decide(service.ledger, service.publisher.send, service.metrics, utcnow(), task_id, choice,
                     by="console", reason=_one(form, "reason")[:500],
                     audit_topic=service.settings.kafka.audit_topic)
    except KeyError:
        return _refuse(request, 404, "unknown task")
    except NotDecidable as exc:
        return _refuse(request, 409, str(exc))
    log.info("console: task_id=%s %s", task_id, choice)
    return _headers(RedirectResponse("/ui/tasks/" + quote(task_id, safe=""), status_code=303))


def install(app: Any) -> None:
    """Serve the console on ``app``: its routes, its stylesheet and its sessions (signed with the key
    of :func:`session_key`, revoked in the Redis of the service's ledger when it has one)."""
    service = app.state.service
    ledger = getattr(service, "ledger", None)
    client = getattr(ledger, "client", None)
    keys = getattr(ledger, "keys", None)
    store = RevokedInRedis(client, keys.prefix) if client is not None and keys is not None else None
    app.state.console_sessions = Sessions(session_key(service.settings), store=store)
    app.state.console_last = None
    app.state.console_dead = deque()  # (monotonic time, dead letters by reason), once a minute
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="console-static")
