"""An HTTP tool's request carries the task's ``traceparent``: the downstream's spans join the task's trace."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from pydantic import BaseModel

from service.agents.base import Step
from service.agents.tasks import Task, TaskEvent
from service.agents.tools import HttpTool, ToolCall
from service.core.tracing import Tracing
from service.pipeline.base import reset_record_span, set_record_span
from service.pipeline.tools import ToolLoop

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def call(traceparent: str | None) -> ToolCall:
    return ToolCall(key="t-1/file/1", task_id="t-1", step="file", ordinal=1, tool="open_ticket",
                    arguments={"title": "Broken"}, fence=3, traceparent=traceparent)


def headers_seen(*calls: ToolCall) -> list[dict[str, str]]:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"id": "T-1"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/tickets", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port: Any = runner.addresses[0][1]
        tool = HttpTool("open_ticket", f"http://127.0.0.1:{port}/tickets", timeout_s=5)
        try:
            for c in calls:
                assert await tool.run(c) == {"id": "T-1"}
        finally:
            await tool.aclose()
            await runner.cleanup()

    asyncio.run(main())
    return seen


def test_the_task_s_traceparent_is_sent_and_none_without_one() -> None:
    with_trace, without = headers_seen(call(TRACEPARENT), call(None))
    assert with_trace["traceparent"] == TRACEPARENT
    assert with_trace["Idempotency-Key"] == "t-1/file/1" and with_trace["X-Fence"] == "3"
    assert "traceparent" not in without


class Ticket(BaseModel):
    id: str


class File(Step):
    output_model = Ticket
    tools = (HttpTool("open_ticket", "http://downstream.invalid/tickets"),)


def test_the_tool_loop_gives_a_call_the_task_span_s_traceparent_else_the_task_s() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    task = Task("t-1", "sha256:x", TaskEvent(kind="ticket", input={}, task_id="t-1"), None, TRACEPARENT)
    steps: Any = SimpleNamespace(ledger=SimpleNamespace(effects=None))
    loop = ToolLoop(steps, task, File(), Ticket(id="x"), {}, fence=3, attempts=0, record=None)
    asked = {"name": "open_ticket", "arguments": '{"title": "Broken"}'}

    with tracing.task_span("t-1", "ticket", None, TRACEPARENT) as span:
        token = set_record_span(span)
        try:
            traced = loop._call_of(asked, 1)
        finally:
            reset_record_span(token)
    tracing.shutdown()
    assert traced.traceparent == span.traceparent and traced.traceparent != TRACEPARENT
    (exported,) = exporter.get_finished_spans()
    ctx = exported.get_span_context()
    assert ctx is not None and traced.traceparent == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
    assert loop._call_of(asked, 1).traceparent == TRACEPARENT  # tracing off: the producer's, passed on
