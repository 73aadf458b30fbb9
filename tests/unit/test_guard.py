"""Circuit breaker and retry budget, on a clock the test moves."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.core.metrics import Metrics
from service.llm.guard import EndpointGuard, GuardConfig


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


def test_calls_window_stays_bounded_without_retries(clock: Clock) -> None:
    g, _ = make(clock, window_s=10)

    async def many() -> None:
        for _ in range(1000):
            await g.acquire(retry=False)
            clock.now += 0.1  # 100 calls per window

    asyncio.run(many())
    assert len(g._calls) <= 101
    assert not g._retries


def test_failure_reports_whether_it_opened_the_breaker(clock: Clock) -> None:
    g, _ = make(clock, failure_threshold=3, open_s=5)
    assert [g.failure() for _ in range(3)] == [False, False, True]
    assert g.failure() is False  # already open: this one did not open it
    clock.now += 5.1
    asyncio.run(g.acquire(retry=False))  # the probe
    assert g.failure() is True  # the failed probe re-opened it


def degraded_gauge(m: Metrics, reason: str) -> float | None:
    return m.registry.get_sample_value(
        "agent_endpoint_degraded", {"endpoint": "llm.local:8080", "reason": reason}
    )


def test_endpoint_fault_opens_at_once_and_degrades(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    g, m = make(clock, failure_threshold=5, open_s=5)
    assert g.accepting and g.degraded is None
    with caplog.at_level("WARNING", logger="service.llm.guard"):
        g.endpoint_fault("auth", "LLM endpoint rejected the credentials (HTTP 401)")
        g.endpoint_fault("auth", "again")  # same reason: no second warning
    assert g.is_open and g.degraded == "auth" and not g.accepting
    assert degraded_gauge(m, "auth") == 1
    assert m.registry.get_sample_value("agent_llm_breaker_opens_total") == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "endpoint llm.local:8080 unusable (auth)" in warnings[0]
    assert "consumption paused, probing every 5 s" in warnings[0]


def test_degraded_endpoint_lets_one_probe_through_per_open_s(clock: Clock) -> None:
    g, m = make(clock, open_s=5)
    g.endpoint_fault("unreachable", "LLM endpoint unreachable: ClientConnectorError")

    async def admitted(at: float) -> bool:
        clock.now = at
        try:
            await asyncio.wait_for(g.acquire(retry=False), 0.2)
        except TimeoutError:
            return False
        return True

    async def scenario() -> list[bool]:
        start = clock.now
        return [
            await admitted(start + 1),  # open: nobody
            await admitted(start + 5.1),  # half-open: the probe
            await admitted(start + 6),  # probe in flight: nobody else
            await admitted(start + 10.2),  # the probe was lost: one replacement after open_s
            await admitted(start + 10.3),
        ]

    assert asyncio.run(scenario()) == [False, True, False, True, False]
    g.endpoint_fault("unreachable", "still refused")  # the probe failed: open again
    assert g.is_open and g.degraded == "unreachable"
    g.success()  # a later probe answered
    assert not g.is_open and g.accepting and g.degraded is None
    assert degraded_gauge(m, "unreachable") == 0
    assert m.registry.get_sample_value("agent_llm_breaker_open", {"endpoint": "llm.local:8080"}) == 0


def test_success_after_fault_logs_resuming(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    g, m = make(clock, open_s=5)
    g.endpoint_fault("not_found", "model 'x' not found")
    g.endpoint_fault("auth", "key revoked")  # the reason changes: the gauge follows
    assert degraded_gauge(m, "not_found") == 0 and degraded_gauge(m, "auth") == 1
    with caplog.at_level("INFO", logger="service.llm.guard"):
        g.success()
    assert "endpoint llm.local:8080 answers again; resuming" in caplog.text
    assert degraded_gauge(m, "auth") == 0
