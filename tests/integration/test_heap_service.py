"""``AGENT_GC_FREEZE`` and ``AGENT_GC_GEN0_THRESHOLD``: ``agent-service run`` settles its garbage collector
once it is built, says so at its start, and handles its tasks as before. Real Apache Kafka, redis-server, a
service process and the HTTP model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from tests.support import classify, produce, read_topic, spawn_worker, stop_workers, succeeded

pytestmark = [pytest.mark.integration]


def test_a_service_with_a_settled_collector_gives_each_task_one_result(make_settings: Any, fake_llm: FakeLLM,
                                                                        tmp_path: Path) -> None:
    s: Settings = make_settings(log_level="INFO", gc_gen0_threshold=20_000)
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    log = tmp_path / "worker.log"
    worker = spawn_worker(s, str(log))
    ids = [f"gc-{i:02d}" for i in range(30)]
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(i.encode(), classify(i)) for i in ids])
        results = read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids), timeout_s=120)
    finally:
        stop_workers([worker])
    assert sorted(m.json()["task_id"] for m in succeeded(results)) == sorted(ids)
    assert all(fake_llm.calls_for(i) == 1 for i in ids)
    said = re.search(r"gc=froze ([\d,]+) objects of the start, gen0 (\d+)", log.read_text())
    assert said is not None, "the start names how it set the collector"
    assert int(said[1].replace(",", "")) > 10_000 and said[2] == "20000"
