"""A worker SIGKILLed in the middle of a task: another worker finishes it, exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import Broker, classify, kill_worker, produce, read_topic, running, spawn_worker, succeeded, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.mark.evicts_killed_members
def test_killed_worker_leaves_its_task_to_be_finished_once_by_another(
    broker: Broker, make_settings: Any, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    s: Settings = make_settings(ledger={"lease_ms": 2000}, llm={"timeout_s": 60})
    # the worker's call for crash-1 hangs: it is mid-task when it dies
    fake_llm.add_fault(FaultRule("latency", match="crash-1", times=1, delay_s=60))
    n = 20
    records = [(b"crash-1", classify("crash-1"))] + [(f"k-{i}".encode(), classify(f"k-{i}", f"t{i}")) for i in range(n)]
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    worker = spawn_worker(s, str(tmp_path / "worker.log"))
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)

        async def wait_mid_task() -> None:
            await wait_for(lambda: fake_llm.calls_for("crash-1") == 1 and worker.poll() is None, 60,
                           what="the worker to be inside crash-1")

        asyncio.run(wait_mid_task())
        kill_worker(worker)
    finally:
        kill_worker(worker)
    calls_before = fake_llm.stats()["requests"]

    async def take_over() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as b:
            async def all_done() -> bool:
                recs = [await b.ledger.get(k.decode()) for k, _ in records]
                return all(r is not None and r.state == "succeeded" for r in recs)

            await wait_for(all_done, 60, interval_s=0.3, what="every task to succeed")
            rec = await b.ledger.get("crash-1")
            assert rec is not None
            return rec.to_json()

    crash = asyncio.run(take_over())
    assert crash["fence"] == 2 and crash["state"] == "succeeded"
    assert fake_llm.calls_for("crash-1") == 2  # the dead worker's call, and the one that landed
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n + 1))
    values: dict[bytes | None, set[bytes | None]] = {}
    for m in results:
        values.setdefault(m.key, set()).add(m.value)
    assert set(values) == {k for k, _ in records}
    assert all(len(v) == 1 for v in values.values()), "a task has two different results"
    # a task finished under its first fence ran the model once: nothing finished was run again
    for m in results:
        body = m.json()
        if body["fence"] == 1:
            assert fake_llm.calls_for(body["task_id"] + ":") == 1, body["task_id"]
    assert calls_before >= 1


def test_sigterm_drains_in_flight_work_and_commits(make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    s: Settings = make_settings(kafka={"topic_partitions": 1})
    fake_llm.add_fault(FaultRule("latency", match="drain-", delay_s=2.0))
    records = [(f"drain-{i}".encode(), classify(f"drain-{i}", f"t{i}")) for i in range(5)]
    from service.runtime.wiring import ensure_topics
    from tests.support import committed

    ensure_topics(s)
    worker = spawn_worker(s, str(tmp_path / "worker.log"))
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)

        async def in_flight() -> None:
            await wait_for(lambda: fake_llm.stats()["requests"] == len(records), 60, what="all tasks in flight")

        asyncio.run(in_flight())
        os.killpg(worker.pid, signal.SIGTERM)
        assert worker.wait(30) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        kill_worker(worker)
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(records)))
    assert sorted(m.key for m in results) == sorted(k for k, _ in records)
    assert committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic, 1)[0] == len(records)
