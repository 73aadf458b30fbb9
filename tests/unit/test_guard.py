"""Circuit breaker and retry budget, on a clock the test moves."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.guard import EndpointGuard, GuardConfig
from service.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **cfg: float) -> tuple[EndpointGuard, Metrics]:
    m = Metrics()
    return EndpointGuard("http://user:pw@llm.local:8080/v1", m, GuardConfig(**cfg), clock=clock), m  # type: ignore[arg-type]


def test_breaker_opens_after_consecutive_failures_and_half_opens_for_one_probe(clock: Clock) -> None:
    g, m = make(clock, failure_threshold=3, open_s=5)
    for _ in range(2):
        g.failure()
    assert not g.is_open
    g.success()  # a success resets the count
    for _ in range(3):
        g.failure()
    assert g.is_open
    assert m.registry.get_sample_value("agent_llm_breaker_open", {"endpoint": "llm.local:8080"}) == 1
    assert m.registry.get_sample_value("agent_llm_breaker_opens_total") == 1
    clock.now += 5.1
    assert not g.is_open
    asyncio.run(g.acquire(retry=False))  # the probe goes through
    assert g._probing
    g.failure()  # the probe failed: open again at once
    assert g.is_open
    clock.now += 5.1
    asyncio.run(g.acquire(retry=False))
    g.success()
    assert not g.is_open and not g._probing
    assert m.registry.get_sample_value("agent_llm_breaker_open", {"endpoint": "llm.local:8080"}) == 0


def test_acquire_waits_while_open(clock: Clock) -> None:
    g, _ = make(clock, failure_threshold=1, open_s=0.3)
    g.clock = time.monotonic  # real time for the wait itself
    g.failure()

    async def timed() -> float:
        start = g.clock()
        await g.acquire(retry=False)
        return g.clock() - start

    assert asyncio.run(timed()) >= 0.25


def test_retry_budget_caps_retries_to_a_share_of_calls(clock: Clock) -> None:
    g, m = make(clock, retry_ratio=0.1, retry_floor=2, window_s=10)
    for _ in range(100):
        asyncio.run(g.acquire(retry=False))
    allowed = 0
    while g.retry_allowed():
        asyncio.run(g.acquire(retry=True))
        allowed += 1
    assert allowed == 12  # floor 2 + 10% of 100 calls
    clock.now += 11  # the window slides: old calls and retries no longer count
    assert g.retry_allowed()
    assert m.registry.get_sample_value("agent_retry_budget_refusals_total") == 0


def test_retry_after_blocks_every_caller(clock: Clock) -> None:
    g, _ = make(clock)
    g.clock = time.monotonic
    asyncio.run(g.retry_after(0.3))

    async def timed() -> float:
        start = g.clock()
        await g.acquire(retry=False)
        return g.clock() - start

    assert asyncio.run(timed()) >= 0.25
