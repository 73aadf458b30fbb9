"""Traces cross Kafka: the incoming traceparent parents the task span; results and dead letters carry it on."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.core.log_context import TaskFields, json_formatter
from service.core.settings import Settings
from service.core.tracing import Tracing
from service.devtools.fakellm import FakeLLM
from tests.support import classify, metric, produce, read_topic, running, succeeded, wait_for

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Lines(logging.Handler):
    """The JSON log lines the service writes (its ``configure_logging`` handler's formatter and filter)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(json_formatter())
        self.addFilter(TaskFields())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    handler, client_log = Lines(), logging.getLogger("service.llm.client")
    logging.getLogger().addHandler(handler)
    level = client_log.level
    client_log.setLevel(logging.DEBUG)  # its line per model call, made inside the call's span
    yield handler
    client_log.setLevel(level)
    logging.getLogger().removeHandler(handler)


def test_task_and_llm_spans_join_the_producers_trace(make_settings: Any, fake_llm: FakeLLM, log_lines: Lines) -> None:
    s: Settings = make_settings()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, tracing=Tracing(provider)) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [
                (b"tr-1", classify("tr-1"), [("traceparent", INCOMING.encode())]),
                (b"tr-bad", b"{oops", [("traceparent", INCOMING.encode())]),
            ])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1
                           and metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"}) == 1, what="both")

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    task = next(sp for sp in spans if sp.name == "agent.task classify")
    llm = next(sp for sp in spans if sp.name.startswith("chat "))
    assert format(task.context.trace_id, "032x") == TRACE_ID
    assert task.attributes is not None and task.attributes["agent.task.key"] == "tr-1"
    assert task.attributes["agent.ledger.decision"] == "claimed" and task.attributes["agent.ledger.fence"] == 1
    assert task.attributes["agent.task.outcome"] == "succeeded"
    assert str(task.attributes["agent.task.result_digest"]).startswith("sha256:")
    assert llm.parent is not None and llm.parent.span_id == task.context.span_id
    assert llm.attributes is not None and llm.attributes["gen_ai.usage.output_tokens"] > 0
    assert list(llm.attributes["gen_ai.response.finish_reasons"]) == ["stop"]
    assert llm.attributes["gen_ai.provider.name"] == "openai"
    assert task.attributes["messaging.consumer.group.name"] == s.kafka.group_id
    assert task.attributes["messaging.destination.name"] == s.kafka.input_topic
    assert isinstance(task.attributes["messaging.destination.partition.id"], str)
    # the log line of the model call names the task and joins the exported trace at the call's span
    (line,) = [line for line in log_lines.lines if line["msg"].startswith("LLM request ok")]
    assert line["task_id"] == "tr-1" and line["kind"] == "classify" and line["topic"] == s.kafka.input_topic
    assert line["trace_id"] == TRACE_ID and line["span_id"] == format(llm.context.span_id, "016x")
    result = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))[0]
    carried = result.headers["traceparent"].decode()
    assert carried.split("-")[1] == TRACE_ID and carried.split("-")[2] == format(task.context.span_id, "016x")
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)[0]
    assert dead.headers["traceparent"].decode().split("-")[1] == TRACE_ID
    # the model request carried the trace on too
    assert fake_llm.stats()["requests"] == 1
