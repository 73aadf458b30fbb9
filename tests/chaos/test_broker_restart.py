"""The broker restarts mid-run (it keeps its data): nothing is lost, nothing is committed early."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools import kraft
from service.devtools.fakellm import FakeLLM
from tests.support import classify, committed, produce, read_topic, running, succeeded, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_broker_restart_loses_nothing(make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    # a broker of its own, since this test restarts it: Apache Kafka (noida-db keeps its data across a
    # restart but has lost acknowledged records doing so, and desynchronizes idempotent producers)
    broker = kraft.start_kafka(tmp_path / "kafka")
    try:
        s: Settings = make_settings(kafka={"bootstrap_servers": broker.address, "topic_partitions": 2})
        fake_llm.latency_s = 0.05
        n = 150
        records = [(f"br-{i}".encode(), classify(f"br-{i}", f"t{i}")) for i in range(n)]

        async def scenario() -> None:
            async with running(s, fake_llm.base_url) as svc:
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)
                await wait_for(lambda: fake_llm.stats()["requests"] >= 30, what="work under way")
                await asyncio.to_thread(broker.restart)

                async def all_done() -> bool:
                    recs = [await svc.ledger.get(f"br-{i}") for i in range(n)]
                    return all(r is not None and r.state == "succeeded" and r.published
                               for r in recs)

                await wait_for(all_done, 90, interval_s=0.5, what="every task published", service=svc)
                await wait_for(lambda: sum(committed(s.kafka.bootstrap_servers, s.kafka.group_id,
                                                     s.kafka.input_topic, 2).values()) == n, 60,
                               interval_s=0.5, what="offsets committed to the end", service=svc)

        asyncio.run(scenario())
        values: dict[bytes | None, set[bytes | None]] = defaultdict(set)
        for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n)):
            values[m.key].add(m.value)
        assert len(values) == n and all(len(v) == 1 for v in values.values())
        calls = fake_llm.stats()["by_step"]
        assert all(calls[f"br-{i}:classify"] == 1 for i in range(n))
    finally:
        broker.stop()
