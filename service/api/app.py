"""The HTTP app: health, readiness, metrics and the admin API.

``/healthz``, ``/readyz`` and ``/metrics`` are open and never carry an error text. Reads
(``GET /tasks/{id}``: model output; ``GET /dlq``: raw task payloads) need
``Authorization: Bearer <AGENT_READ_TOKEN or AGENT_ADMIN_TOKEN>``, answer 403 when neither token
is set, and are open to anyone only with ``AGENT_READS_OPEN=true``. Writes (producing a task,
replaying dead letters) need ``Bearer <AGENT_ADMIN_TOKEN>`` and answer 403 when it is not set;
producing a task (``POST /tasks``) takes ``AGENT_SUBMIT_TOKEN`` too, which opens nothing else.
``?wait=`` on ``POST /tasks`` and ``GET /tasks/{id}`` answers once the task ended (200) or
after that many seconds (202); see :mod:`service.api.waiting`.
A wrong or missing token answers 401 with ``WWW-Authenticate: Bearer``.

``GET /dlq`` reads the dead-letter topic with a consumer of its own: one peek at a time per
process (a concurrent one answers 429 with ``Retry-After: 1``), at most 1000 letters, and at most
:data:`service.api.peeking.DLQ_PEEK_TIMEOUT_S` seconds. Every error answers with JSON; Redis or broker outages answer 503.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from time import monotonic
from typing import Annotated, Literal, cast

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field, ValidationError

from consumers.producers import Headers, ProduceFailed
from dedup.keys import TASK_KEY_PATTERN
from dedup.ledger import LedgerUnavailable
from service.agents.registry import prepare_task
from service.agents.tasks import TaskEvent, loads
from service.api import console, console_schedules, peeking, waiting
from service.api.console_session_pages import router as session_pages_router
from service.api.effects import router as effects_router
from service.api.protocol import Served
from service.api.schedules import router as schedules_router
from service.api.schemas import (
    Health,
    Readiness,
    ReplayRequest,
    TaskAccepted,
    TaskView,
    ValidationErrorBody,
    error_responses,
)
from service.api.security import Admin, Reader, RejectControlCharacters, ServiceDep, Submitter, bearer, may_read
from service.api.sessions import router as sessions_router
from service.core.errors import PoisonError
from service.core.settings import KafkaSettings
from service.pipeline import dlq

log = logging.getLogger(__name__)

TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
DLQ_BUSY = "a dead-letter peek is already running; retry shortly"


# ---------------------------------------------------------------------------- dependencies


class BrokerProbe:
    """Answers whether broker metadata is reachable; one probe per ``ttl_s`` at most."""

    def __init__(self, kafka: KafkaSettings, *, ttl_s: float = 5.0, timeout_s: float = 2.0) -> None:
        self._kafka = kafka
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._admin: AdminClient | None = None
        self._checked_at: float | None = None
        self._ok = False
        self._lock = asyncio.Lock()

    async def ok(self) -> bool:
        async with self._lock:
            now = monotonic()
            if self._checked_at is None or now - self._checked_at >= self._ttl_s:
                self._ok = await asyncio.to_thread(self._probe)
                self._checked_at = monotonic()
            return self._ok

    def _probe(self) -> bool:
        try:
            if self._admin is None:
                self._admin = AdminClient(self._kafka.common_config("admin"))
            self._admin.list_topics(timeout=self._timeout_s)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            log.warning("readiness: broker metadata failed: %s", exc)
            return False


# ---------------------------------------------------------------------------- routes

router = APIRouter()


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}}, tags=["ops"])
async def healthz(request: Request, service: ServiceDep) -> JSONResponse:
    """503 once work has waited ``AGENT_LIVENESS__RESTART_S`` without a record finishing."""
    if request.app.state.consumer_checks is None and not service.runner.progress.alive:
        return JSONResponse(Health(status="stalled").model_dump(), status_code=503)
    return JSONResponse(Health().model_dump())


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["ops"])
async def readyz(request: Request, service: ServiceDep) -> JSONResponse:
    probe = cast(BrokerProbe, request.app.state.broker_probe)
    try:
        redis_ok = bool(await asyncio.wait_for(service.ledger.ping(), timeout=2.0))
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        log.warning("readiness: redis ping failed: %s", exc)
        redis_ok = False
    consumer_checks = request.app.state.consumer_checks
    consumer = consumer_checks() if consumer_checks is not None else {
        "assigned": bool(service.runner.assignment),
        "consuming": not service.runner.stopping,
    }
    checks = {
        **consumer,
        "redis": redis_ok,
        "kafka": await probe.ok(),
    }
    stalled: str | None = None
    stalled_s = 0.0
    if consumer_checks is None:
        progress = service.runner.progress
        stalled_s = round(progress.stalled_s(), 1)
        checks["progress"] = not progress.stalled
        if not checks["progress"]:
            stalled = progress.holding()
    ready = all(checks.values())
    processor = service.processor
    guards = [e.guard for e in (processor.primary, *processor.capacity.replicas, *processor.fallbacks) if e.guard is not None]
    degraded = {guard.label: guard.degraded for guard in guards if guard.degraded}
    status: Literal["ok", "degraded", "unready"] = "unready" if not ready else "degraded" if degraded else "ok"
    body = Readiness(ready=ready, status=status, checks=checks, degraded=degraded, stalled=stalled,
                     stalled_s=stalled_s)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics", response_class=Response, tags=["ops"],
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)
async def metrics(request: Request, service: ServiceDep) -> Response:
    registry = request.app.state.registry or service.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


_TASK_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": TaskEvent.model_json_schema(ref_template="#/components/schemas/{model}")}},
    }
}


WaitQuery = Annotated[float, Query(ge=0, le=waiting.MAX_WAIT_S, description="seconds to wait for the task to end "
                                    "(succeeded or dead): 200 with its record when it did, 202 when not yet")]


@router.post(
    "/tasks", status_code=202, response_model=TaskAccepted, dependencies=Submitter, tags=["tasks"],
    openapi_extra=_TASK_BODY,
    responses={**error_responses(401, 403, 413, 503), 200: {"model": TaskView, "description": "ended (wait)"},
               422: {"model": ValidationErrorBody}},
)
async def produce_task(
    request: Request, service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], wait: WaitQuery = 0,
) -> Response | TaskAccepted:
    """Produce a task (the submit or the admin token). With ``wait``, answer when it ended: that
    needs a token that may read too (its record is model output)."""
    if wait and not may_read(service.settings, credentials):
        raise HTTPException(403, "waiting for a task's outcome reads its record: use the read or admin token")
    accepted = await _produce(request, service)
    if not wait:
        return accepted
    record = await waiting.wait_ended(service.ledger, accepted.task_id, wait)
    if record is None or waiting.outcome_of(record.state) is None:
        return JSONResponse(accepted.model_dump(), 202)
    return JSONResponse(TaskView.model_validate(await waiting.view_of(service.ledger, accepted.task_id, record))
                        .model_dump(mode="json"), 200)


async def _produce(request: Request, service: Served) -> TaskAccepted:
    settings = service.settings
    body = await _read_body(request, settings.max_task_bytes)
    try:
        key, value = prepare_task(_parse_event(body), service.agents, settings.max_task_bytes)
    except PoisonError as exc:
        if exc.reason == "oversize":
            raise HTTPException(413, str(exc)) from exc
        raise _invalid(("body",), str(exc)) from exc
    headers: Headers = []
    traceparent = request.headers.get("traceparent")
    if traceparent and TRACEPARENT_RE.match(traceparent):
        headers.append(("traceparent", traceparent.encode()))
    topic = settings.kafka.input_topic
    await service.publisher.send(topic, key.encode(), value, headers)
    log.info("task_id=%s produced to %s", key, topic)
    return TaskAccepted(task_id=key, topic=topic)


@router.get(
    "/tasks/{task_id:path}", response_model=TaskView, dependencies=Reader, tags=["tasks"],
    responses={**error_responses(400, 401, 403, 404, 503), 202: {"model": TaskView, "description": "not ended (wait)"}},
)
async def get_task(
    service: ServiceDep,
    task_id: Annotated[str, Path(pattern=TASK_KEY_PATTERN, max_length=200)],
    wait: WaitQuery = 0,
) -> Response | TaskView:
    record = await (waiting.wait_ended(service.ledger, task_id, wait) if wait else service.ledger.get(task_id))
    if record is None:
        raise HTTPException(404, "unknown task")
    view = TaskView.model_validate(await waiting.view_of(service.ledger, task_id, record))
    if wait and waiting.outcome_of(record.state) is None:
        return JSONResponse(view.model_dump(mode="json"), 202)
    return view


class WaitingRecord(BaseModel):
    task_id: str
    why: str = Field(description="budget, endpoint, window, refused (a call the endpoint refused, given back) "
                     "or backoff, with what it waits for now when known (the breaker, Retry-After, ...)")
    waited_s: float
    ends_in_s: float | None = Field(description="seconds until the wait ends by an outcome (a call, or a dead "
                                    "letter `unavailable`, `budget` or `expired`)")


@router.get("/waiting", response_model=list[WaitingRecord], dependencies=Reader, tags=["ops"],
            responses=error_responses(401, 403, 503))
async def list_waiting(service: ServiceDep,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[WaitingRecord]:
    """The records of this process that wait before a model call, the longest first: why, and until when."""
    waits = service.processor.waits
    now = waits.clock()
    return [WaitingRecord(task_id=w.task, why=w.describe(), waited_s=round(now - w.since, 3),
                          ends_in_s=None if w.until is None else round(w.until - now, 3))
            for w in waits.snapshot()[:limit]]


@router.get(
    "/dlq", response_model=list[dlq.DeadLetter], dependencies=Reader, tags=["dead letters"],
    responses=error_responses(401, 403, 429, 503),
)
async def list_dead_letters(
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    partition: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> list[dlq.DeadLetter]:
    try:
        return await peeking.peek(service.settings.kafka, limit, partition)
    except peeking.PeekBusy:
        raise HTTPException(429, DLQ_BUSY, headers={"Retry-After": "1"}) from None


@router.post(
    "/dlq/replay", response_model=dlq.ReplayReport, dependencies=Admin, tags=["dead letters"],
    responses=error_responses(401, 403, 503),
)
async def replay_dead_letters(service: ServiceDep, body: ReplayRequest) -> dlq.ReplayReport:
    selection = [(i.partition, i.offset) for i in body.items] if body.items is not None else None
    reasons = {body.reason} if body.reason is not None else None
    report = await dlq.replay(service.settings.kafka, service.ledger, selection, reasons, body.limit)
    log.info("dlq replay: replayed=%d already_succeeded=%d not_found=%d failed=%d",
             report.replayed, report.already_succeeded, report.not_found, report.failed)
    return report


# ---------------------------------------------------------------------------- helpers


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = HTTPException(413, f"body is larger than {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _invalid(loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg}])


def _parse_event(body: bytes) -> TaskEvent:
    try:
        data = loads(body)
    except (ValueError, RecursionError) as exc:
        raise _invalid(("body",), f"body is not JSON: {str(exc)[:200]}", "json_invalid") from exc
    try:
        return TaskEvent.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([
            {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]) from exc


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    what = "redis" if isinstance(exc, LedgerUnavailable) else "kafka"
    log.warning("%s %s: %s unavailable: %s", request.method, request.url.path, what, exc)
    return JSONResponse({"detail": f"{what} is unavailable"}, status_code=503)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _version() -> str:
    try:
        return version("agent-service")
    except PackageNotFoundError:
        return "0.0.0"


def create_starting_app(checks: Callable[[], dict[str, bool]]) -> FastAPI:
    """The app of a process still waiting for its dependencies: ``/healthz`` answers 200,
    ``/readyz`` 503 with a check per dependency (``started`` false), everything else 503."""
    app = FastAPI(title="agent-service", version=_version())

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def starting_healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, status_code=503, tags=["ops"])
    async def starting_readyz() -> JSONResponse:
        body = Readiness(ready=False, status="unready", checks=dict(checks()))
        return JSONResponse(body.model_dump(), status_code=503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def starting(path: str) -> JSONResponse:
        return JSONResponse({"detail": "starting: waiting for its dependencies"}, status_code=503)

    return app


def create_app(service: Served, *, registry: CollectorRegistry | None = None,
               consumer_checks: Callable[[], dict[str, bool]] | None = None) -> FastAPI:
    """The app for ``service``. A supervisor of several workers (:mod:`service.runtime.fleet`) hands in
    the ``registry`` that adds up their metrics and the ``consumer_checks`` of its readiness, in place
    of ``service``'s own registry and its consumer's assignment."""
    app = FastAPI(title="agent-service", version=_version())
    app.add_middleware(RejectControlCharacters)
    app.state.service = service
    app.state.registry = registry
    app.state.consumer_checks = consumer_checks
    app.state.broker_probe = BrokerProbe(service.settings.kafka)
    app.include_router(effects_router)  # before the catch-all /tasks/{task_id:path}
    app.include_router(router)
    app.include_router(sessions_router)
    app.include_router(schedules_router)
    console.install(app)
    app.include_router(session_pages_router)
    app.include_router(console_schedules.router)
    for exc_type in (LedgerUnavailable, KafkaException, ProduceFailed):
        app.add_exception_handler(exc_type, _unavailable)
    app.add_exception_handler(Exception, _internal)
    return app
