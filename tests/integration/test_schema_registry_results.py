"""Result events written through a real Schema Registry (Apicurio's, through Confluent's API): read by a
plain confluent_kafka consumer with the registry's deserializer and by the SDK's TopicClient, on the
plain and the transactional output paths, a failed event naming its dead letter as well; the registry
down while results wait to be published is an outage waited out: every task exactly one result."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from service.devtools.schema_registry import start_schema_registry
from service.sdk.client import Outcome, TopicClient
from tests.support import metric, read_topic, running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only]

LABELS = ["complaint", "praise", "question"]


def settings_for(make_settings: Any, url: str, fmt: str, transactional: bool = False) -> Settings:
    kafka: dict[str, Any] = {"transactional": True, "transactional_id": f"tx-{uuid.uuid4().hex[:8]}"} \
        if transactional else {}
    s: Settings = make_settings(schema_registry={"url": url, "results_format": fmt, "timeout_s": 2}, kafka=kafka)
    return s


def read_with_registry(s: Settings, url: str, fmt: str, expect: int) -> list[tuple[str, dict[str, Any]]]:
    """The results topic as a plain confluent_kafka consumer reads it with the registry's deserializer:
    (key, value) in the order written."""
    registry = SchemaRegistryClient({"url": url})
    deserialize: AvroDeserializer | JSONDeserializer = (
        AvroDeserializer(registry) if fmt == "avro" else JSONDeserializer(None, schema_registry_client=registry))
    ctx = SerializationContext(s.kafka.results_topic, MessageField.VALUE)
    out: list[tuple[str, dict[str, Any]]] = []
    try:
        for m in read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=expect, timeout_s=60):
            assert m.value is not None and m.value[:1] == b"\x00", "a result not framed by the registry"
            assert m.key is not None
            out.append((m.key.decode(), deserialize(m.value, ctx)))  # type: ignore[arg-type]
    finally:
        registry.close()
    return out


@pytest.mark.parametrize(("fmt", "transactional"), [("avro", False), ("avro", True), ("jsonschema", False)])
def test_results_and_failed_events_through_the_registry_read_by_a_plain_consumer_and_the_topic_client(
        make_settings: Any, fake_llm: FakeLLM, schema_registry_url: str, fmt: str, transactional: bool) -> None:
    s = settings_for(make_settings, schema_registry_url, fmt, transactional)
    fake_llm.add_fault(FaultRule("error", match="-fail-", status=400))  # permanent: a dead letter, a failed event
    k = s.kafka
    ids = ["r-ok-1", "r-ok-2", "r-fail-3", "r-ok-4"]

    async def scenario() -> dict[str, Outcome]:
        async with running(s, fake_llm.base_url), TopicClient(
                k.bootstrap_servers, input_topic=k.input_topic, results_topic=k.results_topic,
                schema_registry={"url": schema_registry_url}) as client:
            for task_id in ids:
                await client.asubmit("classify", {"text": f"text of {task_id}", "labels": LABELS}, task_id)
            return {t: await client.aresult(t, 120) for t in ids}

    outcomes = asyncio.run(scenario())
    for task_id, outcome in outcomes.items():  # the SDK reads them as it reads JSON results
        if "-fail-" in task_id:
            assert (outcome.outcome, outcome.reason, outcome.kind) == ("failed", "permanent", "classify"), outcome
        else:
            assert outcome.succeeded and outcome.result["label"] in LABELS, outcome
    events = read_with_registry(s, schema_registry_url, fmt, len(ids))
    assert sorted(key for key, _ in events) == sorted(ids), "a task without one event, or with two"
    by_id = dict(events)
    letters = read_topic(k.bootstrap_servers, k.dlq_topic, expect=1)
    assert [m.headers["dlq.task_id"] for m in letters] == [b"r-fail-3"]
    failed = by_id["r-fail-3"]
    assert (failed["outcome"], failed["reason"]) == ("failed", "permanent")
    assert failed["dead_letter"] == {"topic": k.dlq_topic, "partition": letters[0].partition,
                                     "offset": letters[0].offset, "id": letters[0].headers["dlq.id"].decode()}
    assert outcomes["r-fail-3"].dead_letter == failed["dead_letter"]
    ok = by_id["r-ok-1"]
    assert ok["outcome"] == "succeeded" and ok["task_id"] == "r-ok-1"
    # Avro carries the free-form result as JSON text; JSON Schema the object itself
    assert (json.loads(ok["result"]) if fmt == "avro" else ok["result"]) == outcomes["r-ok-1"].result
    with SchemaRegistryClient({"url": schema_registry_url}) as registry:  # one subject per topic (TopicNameStrategy)
        latest = registry.get_latest_version(f"{k.results_topic}-value")
        assert latest.schema.schema_type == ("AVRO" if fmt == "avro" else "JSON")


def test_registry_down_while_results_wait_is_an_outage_then_every_task_exactly_one_result(
        make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    registry = start_schema_registry(tmp_path / "registry")  # its own: this test stops it
    ids = [f"down-{i}" for i in range(12)]
    try:
        s = settings_for(make_settings, registry.url, "avro")
        k = s.kafka
        registry.stop()  # down before the service ever registered the result schema

        async def scenario() -> None:
            async with running(s, fake_llm.base_url) as svc, TopicClient(
                    k.bootstrap_servers, input_topic=k.input_topic, results_topic=k.results_topic,
                    schema_registry={"url": registry.url}) as client:
                for task_id in ids[:6]:
                    await client.asubmit("classify", {"text": f"text of {task_id}", "labels": LABELS}, task_id)
                await wait_for(lambda: svc.processor.holding() == "schema registry outage", timeout_s=90,
                               what="the outage noticed")
                await wait_for(lambda: svc.runner.retrying > 0, timeout_s=30, what="records retrying")
                for task_id in ids[6:]:  # more tasks arrive during the outage
                    await client.asubmit("classify", {"text": f"text of {task_id}", "labels": LABELS}, task_id)
                await asyncio.sleep(3)  # retries against nothing: no result published, none dead-lettered
                assert metric(svc, "agent_results_published_total") == 0
                assert sum(metric(svc, "agent_dead_letters_total", {"reason": r})
                           for r in ("internal", "decode", "permanent")) == 0
                await asyncio.to_thread(registry.start)
                outcomes = [await client.aresult(t, 180) for t in ids]
                assert all(o.succeeded and o.result["label"] in LABELS for o in outcomes), outcomes
                assert svc.processor.holding() != "schema registry outage"

        asyncio.run(scenario())
        events = read_with_registry(s, registry.url, "avro", len(ids))
    finally:
        registry.stop()
    assert Counter(key for key, _ in events) == Counter(ids), "every task exactly one result"
    assert all(value["outcome"] == "succeeded" for _, value in events)
    assert read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, timeout_s=5) == []
