"""A real task through the embedded model: SmolLM2 on llama.cpp's OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools import local
from tests.support import classify, metric, produce, read_topic, running, succeeded, task_value, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.embedded_llm]


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = local.start_local_model(Path(tmp_path_factory.mktemp("llm")))
    try:
        yield f"http://{server.address}/v1"
    finally:
        server.stop()


def test_a_task_runs_through_the_embedded_model(make_settings: Any, local_model: str) -> None:
    s: Settings = make_settings(llm={"base_url": local_model, "model": "smollm2", "timeout_s": 60,
                                     "response_format": "json_object", "max_attempts": 3})
    records = [
        (b"emb-1", classify("emb-1", "I want my money back, the product broke after a day.")),
        (b"emb-2", task_value("extract", {"document": "Invoice 2291 from Acme Ltd.", "fields": ["vendor"]}, "emb-2")),
    ]

    async def scenario() -> float:
        async with running(s, local_model) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"})
                           + metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"}) == 2, 180,
                           interval_s=0.5, what="both tasks")
            return metric(svc, "agent_llm_tokens_total", {"direction": "output"})

    tokens = asyncio.run(scenario())
    assert tokens > 0
    results = {m.key: m.json() for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))}
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=0, idle_s=0.5, timeout_s=3)
    assert len(results) + len(dead) == 2
    for m in dead:  # a wrong answer from a small model is refused, never written
        assert m.headers["dlq.reason"] == b"invalid_output"
    # the grammar-constrained answer for classify always names one of the labels
    assert results[b"emb-1"]["result"]["label"] in {"complaint", "praise", "question"}
    assert results[b"emb-1"]["model"] == "smollm2"
