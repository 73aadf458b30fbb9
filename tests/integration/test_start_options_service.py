"""Start options of ``agent-service run`` that change how the process runs, not what it does: on
uvloop's event loop (``AGENT_EVENT_LOOP=uvloop``), and with its garbage collector settled once it is
built (``AGENT_GC_FREEZE``, ``AGENT_GC_GEN0_THRESHOLD``), it handles its tasks as by default and says
so at its start. Real Apache Kafka, redis-server, a service process and the HTTP model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import ensure_topics
from tests.support import classify, produce, read_topic, spawn_worker, stop_workers, succeeded

pytestmark = [pytest.mark.integration]


def run_thirty(s: Settings, fake_llm: FakeLLM, tmp_path: Path, prefix: str) -> str:
    """Thirty tasks through one worker: each one result from one model call; returns the worker's log."""
    ensure_topics(s)
    log = tmp_path / "worker.log"
    worker = spawn_worker(s, str(log))
    ids = [f"{prefix}-{i:02d}" for i in range(30)]
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(i.encode(), classify(i)) for i in ids])
        results = read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids), timeout_s=120)
    finally:
        stop_workers([worker])
    assert sorted(m.json()["task_id"] for m in succeeded(results)) == sorted(ids)
    assert all(fake_llm.calls_for(i) == 1 for i in ids)
    return log.read_text()


def test_a_service_on_uvloop_gives_each_task_one_result(make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    s: Settings = make_settings(event_loop="uvloop", log_level="INFO", kafka={"topic_partitions": 2})
    assert "loop=uvloop" in run_thirty(s, fake_llm, tmp_path, "uv")  # uvloop's loop ran it, not asyncio's


def test_a_service_with_a_settled_collector_gives_each_task_one_result(make_settings: Any, fake_llm: FakeLLM,
                                                                        tmp_path: Path) -> None:
    s: Settings = make_settings(log_level="INFO", gc_gen0_threshold=20_000)
    said = re.search(r"gc=froze ([\d,]+) objects of the start, gen0 (\d+)", run_thirty(s, fake_llm, tmp_path, "gc"))
    assert said is not None, "the start names how it set the collector"
    assert int(said[1].replace(",", "")) > 10_000 and said[2] == "20000"
