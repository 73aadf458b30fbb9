"""OpenTelemetry tracing: one span per task record, one per LLM call, W3C ``traceparent`` in and out.

Off unless the standard ``OTEL_*`` variables ask for an exporter (:meth:`Tracing.from_env`). When
off, every hook returns a shared no-op object: no span, context or dict is created, and the SDK is
not even imported. The global tracer provider is never set: spans come from this object's own
provider, and the current span travels in the OpenTelemetry context (contextvars), so it follows
a task across ``await`` and into the asyncio tasks it starts.

The hooks, one line each::

    with tracing.task_span(task.key, task.kind, (record.topic, record.partition, record.offset),
                           task.traceparent) as span:
        span.set_decision(claim.decision)
        ...
        with tracing.llm_span(model, step=step.name, attempt=attempt.step) as call:
            answer = await llm.chat(request)
            call.set_response(answer.model, answer.finish_reason, answer.prompt_tokens,
                              answer.completion_tokens)
        ...
        await outputs.result(record, task.key, event, tracing.current_traceparent() or task.traceparent)

An exception that leaves a ``with`` block is recorded on its span (status ERROR) and re-raised;
:meth:`TaskSpan.record_error` records one that the pipeline handles itself (a dead letter).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.re import parse_env_headers

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME: Final = "agent-service"
DEFAULT_OTLP_ENDPOINT: Final = "http://localhost:4318"
TRACES_PATH: Final = "v1/traces"
SUPPORTED_EXPORTERS: Final = ("otlp", "console")

# attributes of the task span
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_PARTITION: Final = "messaging.kafka.destination.partition"
MESSAGING_OFFSET: Final = "messaging.kafka.message.offset"
TASK_KEY: Final = "agent.task.key"
TASK_KIND: Final = "agent.task.kind"
LEDGER_DECISION: Final = "agent.ledger.decision"
LEDGER_FENCE: Final = "agent.ledger.fence"
TASK_ATTEMPTS: Final = "agent.task.attempts"
TASK_INPUT_DIGEST: Final = "agent.task.input_digest"
TASK_RESULT_DIGEST: Final = "agent.task.result_digest"
TASK_OUTCOME: Final = "agent.task.outcome"
# attributes of the LLM span (GenAI semantic conventions)
GEN_AI_OPERATION: Final = "gen_ai.operation.name"
GEN_AI_SYSTEM: Final = "gen_ai.system"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
AGENT_STEP: Final = "agent.step"
AGENT_ATTEMPT: Final = "agent.attempt"
# both
ERROR_TYPE: Final = "error.type"

_MAX_STATUS_CHARS = 300
_TRACEPARENT = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()
# the task span of the current context, whatever span is current below it
_TASK_SPAN_KEY = otel_context.create_key("agent-task-span")


# ---------------------------------------------------------------------------------- configuration


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _resource_attributes(raw: str) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES``: ``key=value`` pairs, comma separated, percent-encoded."""
    attributes: dict[str, str] = {}
    for pair in raw.split(","):
        key, sep, value = pair.partition("=")
        key = unquote(key.strip())
        if sep and key:
            attributes[key] = unquote(value.strip())
    return attributes


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What the ``OTEL_*`` variables ask for; :meth:`from_env` never fails and never raises."""

    enabled: bool = False
    exporters: tuple[str, ...] = ()  # from SUPPORTED_EXPORTERS
    service_name: str = DEFAULT_SERVICE_NAME
    endpoint: str = f"{DEFAULT_OTLP_ENDPOINT}/{TRACES_PATH}"  # the full OTLP/HTTP traces URL
    headers: Mapping[str, str] = field(default_factory=dict)
    resource_attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TracingConfig:
        """On when an OTLP endpoint is set or ``OTEL_TRACES_EXPORTER`` names an exporter.

        ``OTEL_SDK_DISABLED=true`` and ``OTEL_TRACES_EXPORTER=none`` force it off. Of the exporters
        only ``otlp`` (HTTP/protobuf) and ``console`` exist here; others are logged and skipped.
        """
        def get(name: str) -> str:
            return (environ.get(name) or "").strip()

        resource = _resource_attributes(get("OTEL_RESOURCE_ATTRIBUTES"))
        service_name = get("OTEL_SERVICE_NAME") or resource.get("service.name") or DEFAULT_SERVICE_NAME
        traces_endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        base_endpoint = get("OTEL_EXPORTER_OTLP_ENDPOINT")
        endpoint = traces_endpoint or f"{(base_endpoint or DEFAULT_OTLP_ENDPOINT).rstrip('/')}/{TRACES_PATH}"
        headers = parse_env_headers(
            get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or get("OTEL_EXPORTER_OTLP_HEADERS"), liberal=True
        )
        config = cls(
            enabled=False, service_name=service_name, endpoint=endpoint, headers=headers,
            resource_attributes=resource,
        )

        if _truthy(environ.get("OTEL_SDK_DISABLED")):
            return config
        names = [n.strip().lower() for n in get("OTEL_TRACES_EXPORTER").split(",") if n.strip()]
        if "none" in names:
            return config
        if not names:
            if not (traces_endpoint or base_endpoint):
                return config
            names = ["otlp"]
        exporters: list[str] = []
        for name in names:
            if name not in SUPPORTED_EXPORTERS:
                log.warning("OTEL_TRACES_EXPORTER: exporter %r is not available; ignored", name)
            elif name not in exporters:
                exporters.append(name)
        if not exporters:
            log.warning("OTEL_TRACES_EXPORTER names no available exporter; tracing is off")
            return config
        if "otlp" in exporters:
            protocol = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol and protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not available; exporting over http/protobuf", protocol)
        return cls(
            enabled=True, exporters=tuple(exporters), service_name=service_name, endpoint=endpoint,
            headers=headers, resource_attributes=resource,
        )


# ---------------------------------------------------------------------------------- span handles


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _MAX_STATUS_CHARS else text[: _MAX_STATUS_CHARS - 3] + "..."


def _traceparent_of(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span, Context()))
    return carrier.get(_TRACEPARENT)


class TaskSpan:
    """The span of one task record. This base class is the no-op handle used when tracing is off.

    A context manager: entering it makes the span current, leaving it ends the span. One use only.
    """

    __slots__ = ()

    def __enter__(self) -> TaskSpan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    @property
    def recording(self) -> bool:
        return False

    @property
    def traceparent(self) -> str | None:
        """The W3C traceparent of this span (None when off)."""
        return None

    def set_task(self, task_key: str, kind: str) -> None:
        """Name the task when it was decoded after the span started (renames the span)."""

    def set_decision(self, decision: str) -> None:
        """The ledger's answer to the claim: claimed, succeeded, busy, conflict, dead."""

    def set_fence(self, fence: int) -> None:
        pass

    def set_attempts(self, attempts: int) -> None:
        pass

    def set_input_digest(self, value: str) -> None:
        pass

    def set_output_digest(self, value: str) -> None:
        pass

    def set_outcome(self, outcome: str) -> None:
        """succeeded, dead_lettered, duplicate, conflict, ..."""

    def record_error(self, exc: BaseException) -> None:
        """Record an exception and set the span's status to ERROR."""


