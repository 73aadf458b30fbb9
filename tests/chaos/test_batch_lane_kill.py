"""The batch lane with its worker SIGKILLed: between the batch's submission and its poll, and while
the batch's answers are being published. Every task ends with one result (a re-emission after a
crash is the same bytes), every batch is submitted once (the fake model counts them by name), every
call is answered once by its batch, and no call goes online.

The kind is ``batch_classify`` (:mod:`tests.support.batch_kinds`), loaded by each worker through
``AGENT_AGENTS``.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import ensure_topics
from tests.support import kill_worker, produce, read_topic, spawn_worker, stop_workers, succeeded, task_value
from tests.support.batch_kinds import KIND, LABELS
from tests.support.fleet import ledger_of, states, wait_ended

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def lane_settings(make_settings: Any) -> Settings:
    s: Settings = make_settings(agents="tests.support.batch_kinds:agents", tools={"sweep_interval_s": 0.3},
                                batch={"max_age_s": 0.5, "lease_s": 3}, ledger={"lease_ms": 2000})
    return s


def produce_tasks(s: Settings, ids: list[str]) -> None:
    produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
            [(t.encode(), task_value(KIND, {"text": f"text of {t}", "labels": LABELS}, t)) for t in ids])


def wait_until(what: str, predicate: Any, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def succeeded_now(s: Settings, ids: list[str]) -> int:
    async def count() -> int:
        async with ledger_of(s) as ledger:
            return sum(1 for state in (await states(ledger, ids)).values() if state == "succeeded")

    return asyncio.run(count())


def settle_and_check(s: Settings, ids: list[str], fake_llm: FakeLLM) -> None:
    async def settle() -> None:
        async with ledger_of(s) as ledger:
            await wait_ended(ledger, ids, timeout_s=180, what="every task to end")
            got = await states(ledger, ids)
        assert set(got.values()) == {"succeeded"}, got

    asyncio.run(settle())
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids), timeout_s=90))
    by_id: dict[str, set[bytes | None]] = defaultdict(set)
    for m in results:
        assert m.key is not None
        by_id[m.key.decode()].add(m.value)
    assert set(by_id) == set(ids), "a task has no result"
    assert all(len(v) == 1 for v in by_id.values()), "a task has two different results"
    stats = fake_llm.batches.stats()
    assert stats["created_by_name"] and all(n == 1 for n in stats["created_by_name"].values()), \
        f"a batch was submitted twice: {stats['created_by_name']}"
    assert sum(stats["answered_by_id"].values()) == len(ids) and set(stats["answered_by_id"].values()) == {1}
    assert fake_llm.stats()["requests"] == 0, "a call went online"


def test_a_worker_killed_between_submit_and_poll(make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    s = lane_settings(make_settings)
    fake_llm.batches.set_faults(delay_s=4)  # in progress for a while after its submission
    ids = [f"ks-{i}" for i in range(8)]
    ensure_topics(s)
    workers = [spawn_worker(s, str(tmp_path / "w0.log"))]
    try:
        produce_tasks(s, ids)
        wait_until("the batch's submission", lambda: fake_llm.batches.stats()["batches"] >= 1)
        kill_worker(workers[0])
        workers[0] = spawn_worker(s, str(tmp_path / "w1.log"))
        settle_and_check(s, ids, fake_llm)
    finally:
        stop_workers(workers)


def test_a_worker_killed_while_the_answers_are_published(make_settings: Any, fake_llm: FakeLLM,
                                                         tmp_path: Path) -> None:
    s = lane_settings(make_settings)
    fake_llm.latency_s = 0.02
    ids = [f"kp-{i}" for i in range(100)]
    ensure_topics(s)
    workers = [spawn_worker(s, str(tmp_path / "w0.log"))]
    try:
        produce_tasks(s, ids)
        wait_until("the first answer published", lambda: succeeded_now(s, ids) >= 1)
        kill_worker(workers[0])
        assert succeeded_now(s, ids) < len(ids), "every answer was published before the kill"
        workers[0] = spawn_worker(s, str(tmp_path / "w1.log"))
        settle_and_check(s, ids, fake_llm)
    finally:
        stop_workers(workers)
