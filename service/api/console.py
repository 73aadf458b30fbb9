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

Writes go through the code the API uses: :func:`service.pipeline.parking.decide` for approvals
and :func:`service.pipeline.dlq.replay` (which re-checks the ledger) for dead letters. Dead letters
are read with :func:`service.pipeline.dlq.peek`, a consumer outside every group.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from dedup.client import RedisClient
from dedup.keys import is_valid_task_key
from service.api import peeking
from service.api.protocol import Served
from service.core.metrics import DLQ_REASONS
from service.core.settings import Settings
from service.pipeline import dlq
from service.pipeline.base import utcnow
from service.pipeline.parking import DECISIONS, NotDecidable, decide, side_effects
from service.pipeline.tools import safe_text

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "agent_console"
HOUR_S = 3600.0
LOGIN_COOKIE = "agent_console_login"
SESSION_MAX_AGE_S = 8 * 3600
MAX_FORM_BYTES = 64 * 1024
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
Role = Literal["read", "admin"]

_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                   trim_blocks=True, lstrip_blocks=True)
templates = Jinja2Templates(env=_env)


def _iso_ms(ms: float | int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(float(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


_env.filters["ms"] = _iso_ms
_env.filters["pretty"] = _pretty


# ---------------------------------------------------------------------------- sessions


@dataclass(frozen=True, slots=True)
class Session:
    role: Role | None  # None: nobody logged in (reads may still be open)
    sid: str
    csrf: str
    expires_at: float = 0.0  # Unix time the cookie stops being accepted

    @property
    def admin(self) -> bool:
        return self.role == "admin"


NO_SESSION = Session(None, "", "")


def session_key(settings: Settings) -> bytes:
    """The key of the console's cookies and CSRF tokens: the same for every replica of ``settings``.

    From ``http.session_secret``; else derived (HMAC-SHA256 under a fixed label, as HKDF's extract
    step) from the admin and read tokens, which every replica is given; the key does not reveal
    them. With no secret and no token nobody can log in, and a key of this process does."""
    secret = settings.http.session_secret
    if secret is not None and secret.get_secret_value():
        material = b"secret\0" + secret.get_secret_value().encode()
    else:
        tokens = [t.get_secret_value() if t is not None else "" for t in (settings.admin_token, settings.read_token)]
        if not any(tokens):
            return secrets.token_bytes(32)
        material = b"tokens\0" + "\0".join(tokens).encode()
    return hmac.new(b"agent-console-session-key/v1", material, hashlib.sha256).digest()


class RevokedInRedis:
    """Revoked session ids in Redis, each kept as long as its cookie could still be used."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, sid: str) -> str:
        return f"{self.prefix}:console:revoked:{sid}"

    async def add(self, sid: str, ttl_s: int) -> None:
        await self.client.set(self.key(sid), b"1", ex=max(1, ttl_s))

    async def holds(self, sid: str) -> bool:
        return bool(await self.client.exists(self.key(sid)))


class Sessions:
    """Signed session cookies and the CSRF tokens tied to them, with a key every replica shares
    (:func:`session_key`), and the sessions revoked before their end (``store``: in Redis, for
    every replica; always in this process too, pruned when they expire)."""

    def __init__(self, secret: bytes | None = None, *, store: RevokedInRedis | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._signer = URLSafeTimedSerializer(self._secret, salt="agent-console-session")
        self._store = store
        self._clock = clock
        self.revoked_here: dict[str, float] = {}  # session id -> when it may be forgotten (clock time)

    def csrf_for(self, sid: str) -> str:
        return hmac.new(self._secret, b"csrf:" + sid.encode(), hashlib.sha256).hexdigest()

    def issue(self, role: Role) -> tuple[str, Session]:
        self._prune()
        sid = secrets.token_urlsafe(18)
        session = Session(role, sid, self.csrf_for(sid), time.time() + SESSION_MAX_AGE_S)
        return self._signer.dumps({"role": role, "sid": sid}), session

    def signed(self, cookie: str | None) -> Session | None:
        """The session a cookie signed with this key holds, not yet expired (revocation not asked)."""
        if not cookie:
            return None
        try:
            data, signed_at = self._signer.loads(cookie, max_age=SESSION_MAX_AGE_S, return_timestamp=True)
        except BadSignature:
            return None
        if not isinstance(data, dict) or data.get("role") not in ("read", "admin"):
            return None
        sid = str(data.get("sid", ""))
        if not sid:
            return None
        return Session(data["role"], sid, self.csrf_for(sid), signed_at.timestamp() + SESSION_MAX_AGE_S)

    async def read(self, cookie: str | None) -> Session | None:
        """The cookie's session, unless it was revoked on any replica."""
        session = self.signed(cookie)
        if session is None:
            return None
        self._prune()
        if session.sid in self.revoked_here:
            return None
        if self._store is not None:
            try:
                if await self._store.holds(session.sid):
                    return None
            except RedisError as exc:  # the console stays usable; this replica's revocations still hold
                log.warning("console: revoked sessions not read from Redis: %s", exc)
        return session

    async def revoke(self, session: Session) -> None:
        """End the session on every replica, for as long as its cookie could still be used."""
        self._prune()
        self.revoked_here[session.sid] = self._clock() + SESSION_MAX_AGE_S
        if self._store is not None:
            try:
                await self._store.add(session.sid, math.ceil(session.expires_at - time.time()))
            except RedisError as exc:
                log.warning("console: a logout holds on this replica only (Redis did not answer): %s", exc)

    def _prune(self) -> None:
        now = self._clock()
        for sid in [sid for sid, until in self.revoked_here.items() if until <= now]:
            del self.revoked_here[sid]

    def login_nonce(self) -> tuple[str, str]:
        """A pre-session cookie and the CSRF token of the login form tied to it."""
        nonce = secrets.token_urlsafe(18)
        return self._signer.dumps({"login": nonce}), self.csrf_for("login:" + nonce)

    def login_csrf(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            data = self._signer.loads(cookie, max_age=3600)
        except BadSignature:
            return None
        nonce = data.get("login") if isinstance(data, dict) else None
        return self.csrf_for("login:" + str(nonce)) if nonce else None


def _secret_values(service: Served) -> tuple[str, str]:
    s = service.settings
    admin = s.admin_token.get_secret_value() if s.admin_token is not None else ""
    read = s.read_token.get_secret_value() if s.read_token is not None else ""
    return admin, read


def role_for(service: Served, given: str) -> Role | None:
    """The role a typed token grants, compared in constant time with every token that is set."""
    admin, read = _secret_values(service)
    raw = given.encode()
    is_admin = bool(admin) & hmac.compare_digest(raw, admin.encode())
    is_read = bool(read) & hmac.compare_digest(raw, read.encode())
    if not given:
        return None
    return "admin" if is_admin else "read" if is_read else None


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
    admin, read = _secret_values(_service(request))
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


def _samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in registry.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


@router.get("")
async def overview(request: Request) -> Response:
    session = _session(request)
    if not _may_read(request, session):
        return _to_login(request)
    service = _service(request)
    registry = request.app.state.registry or service.metrics.registry
    samples = _samples(registry)
    now = time.monotonic()
    consumed = _total(samples, "agent_messages_consumed_total")
    finished = _total(samples, "agent_tasks_total")
    last = request.app.state.console_last
    rate = None
    if last is not None and now - last[0] >= 0.5:
        rate = ((consumed - last[1]) / (now - last[0]), (finished - last[2]) / (now - last[0]))
    if last is None or now - last[0] >= 0.5:
        request.app.state.console_last = (now, consumed, finished)
    lag = sorted(((lab.get("topic", ""), int(lab.get("partition", "0") or 0), v)
                  for lab, v in samples.get("agent_consumer_lag", [])))
    breakers = sorted((lab.get("endpoint", ""), v) for lab, v in samples.get("agent_llm_breaker_open", []))
    degraded = sorted((lab.get("endpoint", ""), lab.get("reason", "")) for lab, v in
                      samples.get("agent_endpoint_degraded", []) if v)
    dead = {lab.get("reason", ""): v for lab, v in samples.get("agent_dead_letters_total", []) if v}
    recent, window_s = _recent(request.app.state.console_dead, now, dead)
    outcomes = {lab.get("outcome", ""): v for lab, v in samples.get("agent_tasks_total", [])}
    try:
        parked_now: int | None = await service.ledger.effects.parked_count()
    except Exception as exc:  # noqa: BLE001 - the overview shows what it can
        log.warning("console: parked count failed: %s", exc)
        parked_now = None
    return render(
        request, "overview.html", rate=rate, consumed=consumed, outcomes=outcomes,
        inflight=_total(samples, "agent_inflight_tasks"), paused=_total(samples, "agent_paused_partitions"),
        assigned=_total(samples, "agent_assigned_partitions"), lag=lag, breakers=breakers, degraded=degraded,
        dead=dead, recent=recent, window_min=round(window_s / 60), parked_gauge=_total(samples, "agent_parked_tasks"), parked_now=parked_now,
        published=_total(samples, "agent_results_published_total"), now=_iso_ms(time.time() * 1000),
    )


def _recent(history: deque[tuple[float, dict[str, float]]], now: float,
            counts: dict[str, float]) -> tuple[dict[str, float], float]:
    """Dead letters by reason over the last hour, from the counts this page saw (kept once a minute
    for an hour): what it can cover, the window it covers in seconds (0: nothing seen before)."""
    if not history or now - history[-1][0] >= 60:
        history.append((now, dict(counts)))
    while history and now - history[0][0] > HOUR_S:
        history.popleft()
    then, before = history[0]
    return {r: n - before.get(r, 0.0) for r, n in counts.items() if n - before.get(r, 0.0)}, now - then


# -- tasks


def _step_rows(record: dict[str, Any], agent_graph: dict[str, tuple[str, ...]] | None) -> list[dict[str, Any]]:
    """The journaled steps in the order of their ``needs`` (pieces of a map-reduce after their step),
    each with its depth in the graph."""
    steps: dict[str, Any] = record.get("steps") or {}
    graph: dict[str, tuple[str, ...]] = dict(agent_graph or {})
    for name in steps:
        base = name.split("-part-")[0]
        if base not in graph and name not in graph:
            graph[name] = ()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except Exception:  # noqa: BLE001 - a graph from the ledger alone: keep its own order
        order = list(graph)
    depth: dict[str, int] = {}
    for name in order:
        depth[name] = 1 + max((depth.get(n, 0) for n in graph.get(name, ())), default=-1)
    rows = []
    for name in order:
        parts = sorted(n for n in steps if n.startswith(name + "-part-"))
        for journal_name in [name, *parts]:
            rec = steps.get(journal_name)
            if rec is None and journal_name != name:
                continue
            rows.append({"name": journal_name, "needs": graph.get(name, ()) if journal_name == name else (name,),
                         "depth": depth.get(name, 0), "record": rec, "part": journal_name != name})
    return rows


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
    kind = record.get("kind") or ""
    agent = service.agents.get(kind) if kind in service.agents.kinds() else None
    versions: dict[str, str] = {}
    if agent is not None:
        for step in agent.steps:
            versions.setdefault(step.prompt_version, "current")
        if agent.candidate is not None:
            for step in agent.candidate.steps:
                versions.setdefault(step.prompt_version, "candidate")
    rows = _step_rows(record, dict(agent.graph) if agent is not None else None)
    return render(request, "task.html", task=record, effects=effects, rows=rows, versions=versions,
                  published_by=stored.fields.get("published") if stored.published else None,
                  max_depth=max((r["depth"] for r in rows), default=0))


# -- dead letters


def _parse_time(text: str) -> float | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp() * 1000


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
    since_ms, until_ms = _parse_time(since), _parse_time(until)
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


def _selection(form: dict[str, list[str]]) -> list[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for item in form.get("sel", [])[:1000]:
        p, _, o = item.partition(":")
        if p.isdigit() and o.isdigit() and int(p) < 2**31 and int(o) < 2**63:
            out.add((int(p), int(o)))
    return sorted(out)


async def _selected(request: Request) -> Response | tuple[dict[str, list[str]], list[tuple[int, int]]]:
    """An admin's form and the dead letters it selects, or the refusal to answer with."""
    checked = await _writer(request)
    if isinstance(checked, Response):
        return checked
    _, form = checked
    return form, _selection(form)


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
        if record is None or record.state != "waiting_approval":
            continue
        waiting = json.loads(record.fields["waiting"]) if record.fields.get("waiting") else {}
        if isinstance(waiting.get("reason"), str):
            waiting["reason"] = safe_text(waiting["reason"])  # a reason stored before URLs were cut down
        what = waiting.get("what", "approval")
        rows.append({"task_id": task_key, "kind": record.fields.get("kind"), "waiting": waiting,
                     "deadline_ms": deadline, "choices": [d for d in DECISIONS.get(what, ()) if d != "expired"]})
    return render(request, "parked.html", rows=rows)


@router.post("/tasks/{task_id:path}/decision")
async def decision(request: Request, task_id: str) -> Response:
    checked = await _writer(request)
    if isinstance(checked, Response):
        return checked
    _, form = checked
    if not is_valid_task_key(task_id):
        return _refuse(request, 400, "not a valid task id")
    choice = _one(form, "decision")
    if choice not in ("approved", "rejected", "landed", "absent"):
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