class LLMSpan:
    """The span of one LLM request. This base class is the no-op handle used when tracing is off."""

    __slots__ = ()

    def __enter__(self) -> LLMSpan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    @property
    def recording(self) -> bool:
        return False

    @property
    def traceparent(self) -> str | None:
        """The W3C traceparent of this span, for the request's ``traceparent`` header (None when off)."""
        return None

    def set_response(
        self, model: str | None, finish_reason: str | None, input_tokens: int | None, output_tokens: int | None
    ) -> None:
        """What the endpoint answered; None values are left out."""

    def record_error(self, exc: BaseException) -> None:
        """Record an exception and set the span's status to ERROR."""


_NOOP_TASK_SPAN: Final = TaskSpan()
_NOOP_LLM_SPAN: Final = LLMSpan()


class _Live:
    """Start on enter, current while inside, end on exit; an escaping Exception is recorded."""

    __slots__ = ("_attributes", "_kind", "_name", "_parent", "_recorded", "_span", "_token", "_tracer")

    _is_task = False

    def __init__(
        self, tracer: Tracer, name: str, kind: SpanKind, parent: Context | None,
        attributes: dict[str, str | int],
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._kind = kind
        self._parent = parent
        self._attributes = attributes
        self._span: Span = trace.INVALID_SPAN
        self._token: Token[Context] | None = None
        self._recorded: BaseException | None = None

    def _enter(self) -> None:
        span = self._tracer.start_span(self._name, context=self._parent, kind=self._kind, attributes=self._attributes)
        ctx = trace.set_span_in_context(span)
        if self._is_task:
            ctx = otel_context.set_value(_TASK_SPAN_KEY, span, ctx)
        self._span = span
        self._token = otel_context.attach(ctx)

    def _exit(self, exc: BaseException | None) -> None:
        try:
            if isinstance(exc, Exception):
                self.record_error(exc)
            elif exc is not None:
                self._interrupted()
        finally:
            if self._token is not None:
                otel_context.detach(self._token)
                self._token = None
            self._span.end()

    def _interrupted(self) -> None:
        """Cancelled (or interrupted): not a failure of the work; the record comes back."""

    @property
    def recording(self) -> bool:
        return self._span.is_recording()

    @property
    def traceparent(self) -> str | None:
        return _traceparent_of(self._span)

    def _set(self, key: str, value: str | int | Sequence[str] | None) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def record_error(self, exc: BaseException) -> None:
        if exc is self._recorded:
            return
        self._recorded = exc
        span = self._span
        span.record_exception(exc)
        span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR, _describe(exc)))


