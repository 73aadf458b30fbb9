"""Workers SIGKILLed at every point of a tool call: the downstream sees each call's effect once.

The downstream runs in its non-idempotent mode: every create it receives is an effect, so a service
that ran a call twice would show a count of 2 for that key. Its own deduplication cannot hide a
mistake of ours here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from consumers.producers import Publisher
from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.agents.loading import agents_from_settings
from service.agents.registry import AgentRegistry
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.devtools.downstream import DownstreamFault, FakeDownstream
from service.devtools.fakellm import FakeLLM, FaultRule, ToolArguments
from service.pipeline.base import utcnow
from service.pipeline.parking import compensate, side_effects
from service.runtime.wiring import ensure_topics
from tests.support import kill_worker, produce, read_topic, running, spawn_worker, succeeded, task_value, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

NO_REFUND = {"title": "Broken parcel", "priority": "normal", "refund": 0}
TASKS = int(os.environ.get("TOOL_CHAOS_TASKS", "200"))


def ticket(task_id: str) -> bytes:
    return task_value("support_ticket", {"customer": "Ada", "message": f"Parcel {task_id} arrived broken."}, task_id)


def key_of(task_id: str) -> str:
    return f"{task_id}/file/1"


def settings_for(make_settings: Any, downstream: FakeDownstream) -> Settings:
    s: Settings = make_settings(tools={"tickets_url": downstream.base_url}, ledger={"lease_ms": 2000},
                                llm={"timeout_s": 90})
    return s


async def _all_succeeded(ledger: Ledger, ids: list[str]) -> bool:
    records = [await ledger.get(t) for t in ids]
    return all(r is not None and r.state == "succeeded" for r in records)


@contextlib.asynccontextmanager
async def side_parts(s: Settings) -> AsyncIterator[tuple[Ledger, Publisher, AgentRegistry, Metrics]]:
    """The ledger, a producer, the kinds and metrics, without a consumer (it would take partitions)."""
    client = connect(s.redis.url.get_secret_value())
    publisher = Publisher(s.kafka.producer_config())
    try:
        yield (Ledger(client, keys=Keys(s.redis.key_prefix), lease_ms=s.ledger.lease_ms), publisher,
               agents_from_settings(s), Metrics(CollectorRegistry()))
    finally:
        publisher.close()
        await close(client)


@pytest.fixture
def downstream() -> Any:
    with FakeDownstream(idempotent=False) as api:
        yield api


@pytest.mark.evicts_killed_members
def test_a_kill_at_each_point_of_a_tool_call_leaves_one_effect(
        make_settings: Any, fake_llm: FakeLLM, downstream: FakeDownstream, tmp_path: Path) -> None:
    """One task stopped at each point when the worker dies, then a second worker takes over:

    - ``pt-pre``: the model is still choosing the call (no intent journaled);
    - ``pt-intent``: the intent is journaled, the call is on the wire and will never land;
    - ``pt-call``: the call lands at the downstream after the worker died (no result journaled);
    - ``pt-result``: the result is journaled, the model is writing the final answer.
    """
    s = settings_for(make_settings, downstream)
    fake_llm.tool_arguments = [ToolArguments("open_ticket", NO_REFUND)]
    fake_llm.add_fault(FaultRule("latency", match="pt-pre:file", times=1, delay_s=90))
    fake_llm.add_fault(FaultRule("latency", match="pt-result:file", times=1, delay_s=0))  # its first request
    fake_llm.add_fault(FaultRule("latency", match="pt-result:file", times=1, delay_s=90))  # its final one
    downstream.add_fault(DownstreamFault("drop_before", match="pt-intent/", times=1, delay_s=4))
    downstream.add_fault(DownstreamFault("drop_after", match="pt-call/", times=1, delay_s=4))
    ids = ["pt-pre", "pt-intent", "pt-call", "pt-result"]
    ensure_topics(s)
    worker = spawn_worker(s, str(tmp_path / "a.log"))
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), ticket(t)) for t in ids])

        async def in_position() -> None:
            async with side_parts(s) as (ledger, _, _, _):
                async def stuck() -> bool:
                    calls = {t: (await side_effects(ledger, t))["tool_calls"] for t in ids}
                    return (fake_llm.calls_for("pt-pre:file") == 1 and not calls["pt-pre"]
                            and [c["state"] for c in calls["pt-intent"]] == ["intent"]
                            and [c["state"] for c in calls["pt-call"]] == ["intent"]
                            and [c["state"] for c in calls["pt-result"]] == ["done"]
                            and fake_llm.calls_for("pt-result:file") == 2)

                await wait_for(stuck, 60, interval_s=0.1, what="each task at its point")

        asyncio.run(in_position())
        kill_worker(worker)
    finally:
        kill_worker(worker)

    async def take_over() -> dict[str, Any]:
        # the call of pt-call lands after its worker died; pt-intent's never does
        await wait_for(lambda: downstream.ticket_for(key_of("pt-call")) is not None
                       and downstream.stats()["faults"].get("drop_before") == 1, 30, what="the calls on the wire")
        async with running(s, fake_llm.base_url) as b:
            await wait_for(lambda: _all_succeeded(b.ledger, ids), 90, interval_s=0.2, what="every task", service=b)
            return {t: await side_effects(b.ledger, t) for t in ids}

    journals = asyncio.run(take_over())
    assert downstream.stats()["effects_by_key"] == {key_of(t): 1 for t in ids}
    outcome = {t: journals[t]["tool_calls"][0]["outcome"] for t in ids}
    fences = {t: journals[t]["tool_calls"][0]["fence"] for t in ids}
    assert outcome == {"pt-pre": "executed", "pt-intent": "executed", "pt-call": "reconciled_landed",
                       "pt-result": "executed"}
    assert fences == {"pt-pre": 2, "pt-intent": 2, "pt-call": 2, "pt-result": 1}
    # pt-result's result was journaled by the dead worker (fence 1) and replayed, not called again
    got = {m.key for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids)))}
    assert got == {t.encode() for t in ids}


@pytest.mark.evicts_killed_members
def test_tool_calls_under_repeated_sigkills_have_one_effect_each_and_compensate_once(
        make_settings: Any, fake_llm: FakeLLM, downstream: FakeDownstream, tmp_path: Path) -> None:
    s = settings_for(make_settings, downstream)
    fake_llm.tool_arguments = [ToolArguments("open_ticket", NO_REFUND)]
    fake_llm.latency_s = 0.02
    # calls that take a while (kills land inside them), answers lost after the effect, calls that fail
    downstream.set_faults([DownstreamFault("delay", probability=0.3, delay_s=0.3),
                           DownstreamFault("drop_after", probability=0.05),
                           DownstreamFault("drop_before", probability=0.05)])
    ids = [f"chaos-{i}" for i in range(TASKS)]
    ensure_topics(s)
    rng = random.Random(7)
    workers = [spawn_worker(s, str(tmp_path / f"w{i}.log")) for i in range(3)]
    kills = 0
    started = time.monotonic()
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), ticket(t)) for t in ids])
        while kills < 6 and time.monotonic() - started < 120:
            time.sleep(rng.uniform(1.0, 2.0))
            victim = rng.randrange(len(workers))
            kill_worker(workers[victim])
            kills += 1
            workers[victim] = spawn_worker(s, str(tmp_path / f"w{victim}-{kills}.log"))

        async def finish() -> dict[str, dict[str, Any]]:
            async with side_parts(s) as (ledger, _, _, _):  # the workers finish: three partitions, three of them
                await wait_for(lambda: _all_succeeded(ledger, ids), 240, interval_s=0.5, what="every task")
                return {t: await side_effects(ledger, t) for t in ids}

        journals = asyncio.run(finish())
    finally:
        for w in workers:
            kill_worker(w)
    stats = downstream.stats()
    duplicates = {k: n for k, n in stats["effects_by_key"].items() if n != 1}
    assert duplicates == {}
    assert set(stats["effects_by_key"]) == {key_of(t) for t in ids}
    values: dict[bytes | None, set[bytes | None]] = {}
    for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids))):
        values.setdefault(m.key, set()).add(m.value)
    assert set(values) == {t.encode() for t in ids}
    assert all(len(v) == 1 for v in values.values()), "a task has two different results"
    outcomes = Counter(j["tool_calls"][0]["outcome"] for j in journals.values())
    taken_over = sum(1 for j in journals.values() if j["tool_calls"][0]["fence"] > 1)

    async def compensate_all() -> tuple[int, int]:
        async with side_parts(s) as (ledger, publisher, agents, metrics):
            first = [await compensate(ledger, agents, publisher.send, metrics, utcnow, t, by="chaos") for t in ids]
            again = [await compensate(ledger, agents, publisher.send, metrics, utcnow, t, by="chaos") for t in ids]
            assert [r.failed for r in first + again if r.failed] == []
            return sum(len(r.undone) for r in first), sum(len(r.undone) for r in again)

    # the undos run without injected faults: an undo whose outcome is unknown is sent again with the
    # same key (docs/AGENTS.md), which only an idempotent downstream absorbs
    downstream.clear_faults()
    undone, undone_again = asyncio.run(compensate_all())
    assert undone == len(ids) and undone_again == 0
    assert set(downstream.stats()["undos_by_key"].values()) == {1}
    print(f"\ntool chaos: {len(ids)} tasks, {kills} SIGKILLs of 3 workers; downstream: {stats['requests']} create "
          f"requests, {stats['effects']} effects, {len(duplicates)} duplicate effects, {stats['status_checks']} "
          f"status checks; calls: {dict(outcomes)}; {taken_over} finished under a later fence; "
          f"compensations: {undone} undone, {undone_again} on the second pass")
