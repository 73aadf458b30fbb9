"""Tracing: span tree, attributes, W3C traceparent in and out, errors, the off switch, OTEL_* parsing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, StatusCode

from service.core.spans import LLMSpan, TaskSpan
from service.core.tracing import Tracing, TracingConfig

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
INCOMING = f"00-{TRACE_ID}-{PARENT_ID}-01"
COORDS = ("agent.tasks", 3, 42)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tracing]:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = Tracing(provider=provider, consumer_group="workers")
    yield t
    t.shutdown()


def only(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


# ------------------------------------------------------------------------------ spans and attributes


def test_task_span_has_its_name_kind_and_attributes(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    with tracing.task_span("t-1", "summarize", COORDS, None) as span:
        assert span.recording
        span.set_decision("claimed")
        span.set_fence(7)
        span.set_attempts(2)
        span.set_input_digest("sha256:in")
        span.set_output_digest("sha256:out")
        span.set_outcome("succeeded")

    (task,) = exporter.get_finished_spans()
    assert task.name == "agent.task summarize"
    assert task.kind is SpanKind.CONSUMER
    assert task.parent is None
    assert task.status.status_code is StatusCode.UNSET
    assert dict(task.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": "agent.tasks",
        "messaging.destination.partition.id": "3",
        "messaging.kafka.offset": 42,
        "messaging.consumer.group.name": "workers",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "agent.task.key": "t-1",
        "agent.task.kind": "summarize",
        "agent.ledger.decision": "claimed",
        "agent.ledger.fence": 7,
        "agent.task.attempts": 2,
        "agent.task.input_digest": "sha256:in",
        "agent.task.result_digest": "sha256:out",
        "agent.task.outcome": "succeeded",
    }


def test_task_named_after_decoding_renames_the_span(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    with tracing.task_span(None, None, COORDS) as span:
        span.set_task("t-2", "classify")
    (task,) = exporter.get_finished_spans()
    assert task.name == "agent.task classify"
    attributes = task.attributes or {}
    assert attributes["agent.task.key"] == "t-2"
    assert attributes["agent.task.kind"] == "classify"


def test_llm_span_is_a_client_child_of_the_task_span(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    with tracing.task_span("t-1", "summarize", COORDS, None), \
            tracing.llm_span("smollm2", step="draft", attempt=1) as call:
        assert isinstance(call, LLMSpan)
        call.set_response("smollm2-q4", "stop", 120, 35)

    spans = exporter.get_finished_spans()
    task = only(spans, "agent.task summarize")
    llm = only(spans, "chat smollm2")
    assert llm.kind is SpanKind.CLIENT
    assert llm.parent is not None
    assert ids(llm)[0] == ids(task)[0]
    assert f"{llm.parent.span_id:016x}" == ids(task)[1]
    assert dict(llm.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "smollm2",
        "gen_ai.response.model": "smollm2-q4",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 35,
        "agent.step": "draft",
        "agent.attempt": 1,
    }


def test_none_values_are_left_out(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    with tracing.task_span("t-1", "summarize", None), tracing.llm_span("m", operation="text_completion") as call:
        call.set_response(None, None, None, None)
    spans = exporter.get_finished_spans()
    llm = only(spans, "text_completion m")
    assert set(llm.attributes or {}) == {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model"}
    task = only(spans, "agent.task summarize")
    assert "messaging.destination.name" not in (task.attributes or {})


def test_spans_follow_each_task_across_await(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    """Two tasks interleaved on one loop: each LLM span is the child of its own task's span."""

    async def one(key: str) -> None:
        with tracing.task_span(key, "summarize", COORDS, None):
            await asyncio.sleep(0)
            with tracing.llm_span(f"model-{key}", step="s", attempt=1):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
            # a task started inside the span inherits it
            await asyncio.create_task(inner(key))

    async def inner(key: str) -> None:
        with tracing.llm_span(f"inner-{key}", step="s", attempt=2):
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(one("a"), one("b"))

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    tasks = {(s.attributes or {})["agent.task.key"]: s for s in spans if s.kind is SpanKind.CONSUMER}
    assert set(tasks) == {"a", "b"}
    assert ids(tasks["a"])[0] != ids(tasks["b"])[0]
    for key, task in tasks.items():
        for name in (f"chat model-{key}", f"chat inner-{key}"):
            llm = only(spans, name)
            assert llm.parent is not None
            assert f"{llm.parent.span_id:016x}" == ids(task)[1]
            assert ids(llm)[0] == ids(task)[0]


# ------------------------------------------------------------------------------ W3C trace context


