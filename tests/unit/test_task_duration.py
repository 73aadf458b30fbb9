"""``agent_task_duration_seconds`` measures a record from its receipt by this process to its durable
outcome: once per record, the retries after an outage of Redis or the broker included."""

from __future__ import annotations

import asyncio
from time import monotonic
from types import SimpleNamespace
from typing import Any

import pytest

from consumers.records import Record
from service.agents.registry import AgentRegistry
from service.core.errors import InfrastructureError
from service.core.metrics import Metrics
from service.pipeline.processor import TaskProcessor


class Outage(TaskProcessor):
    """A processor whose first ``failures`` tries find Redis down."""

    failures = 0

    async def _process_bounded(self, record: Record) -> None:
        if self.failures:
            self.failures -= 1
            raise InfrastructureError("redis did not answer")


def outage(failures: int) -> Outage:
    p = Outage.build(ledger=SimpleNamespace(), agents=AgentRegistry([]), llm=SimpleNamespace(),  # type: ignore[arg-type]
                     outputs=SimpleNamespace(transactional=False), metrics=Metrics(),  # type: ignore[arg-type]
                     config=SimpleNamespace(shadow_sample_rate=0.0),  # type: ignore[arg-type]
                     worker_id="w", model_name="m")
    p.failures = failures
    return p


def samples(p: TaskProcessor) -> tuple[float, float]:
    registry: Any = p.metrics.registry
    count = registry.get_sample_value("agent_task_duration_seconds_count") or 0.0
    total = registry.get_sample_value("agent_task_duration_seconds_sum") or 0.0
    return count, total


def test_the_duration_runs_from_receipt_to_the_durable_outcome_across_retries() -> None:
    p = outage(failures=2)
    record = Record("tasks", 0, 7, b"k", b"{}", received_at=monotonic() - 30.0)  # received 30 s ago

    async def scenario() -> None:
        for _ in range(2):  # the runner retries the same record after each outage
            with pytest.raises(InfrastructureError):
                await p(record)
            assert samples(p) == (0.0, 0.0), "an attempt that ended in an outage is no outcome"
        await p(record)

    asyncio.run(scenario())
    count, total = samples(p)
    assert count == 1  # one record, one observation
    assert total >= 30.0  # the whole time since receipt, not the last attempt's
