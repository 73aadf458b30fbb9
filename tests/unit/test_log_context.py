"""JSON log lines carry the task's fields and the trace of its span, set once where the record is handled."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from pydantic import BaseModel

from consumers.records import Record
from service.agents.base import Agent, Step
from service.agents.registry import AgentRegistry
from service.core.log_context import TaskFields, bind_task, enter_record, json_formatter, leave_record
from service.core.metrics import Metrics
from service.core.tracing import Tracing
from service.pipeline.base import ProcessorConfig
from service.pipeline.processor import TaskProcessor

CLAIM_LOGGER = "service.pipeline.claim"


class Lines(logging.Handler):
    """The JSON lines a handler configured as ``configure_logging`` does would write."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(json_formatter())
        self.addFilter(TaskFields())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger(CLAIM_LOGGER)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


class Out(BaseModel):
    x: str


class One(Step):
    output_model = Out


class LoggingClaims:
    """Stands in for the ledger's claim: logs one line, as the claim does, and finds the task done."""

    async def claim(self, record: Record, task: object, ctx: str, first_attempt: object = None) -> None:
        logging.getLogger(CLAIM_LOGGER).info("already done")


def test_a_task_s_log_line_carries_the_trace_of_its_exported_span(lines: Lines) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    p = TaskProcessor.build(ledger=SimpleNamespace(), agents=AgentRegistry([Agent("echo", Out, (One(),))]),  # type: ignore[arg-type]
                            llm=SimpleNamespace(), outputs=SimpleNamespace(transactional=False),  # type: ignore[arg-type]
                            metrics=Metrics(), config=ProcessorConfig(), worker_id="w", model_name="m",
                            tracing=tracing)
    p.claims = LoggingClaims()  # type: ignore[assignment]
    event = {"task_id": "t-1", "kind": "echo", "input": {"x": "a"}}
    asyncio.run(p(Record("agent.tasks", 3, 42, b"t-1", json.dumps(event).encode())))
    tracing.shutdown()

    (span,) = exporter.get_finished_spans()
    ctx = span.get_span_context()
    assert ctx is not None
    (line,) = [line for line in lines.lines if line["msg"] == "already done"]
    assert line["trace_id"] == f"{ctx.trace_id:032x}" and line["span_id"] == f"{ctx.span_id:016x}"
    assert {k: line[k] for k in ("task_id", "kind", "topic", "partition", "offset")} == {
        "task_id": "t-1", "kind": "echo", "topic": "agent.tasks", "partition": 3, "offset": 42}
    assert line["level"] == "INFO" and line["logger"] == CLAIM_LOGGER


def test_fields_reach_the_tasks_a_record_starts_and_end_with_the_record(lines: Lines) -> None:
    log = logging.getLogger(CLAIM_LOGGER)

    async def scenario() -> None:
        token = enter_record("agent.tasks", 0, 7)
        try:
            child = asyncio.create_task(asyncio.sleep(0.01))  # started before the task is named
            bind_task("t-9", "summarize")
            await child
            await asyncio.create_task(asyncio.to_thread(log.info, "in a thread"))
            log.info("given", extra={"task_id": "from-extra", "attempt": 2})
        finally:
            leave_record(token)
        log.info("after")

    asyncio.run(scenario())
    thread, given, after = lines.lines
    assert thread["task_id"] == "t-9" and thread["kind"] == "summarize" and thread["offset"] == 7
    assert given["task_id"] == "from-extra" and given["attempt"] == 2, "extra is kept and wins"
    assert "task_id" not in after and "topic" not in after and "trace_id" not in after


def test_json_lines_keep_extra_and_exceptions(lines: Lines) -> None:
    log = logging.getLogger(CLAIM_LOGGER)
    try:
        raise ValueError("boom ✓")
    except ValueError:
        log.exception("failed %s", "once", extra={"endpoint": "fallback-1"})
    (line,) = lines.lines
    assert line["msg"] == "failed once" and line["endpoint"] == "fallback-1"
    assert isinstance(line["exc"], str) and "ValueError: boom ✓" in line["exc"]
    assert isinstance(line["ts"], str) and line["ts"].endswith("+00:00")
