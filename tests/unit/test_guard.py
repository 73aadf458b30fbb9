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


# --------------------------------------------------------------------------- blame by breadth


def test_one_task_failing_again_and_again_never_opens_the_breaker(clock: Clock) -> None:
    g, m = make(clock, failure_threshold=3, open_s=5)
    assert [g.failure("poison-1") for _ in range(10)] == [False] * 10
    assert not g.is_open and g.available
    assert m.registry.get_sample_value("agent_llm_breaker_opens_total") == 0


def test_a_few_failing_tasks_beside_healthy_ones_never_open_it(clock: Clock) -> None:
    """Twenty tasks that fail every time, each failure between successes of other tasks: the
    endpoint serves others, so no streak of different tasks ever reaches the threshold."""
    g, _ = make(clock, failure_threshold=3, open_s=5)
    for round_ in range(4):
        for i in range(20):
            g.failure(f"poison-{i}")
            if i % 2:
                g.success(f"healthy-{round_}-{i}")
    assert not g.is_open


def test_different_tasks_failing_in_a_row_open_it(clock: Clock) -> None:
    g, _ = make(clock, failure_threshold=3, open_s=5)
    assert [g.failure(t) for t in ("a", "a", "b", "a", "c")] == [False, False, False, False, True]
    assert g.is_open


def test_a_task_that_just_failed_is_never_the_probe(clock: Clock) -> None:
    """Without a probe of the guard's own, a suspect waits while a task that has not failed probes."""
    g, _ = make(clock, failure_threshold=2, open_s=5)
    g.failure("a")
    g.failure("b")
    clock.now += 5.1
    assert g.decide(retry=True, task="a").delay > 0  # a suspect: not the probe
    assert g.decide(retry=False, task="fresh").delay == 0  # a task that has not failed probes
    assert g._probing == "fresh"
    assert g.decide(retry=True, task="b").delay > 0  # one probe at a time
    assert g.failure("b") is False  # a suspect's late failure does not take the probe's verdict
    g.success("fresh")
    assert not g.is_open and g._probing is None


def test_while_only_suspects_wait_the_guard_probes_with_a_call_of_its_own(clock: Clock) -> None:
    calls: list[str] = []

    async def scenario() -> None:
        async def probe() -> None:
            calls.append("probe")

        g, m = make(clock, failure_threshold=2, open_s=5)
        g.probe = probe
        g.failure("a")
        g.failure("b")
        clock.now += 5.1
        first = g.decide(retry=True, task="a")
        assert first.delay > 0 and first.why == "probe"  # the suspect waits for the guard's probe
        await asyncio.sleep(0)  # the probe runs
        await asyncio.sleep(0)
        assert calls == ["probe"] and not g.is_open
        assert g.decide(retry=True, task="a").delay == 0  # closed: the suspect spends its attempt
        assert m.registry.get_sample_value("agent_llm_breaker_probes_total", {"endpoint": "llm.local:8080"}) == 1
        await g.aclose()

    asyncio.run(scenario())


def test_a_failed_probe_of_its_own_keeps_the_breaker_open(clock: Clock) -> None:
    from service.core.errors import EndpointFault, LLMUnavailable

    async def scenario() -> None:
        async def failing() -> None:
            raise LLMUnavailable("HTTP 503")

        async def revoked() -> None:
            raise EndpointFault("auth", "HTTP 401")

        g, _ = make(clock, failure_threshold=2, open_s=5)
        g.probe = failing
        g.failure("a")
        g.failure("b")
        clock.now += 5.1
        g.decide(retry=True, task="a")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert g.is_open and g._probing is None  # open again for another open_s
        clock.now += 5.1
        g.probe = revoked
        g.decide(retry=True, task="b")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert g.is_open and g.degraded == "auth"
        await g.aclose()

    asyncio.run(scenario())


def test_every_wait_for_the_endpoint_ends(clock: Clock) -> None:
    """Degraded (where only a probe may call) or open, a caller gives up after max_wait_s."""
    from service.llm.guard import EndpointUnavailable

    g, _ = make(clock, failure_threshold=1, open_s=10, max_wait_s=0.5)
    g.clock = time.monotonic

    async def scenario() -> EndpointUnavailable:
        g.endpoint_fault("auth", "HTTP 401")
        try:
            await g.acquire(retry=False, task="t")
        except EndpointUnavailable as exc:
            return exc
        raise AssertionError("acquire returned while the endpoint was degraded")

    exc = asyncio.run(scenario())
    assert exc.why == "degraded:auth" and exc.waited_s >= 0.5


def test_acquire_now_lets_a_first_call_go_only_when_acquire_would_not_wait(clock: Clock) -> None:
    g, m = make(clock, failure_threshold=1, open_s=5)
    assert g.acquire_now(retry=False, task="t1")
    assert len(g._calls) == 1  # counted as acquire counts it
    assert not g.acquire_now(retry=True, task="t1")  # a retry asks the retry budget in acquire
    asyncio.run(g.retry_after(0.3))
    assert not g.acquire_now(retry=False, task="t2")  # a Retry-After in force
    clock.now += 1
    g.failure("t2")
    assert not g.acquire_now(retry=False, task="t3")  # open
    clock.now += 5.1
    assert not g.acquire_now(retry=False, task="t3")  # half-open: acquire takes the probe
    assert not g._probing  # refusing took nothing, counted nothing
    assert len(g._calls) == 1
    assert m.registry.get_sample_value("agent_retry_budget_refusals_total") == 0
