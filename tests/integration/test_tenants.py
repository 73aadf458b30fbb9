"""Tenants end to end, on Apache Kafka, redis-server and the fake model, with two replicas: weighted
shares of a contended quota, a hard budget enforced exactly under concurrency (dead letter `budget`,
or wait for the next period), cost per tenant and kind, and hostile tenant ids."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from dedup.keys import Keys
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.llm.guard import endpoint_tag
from service.runtime.wiring import Service
from tests.support import classify, metric, produce, read_topic, running, succeeded, wait_for

pytestmark = pytest.mark.integration


def total(services: list[Service], name: str, labels: dict[str, str] | None = None) -> float:
    return sum(metric(s, name, labels) for s in services)


async def drain_quota(svc: Service, hold_s: float) -> None:
    """Empty the shared buckets, as a fleet that has been busy for a while finds them, and hold them
    empty for ``hold_s`` (they refill from then on): every task produced meanwhile is in flight and
    waiting when the quota opens, so no tenant has it to itself first."""
    key = Keys(svc.settings.redis.key_prefix).endpoint(endpoint_tag(svc.llm_base_url), "rate")
    server_s, micros = await svc.redis.time()
    opens = server_s * 1000 + micros // 1000 + int(hold_s * 1000)
    await svc.redis.hset(key, mapping={"ts": opens, "req": 0, "tok": 0})


def test_two_tenants_at_weights_3_to_1_get_3_to_1_of_a_contended_quota(make_settings: Any, fake_llm: FakeLLM) -> None:
    """gold (weight 3) and bronze (weight 1) each have a backlog of 150 tasks on their own partitions;
    two replicas share a 600-per-minute quota. Of the first 120 completions, gold should have 90."""
    s: Settings = make_settings(
        kafka={"topic_partitions": 6}, llm={"rpm": 600, "interactive_reserve": 0.0},
        tenancy={"tenants": {"gold": {"weight": 3}, "bronze": {"weight": 1}}, "fair_half_life_s": 10},
        max_in_flight=60, max_in_flight_per_partition=10,
    )
    s2 = s.model_copy(update={"worker_id": "replica-2"})
    n = 150

    async def scenario() -> list[Any]:
        async with running(s, fake_llm.base_url) as a, running(s2, fake_llm.base_url) as b:
            await wait_for(lambda: a.runner.assignment and b.runner.assignment, 60, what="both replicas assigned")
            await drain_quota(a, hold_s=4)
            for p in range(3):  # gold names itself in the field, bronze in the header
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                        [(f"gold-{p}-{i}".encode(), classify(f"gold-{p}-{i}", tenant="gold")) for i in range(n // 3)],
                        partition=p)
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                        [(f"bronze-{p}-{i}".encode(), classify(f"bronze-{p}-{i}"), [("tenant", b"bronze")])
                         for i in range(n // 3)], partition=3 + p)
            await wait_for(lambda: total([a, b], "agent_tasks_total", {"outcome": "succeeded"}) >= 130, 60,
                           what="130 completions")
            yields = total([a, b], "agent_fair_yields_total", {"tenant": "gold"}) + total(
                [a, b], "agent_fair_yields_total", {"tenant": "bronze"})
            assert yields > 0  # the quota was contended and shared
            return await asyncio.to_thread(read_topic, s.kafka.bootstrap_servers, s.kafka.results_topic,
                                           expect=130, timeout_s=5, idle_s=0.5)

    results = asyncio.run(scenario())
    first = sorted((m.json() for m in results), key=lambda r: r["completed_at"])[:120]
    count = Counter(r["task_id"].split("-")[0] for r in first)
    ratio = count["gold"] / max(1, count["bronze"])
    print(f"first 120 completions: {dict(count)}, gold:bronze = {ratio:.2f}")
    print("in order:", "".join(r["task_id"][0] for r in first))
    assert 2.6 <= ratio <= 3.4, count


def budget_settings(make_settings: Any, **tenancy: Any) -> Settings:
    s: Settings = make_settings(
        kafka={"topic_partitions": 6}, llm={"max_tokens": 32},
        tenancy={"tenants": {"acme": {"budget_tokens": 2000}, "default": {"budget_tokens": 0}}, "prices": {"fake": {"prompt": 0.5, "completion": 2.0}},
                 **tenancy},
        max_in_flight=40,
    )
    return s


def test_a_budget_is_enforced_exactly_under_concurrency_and_over_it_is_dead_letter_budget(
        make_settings: Any, fake_llm: FakeLLM) -> None:
    s = budget_settings(make_settings, over_budget="dead_letter")
    s2 = s.model_copy(update={"worker_id": "replica-2"})
    n = 60

    async def scenario() -> tuple[float, float, int]:
        async with running(s, fake_llm.base_url) as a, running(s2, fake_llm.base_url) as b:
            await wait_for(lambda: a.runner.assignment and b.runner.assignment, 60, what="both replicas assigned")
            # every task at once: 80 slots in flight over two replicas for 60 tasks of one tenant
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(f"b-{i}".encode(), classify(f"b-{i}", f"text {i}", tenant="acme")) for i in range(n)])
            def done() -> float:
                return total([a, b], "agent_tasks_total", {"outcome": "succeeded"}) + total(
                    [a, b], "agent_dead_letters_total", {"reason": "budget"})

            await wait_for(lambda: done() >= n, 60, what="every task done")
            used = sum(total([a, b], "agent_tenant_tokens_total", {"tenant": "acme", "kind": "classify",
                                                                   "direction": d}) for d in ("input", "output"))
            cost = total([a, b], "agent_tenant_cost_total", {"tenant": "acme", "kind": "classify"})
            reserved = await a.processor.budgets.used("acme")  # type: ignore[union-attr]
            assert reserved == used  # every reservation was corrected to what the endpoint reported
            assert total([a, b], "agent_budget_refusals_total", {"tenant": "acme", "policy": "dead_letter"}) > 0
            return used, cost, fake_llm.stats()["requests"]

    used, cost, calls = asyncio.run(scenario())
    letters = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1, timeout_s=20)
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1, timeout_s=20))
    assert letters and {m.headers["dlq.reason"] for m in letters} == {b"budget"}
    assert len(letters) + len(results) == n and calls == len(results)
    overshoot = used - 2000
    print(f"budget 2000 tokens: {len(results)} calls used {used:.0f} (overshoot {max(0.0, overshoot):.0f}), "
          f"{len(letters)} dead letters `budget`; cost {cost:.2f}")
    assert overshoot <= 0
    assert cost > 0


def test_over_budget_with_the_wait_policy_waits_for_the_next_period(make_settings: Any, fake_llm: FakeLLM) -> None:
    s = budget_settings(make_settings, over_budget="wait", budget_period_s=3,
                        tenants={"acme": {"budget_tokens": 600}, "default": {"budget_tokens": 0}})
    n = 8

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(f"w-{i}".encode(), classify(f"w-{i}", tenant="acme")) for i in range(n)])
            await wait_for(lambda: metric(svc, "agent_budget_refusals_total", {"tenant": "acme", "policy": "wait"}) > 0,
                           20, what="a refusal")
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) >= n, 60,
                           what="every task, period after period")
            assert metric(svc, "agent_dead_letters_total", {"reason": "budget"}) == 0

    asyncio.run(scenario())
    results = [m.json() for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n))]
    assert len({r["task_id"] for r in results}) == n
    # 600 tokens a period hold about four calls' estimates: the eight went in at least two periods
    periods = Counter(int(datetime.fromisoformat(r["completed_at"].replace("Z", "+00:00")).timestamp()) // 3
                      for r in results)
    assert len(periods) >= 2, periods


def test_hostile_tenant_ids_are_dead_lettered_and_wedge_nothing(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(tenancy={"tenants": {"acme": {"weight": 2}}})
    hostile: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = [
        (b"h-1", classify("h-1"), [("tenant", b"x" * 200_000)]),
        (b"h-2", classify("h-2"), [("tenant", b"ac\x00me")]),
        (b"h-3", classify("h-3"), [("tenant", b"\xff\xfe")]),
        (b"h-4", b'{"task_id": "h-4", "kind": "classify", "input": {"text": "x", "labels": ["a"]}, "tenant": "\\ud800"}',
         []),
        (b"h-5", classify("h-5", tenant="a" * 10_000), []),
        (b"h-6", classify("h-6", tenant="acme"), [("tenant", b"beta")]),
    ]
    good: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = [(b"ok-1", classify("ok-1", tenant="acme"), []), (b"ok-2", classify("ok-2", tenant="zeta"), []),
            (b"ok-3", classify("ok-3"), [])]

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [*hostile, *good])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 3, 30,
                           what="the good tasks", service=svc)
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "schema"}) == 6, 30,
                           what="the hostile ones", service=svc)
            # labels stay bounded: a named tenant, `other` for one not named, `default` for none
            for label in ("acme", "other", "default"):
                assert metric(svc, "agent_tenant_tokens_total",
                              {"tenant": label, "kind": "classify", "direction": "output"}) > 0
            names = {sample.labels.get("tenant") for family in svc.metrics.registry.collect()
                     for sample in family.samples if "tenant" in sample.labels}
            assert names <= {"acme", "other", "default"}

    asyncio.run(scenario())
