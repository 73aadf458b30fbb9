"""Which tasks have their claim count the first call's attempt (one ledger round trip for both): a
one-step agent whose call follows the claim at once; none whose first call may wait, may not come,
or may be for another step."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import redis.asyncio
from pydantic import BaseModel

from service.agents.base import Agent, Step
from service.agents.registry import AgentRegistry
from service.agents.tasks import Task, TaskEvent
from service.agents.tools import Tool
from service.core.batch_settings import BatchSettings
from service.core.metrics import Metrics
from service.llm.endpoints import Endpoint
from service.llm.guard import EndpointGuard, GuardConfig
from service.llm.rates import RateLimiter
from service.llm.tenancy import Tenancy
from service.pipeline.base import ProcessorConfig
from service.pipeline.calls import CallLoop
from service.pipeline.capacity import Capacity
from service.pipeline.steps import Steps
from service.pipeline.waits import Waits


class Out(BaseModel):
    x: str


class One(Step):
    name = "one"
    output_model = Out


class Two(Step):
    name = "two"
    output_model = Out


class Lookup(Tool):
    name = "lookup"


class WithTools(Step):
    name = "asks"
    output_model = Out
    tools = (Lookup(),)


def steps(config: ProcessorConfig | None = None, limiter: RateLimiter | None = None) -> Steps:
    config = config or ProcessorConfig(max_attempts=4)
    metrics = Metrics()
    primary = Endpoint("primary", "http://p/v1", client=None,  # type: ignore[arg-type]
                       guard=EndpointGuard("http://p/v1", metrics, GuardConfig(open_s=5)), limiter=limiter)
    capacity = Capacity(primary=primary, fallbacks=(), agents=AgentRegistry([]), default_unavailable="wait",
                        tenancy=Tenancy(), budgets=None, waits=Waits(), metrics=metrics, config=config,
                        clock=lambda: datetime.now(UTC), model_name="m")
    none: Any = None
    calls = CallLoop(ledger=none, capacity=capacity, waits=Waits(), metrics=metrics, config=config,
                     clock=lambda: datetime.now(UTC), tracing=none, model_name="m", worker_id="w", audit=none)
    return Steps(calls)


def task(kind: str, **event: Any) -> Task:
    return Task("t-1", "sha256:x", TaskEvent(kind=kind, input={}, task_id="t-1", **event), None, None)


def test_a_one_step_agent_has_its_first_attempt_counted_by_the_claim() -> None:
    assert steps().first_attempt(task("k"), Agent("k", Out, (One(),))) == ("one", 4)


def test_no_first_attempt_where_the_first_call_may_wait_or_be_another_steps() -> None:
    s = steps()
    assert s.first_attempt(task("k"), Agent("k", Out, (One(), Two()))) is None  # which step calls first
    assert s.first_attempt(task("k"), Agent("k", Out, (WithTools(),))) is None  # the tool loop's rounds
    assert s.first_attempt(task("k", session="s-1"), Agent("k", Out, (One(),))) is None  # waits its turn
    assert s.first_attempt(task("k"), Agent("k", Out, (One(),), batch=True)) is None  # the batch lane


def test_no_first_attempt_while_the_primary_is_unavailable() -> None:
    s = steps()
    guard = s.calls.capacity.primary.guard
    assert guard is not None
    guard.endpoint_fault("auth", "401")  # its breaker open: the call waits or goes elsewhere
    assert s.first_attempt(task("k"), Agent("k", Out, (One(),))) is None


def test_the_batch_lane_off_leaves_a_batch_kind_online() -> None:
    config = replace(ProcessorConfig(max_attempts=2), batch=BatchSettings(enabled=False))
    assert steps(config).first_attempt(task("k"), Agent("k", Out, (One(),), batch=True)) == ("one", 2)


def test_no_first_attempt_under_rate_limits() -> None:
    client = redis.asyncio.Redis()  # never connected: the limiter only registers its scripts here
    limited = steps(limiter=RateLimiter(client, "http://p/v1", Metrics(), rpm=60))
    assert limited.first_attempt(task("k"), Agent("k", Out, (One(),))) is None  # its call may wait for the quota
    unlimited = steps(limiter=RateLimiter(client, "http://p/v1", Metrics()))  # no limits set
    assert unlimited.first_attempt(task("k"), Agent("k", Out, (One(),))) == ("one", 4)
