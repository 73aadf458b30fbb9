"""``AGENT_EVENT_LOOP=uvloop``: ``agent-service run`` on uvloop's event loop handles its tasks as on
asyncio's. Real Apache Kafka, redis-server, a service process and the HTTP model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from tests.support import classify, produce, read_topic, spawn_worker, stop_workers, succeeded

pytestmark = [pytest.mark.integration]


def test_a_service_on_uvloop_gives_each_task_one_result(make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    s: Settings = make_settings(event_loop="uvloop", log_level="INFO", kafka={"topic_partitions": 2})
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    log = tmp_path / "worker.log"
    worker = spawn_worker(s, str(log))
    ids = [f"uv-{i:02d}" for i in range(30)]
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(i.encode(), classify(i)) for i in ids])
        results = read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids), timeout_s=120)
    finally:
        stop_workers([worker])
    assert sorted(m.json()["task_id"] for m in succeeded(results)) == sorted(ids)
    assert all(fake_llm.calls_for(i) == 1 for i in ids)
    assert "loop=uvloop" in log.read_text()  # it ran on uvloop's loop, not asyncio's
