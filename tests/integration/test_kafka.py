"""What only Apache Kafka makes testable: real watermarks checked by Kafka's own tools, and clients
no one here wrote (Kafka's console consumer, kcat) on our topics.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools import kafka_jars
from service.devtools.fakellm import FakeLLM
from tests.support import classify, metric, produce, read_topic, running, succeeded, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only]


def _describe_group(bootstrap: str, group: str) -> list[dict[str, str]]:
    """``kafka-consumer-groups --describe``: one row per partition, columns by their header names."""
    out = kafka_jars.kafka_tool(kafka_jars.CONSUMER_GROUPS, "--bootstrap-server", bootstrap, "--describe", "--group", group)
    lines = [line.split() for line in out.splitlines() if line.strip()]
    header = next(i for i, cols in enumerate(lines) if cols[:2] == ["GROUP", "TOPIC"])
    names = lines[header]
    return [dict(zip(names, cols, strict=False)) for cols in lines[header + 1:] if cols[0] == group]


def test_consumer_lag_matches_kafkas_own_consumer_groups_tool(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(kafka={"topic_partitions": 3}, max_in_flight=4)
    fake_llm.latency_s = 0.1  # 300 tasks, 4 at a time: a backlog for 7 s at least
    n = 300
    seen_lag: list[float] = []
    rows: list[dict[str, str]] = []

    def total_lag(svc: Any) -> float:
        return sum(metric(svc, "agent_consumer_lag", {"topic": s.kafka.input_topic, "partition": str(p)})
                   for p in range(3))

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            svc.runner.config.lag_interval_s = 0.5
            await asyncio.to_thread(produce, s.kafka.bootstrap_servers, s.kafka.input_topic,
                                    [(f"lag-{i}".encode(), classify(f"lag-{i}")) for i in range(n)])
            await wait_for(lambda: total_lag(svc) > 0, 20, interval_s=0.1, what="a backlog in agent_consumer_lag")
            seen_lag.append(total_lag(svc))
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == n, 60,
                           what="every task")
            await svc.runner.commit()
            await wait_for(lambda: total_lag(svc) == 0, 20, interval_s=0.1, what="lag 0 after the run")
            rows.extend(await asyncio.to_thread(_describe_group, s.kafka.bootstrap_servers, s.kafka.group_id))

    asyncio.run(scenario())
    assert seen_lag[0] > 0
    assert sorted(int(r["PARTITION"]) for r in rows) == [0, 1, 2], rows
    for r in rows:  # Kafka's own view: everything consumed and committed
        assert r["TOPIC"] == s.kafka.input_topic
        assert r["LAG"] == "0" and r["CURRENT-OFFSET"] == r["LOG-END-OFFSET"], r
    assert sum(int(r["LOG-END-OFFSET"]) for r in rows) == n


def test_kcat_produces_tasks_and_kafkas_console_consumer_reads_the_dead_letters(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """Clients no one here wrote: kcat writes the tasks (headers included), Kafka's tool reads the DLQ."""
    kcat = shutil.which("kcat")
    assert kcat is not None, "kcat is not installed (Debian: apt-get install kcat; `make install` does it)"
    s: Settings = make_settings(kafka={"topic_partitions": 2})
    lines = [
        b"kc-1\t" + classify("kc-1"),
        b"kc-2\t" + classify("kc-2", "the strap snapped"),
        b"kc-bad\t{not json",
        b"kc-3\t" + json.dumps({"task_id": "kc-3", "kind": "nope", "input": {}}).encode(),
    ]

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            subprocess.run([kcat, "-P", "-b", s.kafka.bootstrap_servers, "-t", s.kafka.input_topic, "-K", "\t",
                            "-H", "x-origin=kcat"], input=b"\n".join(lines) + b"\n", check=True, timeout=30)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 2
                           and metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"}) == 2, 30,
                           what="two results and two dead letters")

    asyncio.run(scenario())
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=2))
    assert sorted(m.json()["task_id"] for m in results) == ["kc-1", "kc-2"]

    out = kafka_jars.kafka_tool(
        kafka_jars.CONSOLE_CONSUMER, "--bootstrap-server", s.kafka.bootstrap_servers, "--topic", s.kafka.dlq_topic,
        "--from-beginning", "--max-messages", "2", "--timeout-ms", "30000",
        "--formatter-property", "print.key=true", "--formatter-property", "print.headers=true",
        "--formatter-property", "key.separator=|", "--formatter-property", "headers.separator=;",
        "--formatter-property", "print.partition=true", "--formatter-property", "print.offset=true",
    )
    letters = [line for line in out.splitlines() if "dlq.reason:" in line]
    assert len(letters) == 2, out
    by_key = {line.split("|")[-2]: line for line in letters}
    assert set(by_key) == {"kc-bad", "kc-3"}, letters
    assert "dlq.reason:decode" in by_key["kc-bad"] and "dlq.reason:schema" in by_key["kc-3"]
    for line in letters:  # the producer's header and the original coordinates travel with the letter
        assert "x-origin:kcat" in line and f"dlq.original.topic:{s.kafka.input_topic}" in line
        assert "dlq.original.offset:" in line and "dlq.failed_at:" in line
    assert by_key["kc-bad"].endswith("|{not json")
