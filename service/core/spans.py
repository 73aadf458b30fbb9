"""The span handles of :mod:`service.core.tracing`: a task record's span and an LLM call's.

:class:`TaskSpan` and :class:`LLMSpan` are the no-op handles used when tracing is off; the live
ones start their span on enter, make it current, and end it on exit, recording an escaping error.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import Token
from types import TracebackType
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Attribute names: OpenTelemetry semantic conventions v1.44.0 (the registry of the
# opentelemetry-semantic-conventions package 0.66b2): messaging (Kafka) and GenAI, both "development"
# status there. They replace messaging.kafka.destination.partition (an int; now the partition id as a
# string), messaging.kafka.message.offset and gen_ai.system; v1.45.0 renames the Kafka ones again
# (messaging.system.name, kafka.offset), not followed here until the messaging conventions settle.
# attributes of the task span
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_PARTITION: Final = "messaging.destination.partition.id"
MESSAGING_OFFSET: Final = "messaging.kafka.offset"
MESSAGING_GROUP: Final = "messaging.consumer.group.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
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
GEN_AI_PROVIDER: Final = "gen_ai.provider.name"
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
TRACEPARENT_HEADER = "traceparent"
PROPAGATOR = TraceContextTextMapPropagator()
# the task span of the current context, whatever span is current below it
TASK_SPAN_KEY = otel_context.create_key("agent-task-span")





def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _MAX_STATUS_CHARS else text[: _MAX_STATUS_CHARS - 3] + "..."


def traceparent_of(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span, Context()))
    return carrier.get(TRACEPARENT_HEADER)


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


NOOP_TASK_SPAN: Final = TaskSpan()
NOOP_LLM_SPAN: Final = LLMSpan()


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
            ctx = otel_context.set_value(TASK_SPAN_KEY, span, ctx)
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
        return traceparent_of(self._span)

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


class LiveTaskSpan(_Live, TaskSpan):
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


class LiveLLMSpan(_Live, LLMSpan):
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
