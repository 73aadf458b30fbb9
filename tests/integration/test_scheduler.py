"""A 1-second schedule run by a real service (``Service.run``: the scheduler starts beside the
sweeper) on the broker and a Redis of its own, the fake model answering: every slot is produced to
the input topic with its deterministic id and headers, the slots are consecutive (no gap), each
slot's task has one result, the lag is observed; and a Redis stopped for a few seconds mid-run loses
no slot (``catch_up = "all"``: the slots missed while it was away are produced once it is back)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM
from tests.support import metric, read_topic, succeeded, wait_for
from tests.support.fleet import deployment, serving

pytestmark = pytest.mark.integration

NAME = "heartbeat"
SCHEDULE = {
    "name": NAME, "kind": "classify", "every_s": 1, "catch_up": "all", "max_catch_up": 100,
    "deadline_s": 600,  # the slots caught up after the outage are late: they must not expire
    "input": {"text": "the check at {slot} ({schedule})", "labels": ["ok", "late", "broken"]},
}


def slot_of(task_id: str) -> datetime:
    name, _, text = task_id.partition("@")
    assert name == NAME, task_id
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def produced(service: Any) -> float:
    return metric(service, "agent_schedule_slots_total", {"schedule": NAME, "outcome": "produced"})


def test_each_slot_is_produced_once_in_order_and_a_redis_outage_loses_none(
    make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str, tmp_path: Path,
) -> None:
    redis_server = local.start_redis(tmp_path / "redis")
    s: Settings = deployment(make_settings, "sched", redis={"url": f"redis://{redis_server.address}/0"},
                             scheduler={"schedules": [SCHEDULE], "tick_s": 0.2})
    started = datetime.now(UTC)

    async def scenario() -> float:
        async with serving(s, fake_llm.base_url) as service:
            await wait_for(lambda: produced(service) >= 3, 60, 0.1, what="three slots produced", service=service)
            await asyncio.to_thread(redis_server.stop)
            before = produced(service)
            await asyncio.sleep(4)  # four slots fall due while Redis is away
            assert produced(service) == before, "a slot was counted produced with Redis away"
            assert metric(service, "agent_schedule_errors_total", {"schedule": NAME}) >= 1, "failed ticks not counted"
            await asyncio.to_thread(redis_server.restart)
            await wait_for(lambda: produced(service) >= before + 8, 90, 0.1,
                           what="the missed slots and the next ones produced", service=service)
            lag = metric(service, "agent_schedule_lag_seconds_count", {"schedule": NAME})
            assert lag >= produced(service), "a produced slot's lag was not observed"
            # the slots caught up after the outage were produced late: the histogram saw it
            assert metric(service, "agent_schedule_lag_seconds_bucket", {"schedule": NAME, "le": "1.0"}) < lag
            return produced(service)

    try:
        count = asyncio.run(scenario())
    finally:
        redis_server.stop()
    stopped = datetime.now(UTC)

    tasks = read_topic(kafka_bootstrap, s.kafka.input_topic, expect=int(count), timeout_s=60)
    ids = [m.key.decode() for m in tasks if m.key is not None]
    assert len(ids) == len(tasks) >= count
    for m in tasks:  # each record names its schedule and slot, and carries the task id in its body
        assert m.headers["agent.schedule"] == NAME.encode()
        assert m.key is not None and m.headers["agent.slot"].decode() == m.key.decode().partition("@")[2]
        assert m.json()["task_id"] == m.key.decode() and m.json()["kind"] == "classify"
    slots = sorted({slot_of(i) for i in ids})
    # the first slot is within the grace of the start; from it on, every second, no gap
    assert started - timedelta(seconds=2) <= slots[0] and slots[-1] <= stopped
    assert slots == [slots[0] + timedelta(seconds=n) for n in range(len(slots))], "a slot is missing"
    assert len(slots) >= count
    # each slot's task ran and has exactly one result (the same bytes if emitted twice)
    results = succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=len(slots), timeout_s=90))
    by_id: dict[str, set[bytes | None]] = defaultdict(set)
    for m in results:
        assert m.key is not None
        by_id[m.key.decode()].add(m.value)
    assert set(by_id) == {f"{NAME}@{slot:%Y-%m-%dT%H:%M:%SZ}" for slot in slots}, "a slot's task has no result"
    assert all(len(values) == 1 for values in by_id.values()), "a slot's task has two different results"
