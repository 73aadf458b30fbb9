"""Fallback endpoints: with the primary down, `fallback` kinds answer from the fallback (flagged
degraded, naming it), `wait` kinds wait and answer from the primary when it is back, and
`fail_fast` kinds are dead-lettered as `unavailable` before their deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from service.agents.registry import AgentRegistry, default_agents
from service.api.app import create_app
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import metric, produce, read_topic, running, succeeded, task_value, wait_for

pytestmark = pytest.mark.integration

LABELS = ["complaint", "praise", "question"]


def registry(**policies: str) -> AgentRegistry:
    """The built-in kinds, plus for each ``name=policy`` a copy of ``classify`` (or of ``review``
    for a name starting with review) of that kind with that policy."""
    agents = default_agents()
    for kind, policy in policies.items():
        base = agents.get("review" if kind.startswith("review") else "classify")
        agents.register(dataclasses.replace(base, kind=kind, unavailable=policy))
    return agents


def task(kind: str, task_id: str, **extra: Any) -> tuple[bytes, bytes]:
    if kind.startswith("review"):
        return task_id.encode(), task_value(kind, {"document": f"a short document {task_id}"}, task_id, **extra)
    return task_id.encode(), task_value(kind, {"text": f"the parcel {task_id} arrived broken", "labels": LABELS},
                                        task_id, **extra)


@pytest.fixture
def fallback_llm() -> Any:
    with FakeLLM() as fake:
        yield fake


def test_primary_down_fallback_kinds_answer_degraded_and_wait_kinds_wait(
        make_settings: Any, fake_llm: FakeLLM, fallback_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={
        "breaker_open_s": 1.0,
        "fallbacks": [{"base_url": fallback_llm.base_url, "api_key": "sk-fallback", "model": "small-fb"}],
    })
    agents = registry(classify_fb="fallback", review_fb="fallback")  # classify and review: the default, wait
    fake_llm.add_fault(FaultRule("error", status=401))  # the primary's key is refused: it is unusable
    fb_ids = [f"fb-{i}" for i in range(6)]
    wait_ids = [f"wait-{i}" for i in range(3)]
    review_ids = ["review-fb-0"]

    async def scenario() -> dict[str, Any]:
        async with running(s, fake_llm.base_url, agents=agents) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [task("classify_fb", t) for t in fb_ids] + [task("classify", t) for t in wait_ids]
                    + [task("review_fb", t) for t in review_ids])
            done = len(fb_ids) + len(review_ids)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) >= done, 30,
                           what="the fallback kinds' tasks", service=svc)
            await asyncio.sleep(1.5)  # the wait kind's tasks still wait: the primary is down
            assert metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == done
            assert svc.processor.accepting  # a fallback kind can still be served: consumption goes on
            during = {
                "degraded_classify": metric(svc, "agent_degraded_answers_total", {"kind": "classify_fb"}),
                "degraded_review": metric(svc, "agent_degraded_answers_total", {"kind": "review_fb"}),
                "degraded_wait": metric(svc, "agent_degraded_answers_total", {"kind": "classify"}),
                "fallbacks": metric(svc, "agent_fallbacks_total", {"endpoint": "fallback-1"}),
            }
            fake_llm.clear_faults()  # the primary is back: the next probe succeeds
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == done + len(wait_ids),
                           30, what="the wait kind's tasks, on the primary", service=svc)
            ledger = {t: await svc.ledger.get(t) for t in fb_ids + wait_ids + review_ids}
            dead = sum(metric(svc, "agent_dead_letters_total", {"reason": r})
                       for r in ("exhausted", "permanent", "unavailable", "expired"))
            return {**during, "ledger": ledger, "dead": dead}

    seen = asyncio.run(scenario())
    assert seen["dead"] == 0
    assert (seen["degraded_classify"], seen["degraded_review"], seen["degraded_wait"]) == (len(fb_ids), 1, 0)
    # a call per classify task, and one per review step, each sent to the fallback
    assert seen["fallbacks"] >= len(fb_ids) + len(agents.get("review_fb").steps)
    results = {m.json()["task_id"]: m.json() for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic,
                                                                 expect=len(fb_ids) + len(wait_ids) + 1))}
    assert set(results) == set(fb_ids + wait_ids + review_ids)
    for t in fb_ids + review_ids:
        event = results[t]
        assert event["status"] == "succeeded" and event["degraded"] is True, event
        assert (event["endpoint"], event["model"]) == ("fallback-1", "small-fb"), event
        assert event["endpoint_url"] == fallback_llm.base_url  # a loopback URL has no credentials to drop
        record = seen["ledger"][t]
        assert (record.fields["degraded"], record.fields["endpoint"], record.fields["model"]) == (
            "1", "fallback-1", "small-fb")
    assert set(results["review-fb-0"]["answered_by"]) == {s.name for s in agents.get("review_fb").steps}
    journal = seen["ledger"]["review-fb-0"].steps
    assert journal and all((step["endpoint"], step["model"]) == ("fallback-1", "small-fb") for step in journal.values())
    for t in wait_ids:
        event = results[t]
        assert "degraded" not in event and "endpoint" not in event and event["model"] == "fake", event
        assert "degraded" not in seen["ledger"][t].fields
    # the fallback got the fallback kinds' calls with its own key and model, never the wait kind's
    assert fallback_llm.stats()["requests"] == seen["fallbacks"]


def test_both_down_fail_fast_dead_letters_unavailable_within_the_deadline(
        make_settings: Any, fake_llm: FakeLLM, fallback_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={
        "breaker_open_s": 5.0,
        "fallbacks": [{"base_url": fallback_llm.base_url, "model": "small-fb"}],
    })
    agents = registry(classify_ff="fail_fast", classify_fb="fallback")
    fake_llm.add_fault(FaultRule("error", status=401))
    fallback_llm.add_fault(FaultRule("error", status=401))
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    ff_ids = [f"ff-{i}" for i in range(4)]

    async def scenario() -> tuple[float, float, float, bool]:
        async with running(s, fake_llm.base_url, agents=agents) as svc:
            started = time.monotonic()
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [task("classify_ff", t, deadline=deadline.isoformat()) for t in ff_ids]
                    + [task("classify_fb", "fb-0", deadline=deadline.isoformat())])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "unavailable"}) >= len(ff_ids),
                           25, what="fail_fast tasks dead-lettered as unavailable", service=svc)
            took = time.monotonic() - started
            await asyncio.sleep(0.5)
            # a fail_fast kind is loaded: consumption goes on so its tasks fail now, not when they are old
            accepting = svc.processor.accepting
            transport = httpx.ASGITransport(app=create_app(svc))
            async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
                ready: dict[str, Any] = {}

                async def both_degraded() -> bool:
                    ready.update((await http.get("/readyz")).json())
                    return len(ready["degraded"]) == 2

                for _ in range(100):  # the fallback kind's task finds the fallback's key revoked too
                    if await both_degraded():
                        break
                    await asyncio.sleep(0.1)
            # both endpoints are named (host:port, never the key or the error text)
            assert ready["status"] == "degraded" and sorted(ready["degraded"].values()) == ["auth", "auth"], ready
            assert set(ready["degraded"]) == {urlsplit(fake_llm.base_url).netloc,
                                              urlsplit(fallback_llm.base_url).netloc}, ready
            return (took, metric(svc, "agent_dead_letters_total", {"reason": "unavailable"}),
                    metric(svc, "agent_tasks_total", {"outcome": "succeeded"}), accepting)

    took, unavailable, succeeded, accepting = asyncio.run(scenario())
    assert took < 25 and unavailable == len(ff_ids) and succeeded == 0 and accepting
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=len(ff_ids))
    by_id = {json.loads(m.value or b"{}").get("task_id"): m for m in dead}
    assert set(by_id) == set(ff_ids)  # the fallback kind's task waits for an endpoint, not dead-lettered
    for m in dead:
        assert m.headers["dlq.reason"] == b"unavailable"