def test_incoming_traceparent_parents_the_task_span_and_comes_back_out(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.task_span("t-1", "summarize", COORDS, INCOMING) as span:
        outgoing = tracing.current_traceparent()
        assert outgoing == span.traceparent
        with tracing.llm_span("smollm2", step="draft", attempt=1) as call:
            # results and dead letters carry the task span; the LLM request carries its own span
            assert tracing.current_traceparent() == outgoing
            llm_header = tracing.inject()
            assert llm_header == call.traceparent

    spans = exporter.get_finished_spans()
    task = only(spans, "agent.task summarize")
    llm = only(spans, "chat smollm2")
    trace_id, span_id = ids(task)
    assert trace_id == TRACE_ID
    assert task.parent is not None
    assert task.parent.is_remote
    assert f"{task.parent.span_id:016x}" == PARENT_ID
    assert outgoing == f"00-{TRACE_ID}-{span_id}-01"
    assert llm_header == f"00-{TRACE_ID}-{ids(llm)[1]}-01"


def test_extract_and_inject_round_trip(tracing: Tracing) -> None:
    ctx = tracing.extract(INCOMING)
    assert ctx is not None
    with tracing.task_span("t-1", "summarize", COORDS, INCOMING):
        header = tracing.inject()
    assert header is not None
    version, trace_id, _span_id, flags = header.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert tracing.inject() is None  # no current span outside
    assert tracing.current_traceparent() is None


def test_unsampled_flag_is_kept(tracing: Tracing) -> None:
    with tracing.task_span("t-1", "summarize", COORDS, f"00-{TRACE_ID}-{PARENT_ID}-00"):
        header = tracing.current_traceparent()
    # ALWAYS_ON samples it here; the trace id is the caller's either way
    assert header is not None
    assert header.split("-")[1] == TRACE_ID


MALFORMED = [
    "",
    "garbage",
    f"00-{TRACE_ID}-{PARENT_ID}",  # no flags
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper case
    f"ff-{TRACE_ID}-{PARENT_ID}-01",  # forbidden version
    f"00-{'0' * 32}-{PARENT_ID}-01",  # zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",  # zero span id
    f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has no more fields
    f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",  # short trace id
    "00-" + "a" * 600,  # over-long
    "\x00\xff-\u2603",
]


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_traceparent_is_ignored(tracing: Tracing, exporter: InMemorySpanExporter, value: str) -> None:
    assert tracing.extract(value) is None
    with tracing.task_span("t-1", "summarize", COORDS, value):
        outgoing = tracing.current_traceparent()
    (task,) = exporter.get_finished_spans()
    assert task.parent is None  # a new trace
    assert outgoing is not None
    assert outgoing.split("-")[1] == ids(task)[0] != TRACE_ID


def test_non_string_traceparent_is_ignored(tracing: Tracing) -> None:
    assert tracing.extract(None) is None
    assert tracing.extract(b"00-" + TRACE_ID.encode() + b"-" + PARENT_ID.encode() + b"-01") is None  # type: ignore[arg-type]
    assert tracing.extract(123) is None  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ errors


def test_record_error_sets_status_error(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    with tracing.task_span("t-1", "summarize", COORDS) as span:
        span.record_error(ValueError("bad output"))
        span.set_outcome("dead_lettered")
    (task,) = exporter.get_finished_spans()
    assert task.status.status_code is StatusCode.ERROR
    assert task.status.description == "ValueError: bad output"
    assert (task.attributes or {})["error.type"] == "ValueError"
    assert [e.name for e in task.events] == ["exception"]
    assert (task.events[0].attributes or {})["exception.type"] == "ValueError"


def test_escaping_exception_is_recorded_once_and_re_raised(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    boom = RuntimeError("endpoint unreachable")
    with pytest.raises(RuntimeError), tracing.task_span("t-1", "summarize", COORDS) as span, \
            tracing.llm_span("smollm2", step="draft", attempt=1) as call:
        call.record_error(boom)  # recorded by hand, then escapes: still one event
        span.set_decision("claimed")
        raise boom
    spans = exporter.get_finished_spans()
    for s in spans:
        assert s.status.status_code is StatusCode.ERROR
        assert [e.name for e in s.events] == ["exception"]
    assert tracing.current_traceparent() is None  # the context was restored


def test_long_error_message_is_cut(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    with tracing.llm_span("m") as call:
        call.record_error(ValueError("x" * 1000))
    (llm,) = exporter.get_finished_spans()
    assert llm.status.description is not None
    assert len(llm.status.description) == 300


def test_cancellation_is_not_an_error(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    async def work() -> None:
        with tracing.task_span("t-1", "summarize", COORDS), tracing.llm_span("m"):
            await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.create_task(work())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    assert {s.status.status_code for s in spans} == {StatusCode.UNSET}
    assert (only(spans, "agent.task summarize").attributes or {})["agent.task.outcome"] == "cancelled"


# ------------------------------------------------------------------------------ off


def test_disabled_creates_nothing_and_propagates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import opentelemetry.context
    import opentelemetry.sdk.trace
    import opentelemetry.trace

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("tracing is off: no span or context may be made")

    monkeypatch.setattr(opentelemetry.sdk.trace.Span, "__init__", forbidden)
    monkeypatch.setattr(opentelemetry.trace.NonRecordingSpan, "__init__", forbidden)
    monkeypatch.setattr(opentelemetry.context, "attach", forbidden)
    tracing = Tracing.disabled()
    assert not tracing.enabled
    first = tracing.task_span("t-1", "summarize", COORDS, INCOMING)
    assert first is tracing.task_span("t-2", "other", COORDS, None)  # one shared object
    assert type(first) is TaskSpan
    with first as span:
        assert not span.recording
        for setter in (span.set_decision, span.set_input_digest, span.set_output_digest, span.set_outcome):
            setter("x")
        span.set_fence(1)
        span.set_attempts(1)
        span.set_task("t", "k")
        span.record_error(ValueError("x"))
        assert span.traceparent is None
        assert tracing.current_traceparent() is None
        assert tracing.inject() is None
        with tracing.llm_span("m", step="s", attempt=1) as call:
            assert type(call) is LLMSpan
            call.set_response("m", "stop", 1, 2)
            call.record_error(ValueError("x"))
            assert call.traceparent is None
    assert tracing.extract(INCOMING) is None
    with pytest.raises(KeyError), tracing.task_span("t", "k", COORDS):
        raise KeyError("passes through")
    tracing.shutdown()


def test_from_env_with_nothing_set_is_off() -> None:
    tracing = Tracing.from_env({})
    assert not tracing.enabled
    assert tracing.provider is None


# ------------------------------------------------------------------------------ environment


@pytest.mark.parametrize(
    ("environ", "enabled"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "OTLP, console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": ""}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, False),  # not available here
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": " TRUE ", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_switch(environ: dict[str, str], enabled: bool) -> None:
    assert TracingConfig.from_env(environ).enabled is enabled


def test_exporters_and_endpoints() -> None:
    c = TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert c.exporters == ("otlp",)
    assert c.endpoint == "http://collector:4318/v1/traces"
    c = TracingConfig.from_env({
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/custom",
    })
    assert c.endpoint == "https://traces.example/custom"
    c = TracingConfig.from_env({"OTEL_TRACES_EXPORTER": "console,zipkin,console"})
    assert c.exporters == ("console",)
    assert TracingConfig.from_env({"OTEL_TRACES_EXPORTER": "otlp"}).endpoint == "http://localhost:4318/v1/traces"


def test_headers_and_service_name() -> None:
    c = TracingConfig.from_env({
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-tenant=t1",
    })
    assert dict(c.headers) == {"authorization": "Bearer abc", "x-tenant": "t1"}
    assert c.service_name == "agent-service"
    c = TracingConfig.from_env({
        "OTEL_EXPORTER_OTLP_HEADERS": "a=1",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "b=2",
    })
    assert dict(c.headers) == {"b": "2"}
    c = TracingConfig.from_env({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,deployment.environment=prod%20eu"})
    assert c.service_name == "from-attrs"
    assert c.resource_attributes["deployment.environment"] == "prod eu"
    c = TracingConfig.from_env({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs", "OTEL_SERVICE_NAME": "named"})
    assert c.service_name == "named"


@pytest.mark.parametrize("exporters", ["otlp", "console", "otlp,console"])
def test_from_env_builds_a_provider_of_its_own(monkeypatch: pytest.MonkeyPatch, exporters: str) -> None:
    import opentelemetry.trace as api

    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    before = api.get_tracer_provider()
    tracing = Tracing.from_env({
        "OTEL_TRACES_EXPORTER": exporters,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_SERVICE_NAME": "worker-7",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    })
    try:
        assert tracing.enabled
        provider = tracing.provider
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "worker-7"
        assert provider.resource.attributes["deployment.environment"] == "test"
        assert api.get_tracer_provider() is before  # the global provider is left alone
    finally:
        tracing.shutdown()  # nothing buffered: returns without reaching the endpoint
    tracing.shutdown()  # twice is fine


def test_shutdown_flushes_buffered_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    tracing = Tracing(provider=provider)
    with tracing.task_span("t-1", "summarize", COORDS):
        pass
    assert exporter.get_finished_spans() == ()
    assert tracing.shutdown() is True
    assert [s.name for s in exporter.get_finished_spans()] == ["agent.task summarize"]


class _StuckExporter(SpanExporter):
    """An exporter whose collector does not answer until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported: list[str] = []
        self.stopped = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported += [s.name for s in spans]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.stopped.set()


def test_shutdown_does_not_wait_past_its_timeout_for_a_dead_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    exporter = _StuckExporter()
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    tracing = Tracing(provider=provider)
    with tracing.task_span("t-1", "summarize", COORDS):
        pass
    started = time.monotonic()
    assert tracing.shutdown(timeout_s=0.2) is False
    assert time.monotonic() - started < 2
    exporter.release.set()  # the collector answers after all: the export still completes
    assert exporter.stopped.wait(5)
    assert exporter.exported == ["agent.task summarize"]
