"""Several worker processes in one group, killed and restarted at random while tasks flow and the
model misbehaves; then the truth is read from the outside and checked.

Invariants: every produced record is accounted for (a result, or a dead letter with its reason);
no task has two different results; every task ended in the ledger; model calls per task reported.
``CHAOS_SECONDS`` (default 20) sets how long the kills go on; ``make chaos`` runs longer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dedup.keys import Keys
from dedup.ledger import Ledger
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from service.runtime.wiring import ensure_topics
from tests.support import (
    Broker,
    classify,
    kill_worker,
    produce,
    read_topic,
    spawn_worker,
    stop_workers,
    succeeded,
    task_value,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

WORKERS = 3


@pytest.mark.evicts_killed_members
def test_random_kills_and_model_faults_keep_every_invariant(
    broker: Broker, make_settings: Any, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    seconds = float(os.environ.get("CHAOS_SECONDS", "20"))
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "7")))
    s: Settings = make_settings(
        kafka={"topic_partitions": 6},
        ledger={"lease_ms": 2000},
        llm={"max_attempts": 5, "timeout_s": 1.0, "breaker_failures": 50},
        max_in_flight=32,
    )
    fake_llm.latency_s = 0.02
    fake_llm.set_faults([
        FaultRule("slow_success", probability=0.03, delay_s=1.5),
        FaultRule("rate_limit", probability=0.03, retry_after_s=1),
        FaultRule("error", probability=0.04, status=503),
        FaultRule("truncate", probability=0.02),
    ])
    n = 600
    tasks = {f"c-{i}": classify(f"c-{i}", f"text {i}") for i in range(n)}
    poison = {b"p-decode": b"{nope", b"p-schema": task_value("classify", {"text": "x"}, "p-schema")}
    ensure_topics(s)
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = [spawn_worker(s, str(logs / f"w{i}.log")) for i in range(WORKERS)]
    kills = 0
    try:
        records: list[Any] = [(k.encode(), v) for k, v in tasks.items()]
        records += [(k, v) for k, v in poison.items()]
        records += [(k.encode(), v) for k, v in list(tasks.items())[:50]]  # redeliveries
        records.append((b"c-1", classify("c-1", "another input under the same id")))  # a conflict
        rng.shuffle(records)
        half = len(records) // 2
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records[:half])
        end = time.monotonic() + seconds
        produced_rest = False
        while time.monotonic() < end:
            time.sleep(rng.uniform(1.5, 3.0))
            victim = rng.randrange(WORKERS)
            kill_worker(workers[victim])  # SIGKILL its process group, and reap it
            kills += 1
            workers[victim] = spawn_worker(s, str(logs / f"w{victim}.log"))
            if not produced_rest:
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records[half:])
                produced_rest = True
        fake_llm.clear_faults()
        states = asyncio.run(_wait_settled(s, list(tasks) + ["p-schema"], timeout_s=120))
    finally:
        stop_workers(workers, grace_s=30)  # SIGTERM, SIGKILL after 30 s, and every one reaped
    report = _check(s, tasks, poison, states, fake_llm)
    report["kills"] = kills
    print("chaos:", json.dumps(report, sort_keys=True))
    assert kills >= 3


async def _wait_settled(s: Settings, keys: list[str], timeout_s: float) -> dict[str, str]:
    client = aioredis.from_url(s.redis.url.get_secret_value())
    ledger = Ledger(client, keys=Keys(s.redis.key_prefix))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            states = {}
            for key in keys:
                rec = await ledger.get(key)
                states[key] = rec.state if rec is not None else "missing"
            if all(v in ("succeeded", "dead") for k, v in states.items() if k.startswith("c-")) or \
                    time.monotonic() > deadline:
                return states
            await asyncio.sleep(1.0)
    finally:
        await client.aclose()


def _check(s: Settings, tasks: dict[str, bytes], poison: dict[bytes, bytes], states: dict[str, str],
           fake: FakeLLM) -> dict[str, Any]:
    unfinished = {k: v for k, v in states.items() if k.startswith("c-") and v not in ("succeeded", "dead")}
    assert not unfinished, f"tasks never finished: {list(unfinished.items())[:10]}"
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(tasks), idle_s=3))
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=3, idle_s=3)
    values: dict[str, set[bytes | None]] = defaultdict(set)
    for m in results:
        values[(m.key or b"").decode()].add(m.value)
    two = {k: len(v) for k, v in values.items() if len(v) > 1}
    assert not two, f"tasks with two different results: {two}"
    dead_keys = {(m.key or b"").decode(): m.headers["dlq.reason"].decode() for m in dead}
    for key in tasks:  # every task: a result, or a dead letter with a reason
        assert key in values or key in dead_keys, f"{key} is neither a result nor a dead letter"
        if states[key] == "succeeded":
            assert key in values, f"{key} succeeded in the ledger but its result never reached the topic"
    reasons = Counter(m.headers["dlq.reason"].decode() for m in dead)
    assert reasons["decode"] >= 1 and reasons["schema"] >= 1 and reasons["conflict"] >= 1
    for m in dead:
        assert m.headers["dlq.original.topic"] == s.kafka.input_topic.encode()
    calls = fake.stats()["by_step"]
    per_task = Counter(calls.get(f"{k}:classify", 0) for k in tasks)
    return {
        "tasks": len(tasks), "results_distinct": len(values), "result_records": len(results),
        "dead_letters": dict(reasons), "ledger": dict(Counter(states.values())),
        "llm_calls": sum(calls.values()), "calls_per_task": {str(k): v for k, v in sorted(per_task.items())},
    }
