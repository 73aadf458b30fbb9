"""Property-based fuzzing of the HTTP app from its own OpenAPI document (schemathesis).

The service runs against the real broker and redis-server with its consumer started, so
readiness can pass and writes reach the broker. Every operation gets schema-valid and
schema-violating requests; guarded operations go with a token on some runs and without it on
others (reads with the read token, writes with the admin token). Nothing may answer 5xx, and every answer must match the schema the spec declares
for its status code.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from service.api import waiting
from service.api.app import create_app
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import Service
from tests.support import metric, produce, running, wait_for

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer s3cret"}
READ = {"Authorization": "Bearer r3ad-fuzz"}
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
EXAMPLES = {schemathesis.GenerationMode.POSITIVE: 30, schemathesis.GenerationMode.NEGATIVE: 30}
KNOWN_TASK = "fuzz-known"
LABELS = ["complaint", "praise", "question"]
VALID_TASK: dict[str, Any] = {"task_id": KNOWN_TASK, "kind": "classify",
                              "input": {"text": "the lid was cracked", "labels": LABELS}}
BUDGET_S = 60.0  # for the fuzzing itself; the whole test is cut off at 90 s

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Coroutine[Any, Any, Message]]
Send = Callable[[Message], Coroutine[Any, Any, None]]
ASGIApp = Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]]


class OnLoop:
    """Runs every HTTP call of ``app`` on ``loop``, where the service's redis client and consumer live.

    schemathesis drives ASGI apps from an event loop of its own; the service's asyncio objects
    must only be used from the loop that made them.
    """

    def __init__(self, app: ASGIApp, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan: the service is started and stopped by the test
        here = asyncio.get_running_loop()

        async def receive_here() -> Message:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), here))

        async def send_here(message: Message) -> None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(message), here))

        call = self.app(scope, receive_here, send_here)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self.loop))


@pytest.fixture
def live_service(make_settings: Any, fake_llm: FakeLLM) -> Iterator[tuple[Service, asyncio.AbstractEventLoop]]:
    """A running service on an event loop in a thread of its own, with one finished task and one dead letter."""
    s: Settings = make_settings(read_token="r3ad-fuzz")
    started: concurrent.futures.Future[tuple[Service, asyncio.AbstractEventLoop, asyncio.Event]] = (
        concurrent.futures.Future()
    )

    async def main() -> None:
        async with running(s, fake_llm.base_url) as service:
            records = [(KNOWN_TASK.encode(), json.dumps(VALID_TASK).encode()), (b"fuzz-poison", b"{not json")]
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            await wait_for(
                lambda: metric(service, "agent_tasks_total", {"outcome": "succeeded"}) == 1
                and metric(service, "agent_dead_letters_total", {"reason": "decode"}) == 1,
                30, what="a finished task and a dead letter",
            )
            stop = asyncio.Event()
            started.set_result((service, asyncio.get_running_loop(), stop))
            await stop.wait()

    failure: list[BaseException] = []

    def serve() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            if started.done():
                failure.append(exc)
            else:
                started.set_exception(exc)

    thread = threading.Thread(target=serve, name="service-loop", daemon=True)
    thread.start()
    service, loop, stop = started.result(timeout=90)
    try:
        yield service, loop
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(90)
        assert not thread.is_alive(), "the service did not stop"
        if failure:
            raise failure[0]


def known_data(op: Any, mode: schemathesis.GenerationMode) -> Any:
    """Examples that reach the success paths random data rarely finds: a valid task, a known task id."""
    if mode is not schemathesis.GenerationMode.POSITIVE:
        return None
    if op.label == "POST /tasks":
        return op.as_strategy(body=VALID_TASK | {"task_id": None}) | op.as_strategy(body=VALID_TASK)
    if op.label == "GET /tasks/{task_id}":
        return op.as_strategy(path_parameters={"task_id": KNOWN_TASK})
    if op.label == "POST /dlq/replay":  # the schema cannot say "items or reason, not both": most bodies are 422
        return op.as_strategy(body={"reason": "decode", "limit": 1})
    return None


def fuzz_test(op: Any, mode: schemathesis.GenerationMode, max_examples: int,
              seen: dict[str, collections.Counter[str]]) -> Callable[[], None]:
    """A Hypothesis test of one operation; guarded ones go with their token on some examples only."""
    guarded = bool(op.definition.raw.get("security"))
    token = READ if op.label.startswith("GET ") else AUTH
    strategy = op.as_strategy(generation_mode=mode)
    if (known := known_data(op, mode)) is not None:
        strategy = strategy | known

    @settings(max_examples=max_examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.target],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy, authed=st.booleans())
    def fuzz(case: Any, authed: bool) -> None:
        # A negative case may drop the Authorization header on purpose; then no token goes out.
        authed = authed and not op.schema.is_security_param_negated(case)
        headers = token if authed else None
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        status = response.status_code
        seen[f"{op.label} ({'token' if authed else 'no token'})"][str(status)] += 1
        if not guarded:
            return
        request = case.as_curl_command(headers)
        if authed:
            assert status not in (401, 403), f"{request} -> {status} {response.text[:500]}"
        else:
            # FastAPI rejects an unparsable body (400/422) before it runs the token check
            assert status in (400, 401, 422), f"{request} -> {status} {response.text[:500]}"

    return fuzz


@pytest.fixture
def api_schema(live_service: tuple[Service, asyncio.AbstractEventLoop]) -> Iterator[Any]:
    """The app's OpenAPI document, loaded through the app itself, calling into the live service."""
    service, loop = live_service
    yield schemathesis.openapi.from_asgi("/openapi.json", OnLoop(create_app(service), loop))
    # schemathesis keeps every app it served alive; let this one (and its broker clients) go
    schemathesis_asgi.shutdown_lifespans()


@pytest.mark.timeout(90)
def test_every_operation_survives_fuzzing(api_schema: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waiting, "MAX_WAIT_S", 0.2)  # a generated ?wait= of up to 120 s would use the budget up
    schema = api_schema
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"GET /healthz", "GET /readyz", "GET /metrics", "POST /tasks", "GET /tasks/{task_id}",
            "GET /dlq", "POST /dlq/replay"} <= labels, labels

    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    deadline = time.monotonic() + BUDGET_S

    for mode, max_examples in EXAMPLES.items():
        for op in operations:
            raw = op.definition.raw
            if mode is schemathesis.GenerationMode.NEGATIVE and not (raw.get("parameters") or raw.get("requestBody")):
                continue  # nothing in the request to get wrong
            if time.monotonic() > deadline:
                pytest.fail(f"fuzzing took longer than {BUDGET_S}s; statuses so far: {dict(seen)}")
            try:
                fuzz_test(op, mode, max_examples, seen)()
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - gather every operation's failure, then report
                failures.append(f"{op.label} [{mode.value}]: {type(exc).__name__}: {exc}")

    summary = "\n".join(f"  {label}: {dict(counts)}" for label, counts in sorted(seen.items()))
    print(f"statuses:\n{summary}")
    assert not failures, "\n\n".join(failures) + f"\n\nstatuses:\n{summary}"
    # the success paths were reached, so their answers were checked against the schema too
    for label, status in [("GET /readyz", "200"), ("GET /tasks/{task_id}", "200"), ("POST /tasks", "202"),
                          ("GET /dlq", "200"), ("POST /dlq/replay", "200")]:
        assert seen[f"{label} (token)"][status] + seen[f"{label} (no token)"][status] > 0, (label, summary)
