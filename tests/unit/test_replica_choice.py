"""Which endpoint serving the primary's model a step's call goes to: the one its prompt cache key
prefers, or the next in the key's order while that one's breaker is open; never a stall."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from service.agents.base import Agent
from service.agents.registry import AgentRegistry
from service.core.metrics import Metrics
from service.llm.affinity import prompt_cache_key, rendezvous
from service.llm.endpoints import Endpoint
from service.llm.guard import EndpointGuard, GuardConfig
from service.llm.tenancy import Tenancy
from service.pipeline.base import ProcessorConfig
from service.pipeline.capacity import Capacity
from service.pipeline.waits import Waits
from tests.unit.test_fallback_policy import Clock, One, Out, task

NAMES = ["primary", "replica-1", "replica-2"]


def capacity(clock: Clock) -> Capacity:
    metrics = Metrics()
    config = GuardConfig(open_s=5)
    endpoints = [Endpoint(name, f"http://{name}/v1", client=None,  # type: ignore[arg-type]
                          guard=EndpointGuard(f"http://{name}/v1", metrics, config, clock=clock)) for name in NAMES]
    return Capacity(primary=endpoints[0], replicas=tuple(endpoints[1:]), fallbacks=(),
                    agents=AgentRegistry([Agent("classify", Out, (One(),), unavailable="wait")]),
                    default_unavailable="wait", tenancy=Tenancy(), budgets=None, waits=Waits(), metrics=metrics,
                    config=ProcessorConfig(), clock=lambda: datetime.now(UTC), model_name="m")


def pick(c: Capacity, key: str | None) -> str:
    chosen = asyncio.run(asyncio.wait_for(c.endpoint(task("classify"), 10, retry=False, cache_key=key), 2))
    return chosen.name


KEYS = [prompt_cache_key(f"kind{i}", "step", "v1") for i in range(60)]


def test_each_key_goes_to_the_endpoint_it_prefers_every_time() -> None:
    c = capacity(Clock())
    chosen = {key: pick(c, key) for key in KEYS}
    assert chosen == {key: rendezvous(NAMES, key)[0] for key in KEYS}
    assert set(chosen.values()) == set(NAMES)  # the keys spread over all three
    assert all(pick(c, key) == chosen[key] for key in KEYS[:10])
    assert pick(c, None) == "primary"  # no key: the primary, as without replicas


def test_an_open_breaker_moves_only_its_keys_to_their_next_endpoint_and_they_come_back() -> None:
    clock = Clock()
    c = capacity(clock)
    before = {key: pick(c, key) for key in KEYS}
    failing = c.replicas[0]
    assert failing.guard is not None
    failing.guard.endpoint_fault("unreachable", "refused")
    during = {key: pick(c, key) for key in KEYS}
    for key in KEYS:
        if before[key] == failing.name:
            assert during[key] == rendezvous(NAMES, key)[1]
        else:
            assert during[key] == before[key]
    assert failing.name not in during.values()
    clock.now += 6  # its open period over: the next call of its keys is its probe
    moved = next(key for key in KEYS if before[key] == failing.name)
    assert pick(c, moved) == failing.name


def test_with_every_endpoint_down_a_wait_kind_waits_for_its_own() -> None:
    c = capacity(Clock())
    for endpoint in (c.primary, *c.replicas):
        assert endpoint.guard is not None
        endpoint.guard.endpoint_fault("unreachable", "refused")
    assert not c.home(KEYS[0]).available
    assert c.home(KEYS[0]).name == rendezvous(NAMES, KEYS[0])[0]


def test_a_replica_answers_as_the_primary_and_a_fallback_as_itself() -> None:
    replica = Endpoint("replica-1", "http://r/v1", client=None, replica=True)  # type: ignore[arg-type]
    fallback = Endpoint("fallback-1", "http://f/v1", client=None)  # type: ignore[arg-type]
    assert (replica.answers_as, replica.fallback) == ("primary", False)
    assert (fallback.answers_as, fallback.fallback) == ("fallback-1", True)


class FullWindow:
    full = True  # this worker's calls wait for a slot on it


def test_a_full_window_sends_the_call_to_the_next_endpoint_and_a_full_fleet_to_its_own() -> None:
    c = capacity(Clock())
    key = KEYS[0]
    first, second, third = rendezvous(NAMES, key)
    by_name = {e.name: e for e in (c.primary, *c.replicas)}
    object.__setattr__(by_name[first], "window", FullWindow())
    assert c.home(key).name == second
    for name in (second, third):
        object.__setattr__(by_name[name], "window", FullWindow())
    assert c.home(key).name == first  # every window full: it waits for its own


def test_consumption_goes_on_while_one_endpoint_of_the_model_accepts() -> None:
    c = capacity(Clock())
    peers = (c.primary, *c.replicas)
    for endpoint in peers[:-1]:
        assert endpoint.guard is not None
        endpoint.guard.endpoint_fault("auth", "401")
    assert c.accepting()  # a wait kind is still served by the last one
    assert peers[-1].guard is not None
    peers[-1].guard.endpoint_fault("auth", "401")
    assert not c.accepting()


def test_a_call_let_go_at_once_is_counted_once_and_a_retry_still_asks_the_retry_budget() -> None:
    c = capacity(Clock())
    guard = c.primary.guard
    assert guard is not None
    assert asyncio.run(c.endpoint(task("classify"), 10, retry=False)) is c.primary
    assert len(guard._calls) == 1 and not guard._retries
    assert asyncio.run(c.endpoint(task("classify"), 10, retry=True)) is c.primary
    assert len(guard._calls) == 1 and len(guard._retries) == 1
