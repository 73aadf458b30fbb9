"""The HTTP API against a running service: a real broker, a real redis-server and the fake model."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from service.api.app import create_app
from service.api.security import READS_DISABLED, SUBMIT_DISABLED
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from service.runtime.wiring import Service, build, ensure_topics
from tests.support import classify, metric, read_topic, running, succeeded, wait_for

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer s3cret"}
READ = {"Authorization": "Bearer r3ad"}
LABELS = ["complaint", "praise", "question"]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@contextlib.asynccontextmanager
async def api(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
        yield client


def produce_one(bootstrap: str, topic: str, key: bytes, value: bytes,
                headers: list[tuple[str, str | bytes | None]] | None = None) -> tuple[int, int]:
    """Produce one record and return where it landed."""
    landed: list[tuple[int, int]] = []

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        landed.append((msg.partition(), msg.offset()))

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    producer.produce(topic, key=key, value=value, headers=headers, on_delivery=delivered)
    assert producer.flush(30) == 0
    return landed[0]


async def task_state(client: httpx.AsyncClient, task_id: str) -> str | None:
    r = await client.get(f"/tasks/{task_id}", headers=AUTH)  # the admin token reads too
    return r.json()["state"] if r.status_code == 200 else None


async def dead_letters(client: httpx.AsyncClient, headers: dict[str, str] = AUTH) -> list[dict[str, Any]]:
    r = await client.get("/dlq", params={"limit": 100}, headers=headers)
    assert r.status_code == 200, r.text
    letters: list[dict[str, Any]] = r.json()
    return letters


def test_health_readiness_and_metrics(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()

    async def ready(client: httpx.AsyncClient) -> bool:
        return (await client.get("/readyz")).status_code == 200

    async def scenario() -> None:
        await asyncio.to_thread(ensure_topics, s)
        service = build(s, llm_base_url=fake_llm.base_url)
        try:
            async with api(service) as client:
                r = await client.get("/healthz")
                assert r.status_code == 200 and r.json() == {"status": "ok"}
                r = await client.get("/readyz")
                assert r.status_code == 503
                body = r.json()
                assert body["ready"] is False
                assert body["checks"]["assigned"] is False
                assert body["checks"]["redis"] is True and body["checks"]["kafka"] is True

                consumer = asyncio.create_task(service.runner.run())
                try:
                    await wait_for(lambda: ready(client), 60, 0.2, what="readyz 200")
                    assert (await client.get("/readyz")).json()["ready"] is True
                    r = await client.get("/metrics")
                    assert r.status_code == 200
                    assert r.headers["content-type"].startswith("text/plain")
                    assert "agent_tasks_total" in r.text and "agent_dead_letters_total" in r.text
                finally:
                    service.runner.stop()
                    await asyncio.wait_for(consumer, 60)
                r = await client.get("/readyz")
                assert r.status_code == 503 and r.json()["checks"]["assigned"] is False
        finally:
            await service.aclose()

    asyncio.run(scenario())


def test_admin_token_guards_writes_and_tasks_read_back(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()
    body = {"task_id": "api-1", "kind": "classify", "input": {"text": "the lid was cracked", "labels": LABELS}}

    async def scenario() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as svc, api(svc) as client:
            r = await client.post("/tasks", json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["detail"]
            r = await client.post("/tasks", json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = await client.post("/tasks", json=body, headers={"Authorization": "Basic czNjcmV0"})
            assert r.status_code == 401

            r = await client.post("/tasks", json=body, headers={**AUTH, "traceparent": TRACEPARENT})
            assert r.status_code == 202, r.text
            assert r.json() == {"task_id": "api-1", "topic": s.kafka.input_topic}

            await wait_for(lambda: _is(client, "api-1", "succeeded"), 30, 0.1, what="api-1 succeeded")
            for headers in ({}, {"Authorization": "Bearer wrong"}):  # model output is not for anyone
                r = await client.get("/tasks/api-1", headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = await client.get("/tasks/api-1", headers=AUTH)
            assert r.status_code == 200
            record: dict[str, Any] = r.json()

            r = await client.get("/tasks/no-such-task", headers=AUTH)
            assert r.status_code == 404 and r.json() == {"detail": "unknown task"}
            r = await client.get("/tasks/bad%20id", headers=AUTH)
            assert r.status_code == 422

            bad_kind = {"kind": "no_such_kind", "input": {}}
            r = await client.post("/tasks", json=bad_kind, headers=AUTH)
            assert r.status_code == 422 and "no_such_kind" in json.dumps(r.json())
            bad_input = {"kind": "classify", "input": {"text": "x", "labels": "not a list"}}
            r = await client.post("/tasks", json=bad_input, headers=AUTH)
            assert r.status_code == 422
            r = await client.post("/tasks", content=b"x" * (s.max_task_bytes + 1), headers=AUTH)
            assert r.status_code == 413

            r = await client.post("/tasks", json={"kind": "classify", "input": body["input"]}, headers=AUTH)
            assert r.status_code == 202
            auto_id = r.json()["task_id"]
            assert auto_id.startswith("auto-")
            await wait_for(lambda: _is(client, auto_id, "succeeded"), 30, 0.1, what="the auto-keyed task")

            r = await client.get("/metrics")
            assert 'agent_tasks_total{outcome="succeeded"}' in r.text
            return record

    record = asyncio.run(scenario())
    assert record["task_id"] == "api-1" and record["state"] == "succeeded"
    assert record["result"]["label"] in LABELS
    assert record["result_digest"].startswith("sha256:")
    assert fake_llm.calls_for("api-1") == 1
    results = [m for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=2)) if m.key == b"api-1"]
    assert len(results) == 1 and results[0].headers["traceparent"] == TRACEPARENT.encode()


async def _is(client: httpx.AsyncClient, task_id: str, state: str) -> bool:
    return await task_state(client, task_id) == state


def test_writes_and_reads_are_refused_when_no_token_is_configured(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(admin_token=None)

    async def scenario() -> None:
        await asyncio.to_thread(ensure_topics, s)
        service = build(s, llm_base_url=fake_llm.base_url)
        try:
            async with api(service) as client:
                task = {"kind": "classify", "input": {"text": "x", "labels": LABELS}}
                for headers in ({}, AUTH, {"Authorization": "Bearer "}):
                    r = await client.post("/tasks", json=task, headers=headers)
                    assert r.status_code == 403
                    assert r.json() == {"detail": SUBMIT_DISABLED}  # producing takes the submit token too
                r = await client.post("/dlq/replay", json={"reason": "exhausted"}, headers=AUTH)
                assert r.status_code == 403
                for path in ("/dlq", "/tasks/some-task"):  # reads are refused too
                    r = await client.get(path, headers=AUTH)
                    assert r.status_code == 403 and r.json() == {"detail": READS_DISABLED}
        finally:
            await service.aclose()

    asyncio.run(scenario())


def test_reads_with_the_read_token_or_opened(make_settings: Any, fake_llm: FakeLLM) -> None:
    async def scenario(s: Settings, headers: dict[str, str]) -> None:
        await asyncio.to_thread(ensure_topics, s)
        service = build(s, llm_base_url=fake_llm.base_url)
        try:
            async with api(service) as client:
                r = await client.get("/dlq", headers=headers)
                assert r.status_code == 200 and r.json() == [], r.text
                r = await client.get("/tasks/some-task", headers=headers)
                assert r.status_code == 404, r.text
                r = await client.post("/dlq/replay", json={"reason": "exhausted"}, headers=headers)
                assert r.status_code in (401, 403)  # reading is not writing
        finally:
            await service.aclose()

    asyncio.run(scenario(make_settings(admin_token=None, read_token="r3ad"), READ))
    asyncio.run(scenario(make_settings(admin_token=None, reads_open=True), {}))


def test_poison_record_shows_in_dlq_with_its_origin(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(read_token="r3ad")

    async def scenario() -> tuple[tuple[int, int], list[dict[str, Any]]]:
        async with running(s, fake_llm.base_url) as svc, api(svc) as client:
            origin = await asyncio.to_thread(
                produce_one, s.kafka.bootstrap_servers, s.kafka.input_topic, b"poison-1", b"\xff\xfe not json",
                [("traceparent", TRACEPARENT.encode())],
            )
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "decode"}) == 1,
                           what="the dead letter")
            assert (await client.get("/dlq")).status_code == 401
            for limit in (0, 1001, "x"):
                assert (await client.get("/dlq", params={"limit": limit}, headers=READ)).status_code == 422
            return origin, await dead_letters(client, READ)

    (partition, offset), letters = asyncio.run(scenario())
    assert len(letters) == 1
    letter = letters[0]
    assert letter["reason"] == "decode" and "UTF-8" in letter["error"]
    assert letter["original_topic"] == s.kafka.input_topic
    assert (letter["original_partition"], letter["original_offset"]) == (partition, offset)
    assert letter["key"] == "poison-1" and letter["value"].endswith(" not json") and "\ufffd" in letter["value"]
    assert letter["headers"] == {"traceparent": TRACEPARENT}
    assert letter["task_id"] is None and letter["attempts"] == 0 and letter["failed_at"]


def test_replay_skips_a_task_that_succeeded_since(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()
    bootstrap, topic = s.kafka.bootstrap_servers, s.kafka.input_topic

    async def scenario() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as svc, api(svc) as client:
            late = classify("late-1", deadline="2001-01-01T00:00:00Z")
            await asyncio.to_thread(produce_one, bootstrap, topic, b"late-1", late)
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "expired"}) == 1,
                           what="expired dead letter")
            await asyncio.to_thread(produce_one, bootstrap, topic, b"late-1", classify("late-1"))
            await wait_for(lambda: _is(client, "late-1", "succeeded"), 30, 0.1, what="late-1 succeeded")

            [letter] = [d for d in await dead_letters(client) if d["task_id"] == "late-1"]
            assert letter["reason"] == "expired"
            items = [{"partition": letter["partition"], "offset": letter["offset"]},
                     {"partition": letter["partition"], "offset": 10**9}]
            r = await client.post("/dlq/replay", json={"items": items})
            assert r.status_code == 401
            bad_bodies: list[dict[str, Any]] = [
                {}, {"items": items, "reason": "expired"}, {"items": []}, {"reason": "nonsense"},
                {"items": [{"partition": -1, "offset": 0}]},
            ]
            for bad in bad_bodies:
                assert (await client.post("/dlq/replay", json=bad, headers=AUTH)).status_code == 422, bad
            r = await client.post("/dlq/replay", json={"items": items}, headers=AUTH)
            assert r.status_code == 200, r.text
            report: dict[str, Any] = r.json()
            assert metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1
            return report

    report = asyncio.run(scenario())
    assert (report["replayed"], report["already_succeeded"], report["not_found"]) == (0, 1, 1)
    decisions = {item["decision"]: item for item in report["items"]}
    assert sorted(decisions) == ["already_succeeded", "not_found"]
    assert decisions["already_succeeded"]["task_id"] == "late-1"
    assert decisions["not_found"]["offset"] == 10**9 and decisions["not_found"]["detail"]
    assert fake_llm.calls_for("late-1") == 1
    # nothing went back to the input topic
    assert len(read_topic(bootstrap, topic, expect=2)) == 2


def test_replay_revives_a_dead_task_and_it_runs_again(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={"max_attempts": 2})
    fake_llm.add_fault(FaultRule("error", match="flaky-1", status=503, times=2))

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with running(s, fake_llm.base_url) as svc, api(svc) as client:
            await asyncio.to_thread(produce_one, s.kafka.bootstrap_servers, s.kafka.input_topic, b"flaky-1",
                                    classify("flaky-1"), [("traceparent", TRACEPARENT.encode())])
            await wait_for(lambda: _is(client, "flaky-1", "dead"), 30, 0.1, what="flaky-1 dead")
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "exhausted"}) == 1,
                           what="exhausted dead letter")
            r = await client.post("/dlq/replay", json={"reason": "exhausted"}, headers=AUTH)
            assert r.status_code == 200, r.text
            report: dict[str, Any] = r.json()
            await wait_for(lambda: _is(client, "flaky-1", "succeeded"), 30, 0.1, what="flaky-1 succeeded")
            return report, (await client.get("/tasks/flaky-1", headers=AUTH)).json()

    report, record = asyncio.run(scenario())
    assert (report["replayed"], report["already_succeeded"], report["not_found"]) == (1, 0, 0)
    [item] = report["items"]
    assert item["task_id"] == "flaky-1" and item["revived"] is True and item["reason"] == "exhausted"
    assert record["state"] == "succeeded" and record["result"]["label"] in LABELS
    assert fake_llm.calls_for("flaky-1") == 3

    replayed = [m for m in read_topic(s.kafka.bootstrap_servers, s.kafka.input_topic, expect=2)
                if "dlq.replayed_from" in m.headers]
    assert len(replayed) == 1
    msg = replayed[0]
    assert msg.key == b"flaky-1" and msg.value == classify("flaky-1")
    assert msg.headers == {
        "traceparent": TRACEPARENT.encode(),
        "dlq.replayed_from": f"{s.kafka.dlq_topic}:{item['partition']}:{item['offset']}".encode(),
    }
