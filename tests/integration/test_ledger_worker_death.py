"""A worker SIGKILLed in the middle of a model call did not fail the task: the worker that takes the
task over has the attempt back. Real Apache Kafka, redis-server, a service process and the HTTP model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import classify, kill_worker, produce, read_topic, running, spawn_worker, succeeded, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.mark.evicts_killed_members
def test_a_call_cut_short_by_a_sigkill_leaves_the_task_its_attempt(
    make_settings: Any, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    # one attempt per step: a death that spent it would leave the task `exhausted`
    s: Settings = make_settings(ledger={"lease_ms": 2000}, llm={"timeout_s": 60, "max_attempts": 1},
                                kafka={"topic_partitions": 1})
    fake_llm.add_fault(FaultRule("latency", match="death-1", times=1, delay_s=60))  # the call hangs
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    worker = spawn_worker(s, str(tmp_path / "worker.log"))
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"death-1", classify("death-1"))])

        async def wait_mid_call() -> None:
            await wait_for(lambda: fake_llm.calls_for("death-1") == 1 and worker.poll() is None, 60,
                           what="the worker to be inside the call of death-1")

        asyncio.run(wait_mid_call())
    finally:
        kill_worker(worker)

    async def take_over() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as b:
            async def ended() -> bool:
                record = await b.ledger.get("death-1")
                return record is not None and record.state in ("succeeded", "dead")

            await wait_for(ended, 90, interval_s=0.3, what="death-1 to end", service=b)
            record = await b.ledger.get("death-1")
            assert record is not None
            return record.to_json()

    ended = asyncio.run(take_over())
    assert (ended["state"], ended["dead_reason"]) == ("succeeded", None), ended
    assert (ended["attempts"], ended["deaths"]) == (1, 1)  # the call that landed; the death apart
    assert fake_llm.calls_for("death-1") == 2
    assert read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=0, timeout_s=3) == []
    assert len(succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))) == 1
