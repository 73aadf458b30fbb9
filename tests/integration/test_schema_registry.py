"""Task events written through a real Schema Registry (Apicurio's, through Confluent's API): Avro and
JSON Schema decoded and processed; a record the registry cannot read dead-lettered ``decode`` beside
healthy ones; the registry down is an outage waited out, never a dead letter."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.devtools.schema_registry import start_schema_registry
from tests.support import metric, produce, read_topic, running, succeeded, wait_for

pytestmark = pytest.mark.integration

LABELS = ["complaint", "praise", "question"]
AVRO_TASK = json.dumps({
    "type": "record", "name": "ClassifyTask", "namespace": "tests.registry",
    "fields": [
        {"name": "task_id", "type": "string"},
        {"name": "kind", "type": "string"},
        {"name": "input", "type": {"type": "record", "name": "ClassifyInput", "fields": [
            {"name": "text", "type": "string"},
            {"name": "labels", "type": {"type": "array", "items": "string"}},
        ]}},
        {"name": "deadline", "type": ["null", "string"], "default": None},
    ],
})
JSON_SCHEMA_TASK = json.dumps({
    "$schema": "http://json-schema.org/draft-07/schema#", "title": "ClassifyTask", "type": "object",
    "properties": {"task_id": {"type": "string"}, "kind": {"type": "string"},
                   "input": {"type": "object", "properties": {"text": {"type": "string"},
                                                              "labels": {"type": "array", "items": {"type": "string"}}},
                             "required": ["text", "labels"]}},
    "required": ["task_id", "kind", "input"],
})


def task(task_id: str) -> dict[str, Any]:
    return {"task_id": task_id, "kind": "classify", "input": {"text": "the parcel arrived broken", "labels": LABELS}}


def encoded(url: str, fmt: str, topic: str, ids: list[str]) -> list[tuple[bytes, bytes]]:
    """The tasks as a producer writes them through the registry (registering the schema)."""
    with SchemaRegistryClient({"url": url}) as client:
        serialize = (AvroSerializer(client, AVRO_TASK) if fmt == "avro" else JSONSerializer(JSON_SCHEMA_TASK, client))
        ctx = SerializationContext(topic, MessageField.VALUE)
        return [(i.encode(), serialize(task(i), ctx)) for i in ids]


def settings_for(make_settings: Any, url: str, fmt: str) -> Settings:
    s: Settings = make_settings(schema_registry={"url": url, "input_format": fmt, "timeout_s": 2})
    return s


def results_of(s: Settings, expect: int) -> dict[str, dict[str, Any]]:
    return {m.key.decode(): m.json() for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic,
                                                                     expect=expect, timeout_s=60)) if m.key}


def test_avro_tasks_are_processed_and_unreadable_records_dead_lettered_beside_them(
        make_settings: Any, fake_llm: FakeLLM, schema_registry_url: str) -> None:
    s = settings_for(make_settings, schema_registry_url, "avro")
    good = encoded(schema_registry_url, "avro", s.kafka.input_topic, [f"avro-{i}" for i in range(4)])
    body = good[0][1]
    unknown_id = body[:1] + (987_654).to_bytes(4, "big") + body[5:]  # framed, but no such schema
    bad = [(b"bad-id", unknown_id), (b"bad-magic", b"\x07" + body[1:])]
    good.append((b"plain-json", json.dumps(task("plain-json")).encode()))  # as the service's own producers write

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [good[0], bad[0], good[1], bad[1], *good[2:]])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == len(good),
                           timeout_s=90, what="the Avro tasks succeed")
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "decode"}) == len(bad),
                           timeout_s=60, what="the unreadable records dead-lettered")

    asyncio.run(scenario())
    results = results_of(s, len(good))
    assert set(results) == {k.decode() for k, _ in good}
    assert all(r["result"]["label"] in LABELS for r in results.values())
    letters = {m.key: m for m in read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=len(bad))}
    assert set(letters) == {k for k, _ in bad}
    assert {m.headers["dlq.reason"] for m in letters.values()} == {b"decode"}
    assert b"40403" in letters[b"bad-id"].headers["dlq.error"]  # the registry's own error: no such schema id
    assert b"magic byte" in letters[b"bad-magic"].headers["dlq.error"]  # neither framed nor JSON
    assert letters[b"bad-magic"].value == bad[1][1]  # the original bytes, for a replay once fixed


def test_json_schema_tasks_are_processed(make_settings: Any, fake_llm: FakeLLM, schema_registry_url: str) -> None:
    s = settings_for(make_settings, schema_registry_url, "jsonschema")
    good = encoded(schema_registry_url, "jsonschema", s.kafka.input_topic, [f"js-{i}" for i in range(3)])

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, good)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == len(good),
                           timeout_s=90, what="the JSON Schema tasks succeed")

    asyncio.run(scenario())
    assert set(results_of(s, len(good))) == {k.decode() for k, _ in good}


def test_registry_down_is_an_outage_waited_out_not_a_dead_letter(
        make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    registry = start_schema_registry(tmp_path / "registry")  # its own: this test stops it
    try:
        s = settings_for(make_settings, registry.url, "avro")
        good = encoded(registry.url, "avro", s.kafka.input_topic, [f"out-{i}" for i in range(5)])
        registry.stop()  # down before the service ever asked it for the schema

        async def scenario() -> None:
            async with running(s, fake_llm.base_url) as svc:
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic, good)
                await wait_for(lambda: svc.processor.holding() == "schema registry outage", timeout_s=60,
                               what="the outage noticed")
                await wait_for(lambda: svc.runner.retrying > 0, timeout_s=30, what="records retrying")
                await asyncio.sleep(3)  # a few retries against nothing: still no verdict on any record
                assert metric(svc, "agent_dead_letters_total", {"reason": "decode"}) == 0
                assert metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 0
                await asyncio.to_thread(registry.start)
                await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == len(good),
                               timeout_s=120, what="every task once the registry is back")
                assert svc.processor.holding() != "schema registry outage"

        asyncio.run(scenario())
    finally:
        registry.stop()
    assert set(results_of(s, len(good))) == {k.decode() for k, _ in good}
    assert read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, timeout_s=5) == []