class _LiveTaskSpan(_Live, TaskSpan):
    __slots__ = ("_outcome",)

    _is_task = True

    def __init__(
        self, tracer: Tracer, name: str, parent: Context, attributes: dict[str, str | int]
    ) -> None:
        super().__init__(tracer, name, SpanKind.CONSUMER, parent, attributes)
        self._outcome: str | None = None

    def __enter__(self) -> TaskSpan:
        self._enter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(exc)

    def _interrupted(self) -> None:
        if self._outcome is None:
            self.set_outcome("cancelled")

    def set_task(self, task_key: str, kind: str) -> None:
        self._set(TASK_KEY, task_key)
        self._set(TASK_KIND, kind)
        if kind:
            self._span.update_name(f"agent.task {kind}")

    def set_decision(self, decision: str) -> None:
        self._set(LEDGER_DECISION, decision)

    def set_fence(self, fence: int) -> None:
        self._set(LEDGER_FENCE, fence)

    def set_attempts(self, attempts: int) -> None:
        self._set(TASK_ATTEMPTS, attempts)

    def set_input_digest(self, value: str) -> None:
        self._set(TASK_INPUT_DIGEST, value)

    def set_output_digest(self, value: str) -> None:
        self._set(TASK_RESULT_DIGEST, value)

    def set_outcome(self, outcome: str) -> None:
        self._outcome = outcome
        self._set(TASK_OUTCOME, outcome)


class _LiveLLMSpan(_Live, LLMSpan):
    __slots__ = ()

    def __enter__(self) -> LLMSpan:
        self._enter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(exc)

    def set_response(
        self, model: str | None, finish_reason: str | None, input_tokens: int | None, output_tokens: int | None
    ) -> None:
        self._set(GEN_AI_RESPONSE_MODEL, model or None)
        self._set(GEN_AI_FINISH_REASONS, [finish_reason] if finish_reason else None)
        self._set(GEN_AI_INPUT_TOKENS, input_tokens)
        self._set(GEN_AI_OUTPUT_TOKENS, output_tokens)


# ---------------------------------------------------------------------------------- the tracer


