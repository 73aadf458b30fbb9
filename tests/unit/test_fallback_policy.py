"""Which endpoint a step calls while the primary is unavailable: the kind's policy decides."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from service.agents.base import Agent, Step
from service.agents.registry import AgentRegistry
from service.agents.tasks import Task, TaskEvent
from service.core.metrics import Metrics
from service.llm.endpoints import Endpoint, public_url
from service.llm.guard import EndpointGuard, GuardConfig
from service.llm.tenancy import Tenancy
from service.pipeline.base import ProcessorConfig, ToDeadLetter
from service.pipeline.capacity import Capacity
from service.pipeline.waits import Waits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Out(BaseModel):
    x: str


class One(Step):
    output_model = Out


class Picker(Capacity):
    """Just the parts of the processor that choose an endpoint."""

    def __init__(self, clock: Clock, default: str = "wait", fallbacks: int = 1) -> None:
        metrics = Metrics()
        config = GuardConfig(open_s=5)
        super().__init__(
            primary=Endpoint("primary", "http://p/v1", client=None,  # type: ignore[arg-type]
                             guard=EndpointGuard("http://p/v1", metrics, config, clock=clock)),
            fallbacks=tuple(
                Endpoint(f"fallback-{i}", f"http://f{i}/v1", client=None,  # type: ignore[arg-type]
                         guard=EndpointGuard(f"http://f{i}/v1", metrics, config, clock=clock), model=f"m{i}")
                for i in range(1, fallbacks + 1)),
            agents=AgentRegistry([Agent(kind, Out, (One(),), unavailable=policy)
                                  for kind, policy in (("own_wait", "wait"), ("own_fb", "fallback"),
                                                       ("own_ff", "fail_fast"), ("plain", None))]),
            default_unavailable=default, tenancy=Tenancy(), budgets=None, waits=Waits(), metrics=metrics,
            config=ProcessorConfig(), clock=lambda: datetime.now(UTC), model_name="m")


def task(kind: str, deadline_s: float | None = None) -> Task:
    deadline = datetime.now(UTC) + timedelta(seconds=deadline_s) if deadline_s is not None else None
    event = TaskEvent(kind=kind, input={}, task_id="t-1", deadline=deadline)
    return Task("t-1", "sha256:x", event, deadline, None)


def pick(picker: Picker, kind: str, **kw: Any) -> Endpoint:
    return asyncio.run(asyncio.wait_for(picker.endpoint(task(kind, **kw), 10, retry=False, attempts=2), 2))


def test_an_available_primary_is_called_whatever_the_policy() -> None:
    p = Picker(Clock())
    for kind in ("own_wait", "own_fb", "own_ff", "plain"):
        assert pick(p, kind).name == "primary"


def test_primary_degraded_each_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    p = Picker(clock, fallbacks=2)
    assert p.primary.guard is not None
    p.primary.guard.endpoint_fault("auth", "401")
    assert pick(p, "own_fb").name == "fallback-1"
    assert p.metrics.registry.get_sample_value("agent_fallbacks_total", {"endpoint": "fallback-1"}) == 1
    with pytest.raises(ToDeadLetter) as dead:
        pick(p, "own_ff")
    assert dead.value.reason == "unavailable" and dead.value.attempts == 2 and "auth" in dead.value.error
    with pytest.raises(TimeoutError):  # a wait kind waits for the primary's probe
        pick(p, "own_wait")
    # the first fallback down too: the next one that is available
    assert p.fallbacks[0].guard is not None
    p.fallbacks[0].guard.endpoint_fault("unreachable", "refused")
    assert pick(p, "own_fb").name == "fallback-2"
    # the open period over: the next call is the primary's probe, whatever the policy
    clock.now += 6
    assert pick(p, "own_fb").name == "primary"
    assert not p.primary.available  # the probe is out: the others go elsewhere meanwhile
    assert pick(p, "own_fb").name == "fallback-1"  # its own open period is over too: it is probed


def test_a_kind_without_a_policy_takes_the_service_default() -> None:
    for default, expected in (("fallback", "fallback-1"), ("fail_fast", None)):
        p = Picker(Clock(), default=default)
        assert p.primary.guard is not None
        for _ in range(5):
            p.primary.guard.failure()  # the fifth consecutive failure opens the breaker
        assert not p.primary.available
        if expected is None:
            with pytest.raises(ToDeadLetter):
                pick(p, "plain")
        else:
            assert pick(p, "plain").name == expected


def test_every_endpoint_down_a_fallback_kind_waits_within_its_deadline() -> None:
    p = Picker(Clock())
    for endpoint in (p.primary, *p.fallbacks):
        assert endpoint.guard is not None
        endpoint.guard.endpoint_fault("auth", "401")
    with pytest.raises(ToDeadLetter) as dead:
        pick(p, "own_fb", deadline_s=0.3)
    assert dead.value.reason == "expired"


def test_a_fallback_kind_with_no_fallback_configured_waits_for_the_primary() -> None:
    p = Picker(Clock(), fallbacks=0)
    assert p.primary.guard is not None
    p.primary.guard.endpoint_fault("auth", "401")
    with pytest.raises(TimeoutError):
        pick(p, "own_fb")


def test_results_name_a_fallback_by_its_url_without_credentials() -> None:
    assert public_url("https://user:sk-secret@backup.example:8443/v1?key=abc#x") == "https://backup.example:8443/v1"


def test_consumption_pauses_on_a_degraded_primary_only_when_every_kind_would_wait() -> None:
    from service.pipeline.base import ProcessorConfig
    from service.pipeline.processor import TaskProcessor

    clock = Clock()
    metrics = Metrics()

    def processor(policies: tuple[str | None, ...], default: str = "wait") -> TaskProcessor:
        picker = Picker(clock)
        agents = AgentRegistry([Agent(f"k{i}", Out, (One(),), unavailable=p) for i, p in enumerate(policies)])
        return TaskProcessor.build(ledger=None, agents=agents, llm=None, outputs=None, metrics=metrics,  # type: ignore[arg-type]
                                   config=ProcessorConfig(), worker_id="w", model_name="m", guard=picker.primary.guard,
                                   fallbacks=picker.fallbacks, unavailable=default)

    cases = [
        ((None, "wait"), "wait", False),
        ((None, "fallback"), "wait", True),
        ((None,), "fallback", True),
        (("wait", "fail_fast"), "wait", True),  # its tasks must fail now, not age in the topic
    ]
    for policies, default, accepting in cases:
        p = processor(policies, default)
        assert p.accepting
        assert p.guard is not None
        p.guard.endpoint_fault("auth", "401")
        assert p.accepting is accepting, (policies, default)
        if "fallback" in (*policies, default):
            for fallback in p.fallbacks:
                assert fallback.guard is not None
                fallback.guard.endpoint_fault("auth", "401")
            assert not p.accepting  # no fallback accepts either: every kind would wait
