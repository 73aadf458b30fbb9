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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.util.re import parse_env_headers

from service.core.spans import (
    AGENT_ATTEMPT,
    AGENT_STEP,
    GEN_AI_OPERATION,
    GEN_AI_PROVIDER,
    GEN_AI_REQUEST_MODEL,
    MESSAGING_DESTINATION,
    MESSAGING_GROUP,
    MESSAGING_OFFSET,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_PARTITION,
    MESSAGING_SYSTEM,
    NOOP_LLM_SPAN,
    NOOP_TASK_SPAN,
    PROPAGATOR,
    TASK_KEY,
    TASK_KIND,
    TASK_SPAN_KEY,
    TRACEPARENT_HEADER,
    LiveLLMSpan,
    LiveTaskSpan,
    LLMSpan,
    TaskSpan,
    traceparent_of,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter


log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME: Final = "agent-service"
DEFAULT_OTLP_ENDPOINT: Final = "http://localhost:4318"
TRACES_PATH: Final = "v1/traces"
SUPPORTED_EXPORTERS: Final = ("otlp", "console")

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


# ---------------------------------------------------------------------------------- the tracer


class Tracing:
    """The pipeline's tracer. ``Tracing(provider)`` traces with that provider; ``Tracing()`` is off.
    ``consumer_group``: the group the task spans name (``messaging.consumer.group.name``)."""

    __slots__ = ("_group", "_provider", "_shut", "_tracer")

    def __init__(self, provider: TracerProvider | None = None, *, consumer_group: str | None = None) -> None:
        self._provider = provider
        self._group = consumer_group
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

    def name_group(self, consumer_group: str) -> None:
        """The consumer group the task spans name, when it was not known at construction."""
        self._group = self._group or consumer_group

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
            ctx = PROPAGATOR.extract({TRACEPARENT_HEADER: traceparent}, context=Context())
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
        PROPAGATOR.inject(carrier)
        return carrier.get(TRACEPARENT_HEADER)

    def current_traceparent(self) -> str | None:
        """The traceparent of the current task span, for results and dead letters; None when off.

        Outside a task span it is that of the current span, if any.
        """
        if self._tracer is None:
            return None
        span = otel_context.get_value(TASK_SPAN_KEY)
        if isinstance(span, Span):
            return traceparent_of(span)
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
            return NOOP_TASK_SPAN
        attributes: dict[str, str | int] = {
            MESSAGING_SYSTEM: "kafka", MESSAGING_OPERATION_TYPE: "process", MESSAGING_OPERATION_NAME: "process",
        }
        if record_coordinates is not None:
            topic, partition, offset = record_coordinates
            attributes[MESSAGING_DESTINATION] = topic
            attributes[MESSAGING_PARTITION] = str(partition)
            attributes[MESSAGING_OFFSET] = offset
        if self._group:
            attributes[MESSAGING_GROUP] = self._group
        if task_key:
            attributes[TASK_KEY] = task_key
        if kind:
            attributes[TASK_KIND] = kind
        name = f"agent.task {kind}" if kind else "agent.task"
        parent = self.extract(traceparent) or Context()
        return LiveTaskSpan(tracer, name, parent, attributes)

    def llm_span(
        self, model: str, operation: str = "chat", *, step: str | None = None, attempt: int | None = None
    ) -> LLMSpan:
        """A CLIENT span ``{operation} {model}``, the child of the current span (the task's)."""
        tracer = self._tracer
        if tracer is None:
            return NOOP_LLM_SPAN
        attributes: dict[str, str | int] = {
            GEN_AI_OPERATION: operation,
            GEN_AI_PROVIDER: "openai",  # the API spoken; llama.cpp's server speaks it too
            GEN_AI_REQUEST_MODEL: model,
        }
        if step is not None:
            attributes[AGENT_STEP] = step
        if attempt is not None:
            attributes[AGENT_ATTEMPT] = attempt
        return LiveLLMSpan(tracer, f"{operation} {model}", SpanKind.CLIENT, None, attributes)

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