class Tracing:
    """The pipeline's tracer. ``Tracing(provider)`` traces with that provider; ``Tracing()`` is off."""

    __slots__ = ("_provider", "_shut", "_tracer")

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider
        self._tracer: Tracer | None = provider.get_tracer(__name__) if provider is not None else None
        self._shut = False

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tracing:
        """Off unless the ``OTEL_*`` variables ask for it (:meth:`TracingConfig.from_env`).

        The switch, service name, resource attributes, endpoint and headers are read from
        ``environ``; the SDK itself reads the rest (sampler, batch sizes, exporter TLS, timeout and
        compression) from the process environment.
        """
        config = TracingConfig.from_env(environ)
        return cls.from_config(config) if config.enabled else cls.disabled()

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracing:
        if not config.enabled:
            return cls.disabled()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({**config.resource_attributes, "service.name": config.service_name})
        provider = TracerProvider(resource=resource)
        for name in config.exporters:
            provider.add_span_processor(BatchSpanProcessor(_exporter(name, config)))
        log.info("tracing on: service %s, exporters %s, endpoint %s",
                 config.service_name, ",".join(config.exporters), config.endpoint)
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @property
    def provider(self) -> TracerProvider | None:
        return self._provider

    # -- W3C trace context ---------------------------------------------------------------------

    def extract(self, traceparent: str | None) -> Context | None:
        """The context of a ``traceparent`` value; None when off, absent or malformed. Never raises."""
        if self._tracer is None or not traceparent or not isinstance(traceparent, str):
            return None
        try:
            ctx = _PROPAGATOR.extract({_TRACEPARENT: traceparent}, context=Context())
        except Exception:  # noqa: BLE001 - a bad header must never fail the record
            log.debug("ignored traceparent %r", traceparent, exc_info=True)
            return None
        if not trace.get_current_span(ctx).get_span_context().is_valid:
            return None
        return ctx

    def inject(self) -> str | None:
        """The traceparent of the current span (the LLM span inside one); None when off or none."""
        if self._tracer is None:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get(_TRACEPARENT)

    def current_traceparent(self) -> str | None:
        """The traceparent of the current task span, for results and dead letters; None when off.

        Outside a task span it is that of the current span, if any.
        """
        if self._tracer is None:
            return None
        span = otel_context.get_value(_TASK_SPAN_KEY)
        if isinstance(span, Span):
            return _traceparent_of(span)
        return self.inject()

    # -- spans ---------------------------------------------------------------------------------

    def task_span(
        self,
        task_key: str | None,
        kind: str | None,
        record_coordinates: tuple[str, int, int] | None,
        traceparent: str | None = None,
    ) -> TaskSpan:
        """A CONSUMER span ``agent.task {kind}``, the child of ``traceparent`` (else a new trace)."""
        tracer = self._tracer
        if tracer is None:
            return _NOOP_TASK_SPAN
        attributes: dict[str, str | int] = {MESSAGING_SYSTEM: "kafka"}
        if record_coordinates is not None:
            topic, partition, offset = record_coordinates
            attributes[MESSAGING_DESTINATION] = topic
            attributes[MESSAGING_PARTITION] = partition
            attributes[MESSAGING_OFFSET] = offset
        if task_key:
            attributes[TASK_KEY] = task_key
        if kind:
            attributes[TASK_KIND] = kind
        name = f"agent.task {kind}" if kind else "agent.task"
        parent = self.extract(traceparent) or Context()
        return _LiveTaskSpan(tracer, name, parent, attributes)

    def llm_span(
        self, model: str, operation: str = "chat", *, step: str | None = None, attempt: int | None = None
    ) -> LLMSpan:
        """A CLIENT span ``{operation} {model}``, the child of the current span (the task's)."""
        tracer = self._tracer
        if tracer is None:
            return _NOOP_LLM_SPAN
        attributes: dict[str, str | int] = {
            GEN_AI_OPERATION: operation,
            GEN_AI_SYSTEM: "openai",
            GEN_AI_REQUEST_MODEL: model,
        }
        if step is not None:
            attributes[AGENT_STEP] = step
        if attempt is not None:
            attributes[AGENT_ATTEMPT] = attempt
        return _LiveLLMSpan(tracer, f"{operation} {model}", SpanKind.CLIENT, None, attributes)

    # -- lifecycle -----------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Export the buffered spans and stop the exporters; True when done within ``timeout_s``.

        Blocks (from async code: ``await asyncio.to_thread(tracing.shutdown)``). An unreachable
        collector is not waited for past ``timeout_s``: the exporter's retries go on in a daemon
        thread that ends with the process. Safe to call more than once.
        """
        provider = self._provider
        if provider is None or self._shut:
            return True
        self._shut = True
        stopper = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        if stopper.is_alive():
            log.warning("tracing: spans still unexported after %.1fs; giving up on them", timeout_s)
            return False
        return True


def _exporter(name: str, config: TracingConfig) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=config.service_name)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers))
