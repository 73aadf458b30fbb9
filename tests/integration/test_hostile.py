"""No record and no endpoint fault wedges a worker: a hostile corpus and a revoked key, end to end.

A real broker, a real redis-server, the fault-injecting model server and the service's own
consumer. Every record ends as a result or a dead letter with its reason; every partition's
committed offset reaches the end; readiness never drops for a record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from typing import Any

import httpx
import pytest

from service.api.app import create_app
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import classify, committed, metric, produce, read_topic, running, succeeded, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.standins]  # the embedded mode runs on the stand-ins

PARTITIONS = 3
BIG = 2_100_000  # larger than the dead-letter producer's 1 MB message.max.bytes


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


CLASSIFY_INPUT = '"input":{"text":"t","labels":["a","b"]}'
HOSTILE: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None, str]] = [
    # name, key, value, headers, expected dlq.reason
    ("too large for the dead-letter topic", b"big", b'{"kind":"classify","input":{"text":"' + b"x" * BIG + b'"}}',
     None, "oversize"),
    ("lone surrogate", b"sur", _raw('{"kind":"classify","input":{"text":"\\ud800","labels":["a","b"]}}'), None,
     "decode"),
    ("deadline overflows upwards", b"d1",
     _raw('{"kind":"classify",' + CLASSIFY_INPUT + ',"deadline":"9999-12-31T23:59:59-01:00"}'), None, "schema"),
    ("deadline overflows downwards", b"d2",
     _raw('{"kind":"classify",' + CLASSIFY_INPUT + ',"deadline":"0001-01-01T00:00:00+01:00"}'), None, "schema"),
    ("non-finite integer", b"inf", b'{"kind":"summarize","input":{"text":"t","max_words":1e400}}', None, "decode"),
    ("deep nesting", b"deep", b'{"kind":"classify","input":' + b"[" * 50_000 + b"]" * 50_000 + b"}", None,
     "decode"),
    ("tombstone", b"tomb", None, None, "decode"),
    ("invalid UTF-8", b"utf", b'{"kind":"classify","input":{"text":"\xff\xfe"}}', None, "decode"),
    ("not an object", None, b"[1,2,3]", None, "schema"),
    ("unknown kind", b"\xff\x00\xfe", b'{"kind":"nope","input":{}}', None, "schema"),
    ("odd headers", b"hdr", b'{"kind":"classify","input":{"text":"t"}}',
     [("deadline", b"\xff\xfe"), ("traceparent", b"\x00garbage"), ("x-empty", b""), ("x-big", b"h" * 300_000)],
     "schema"),
    ("huge header on a valid task", b"hugehdr", classify("hostile-hdr"), [("x-big", b"h" * 1_200_000)], "ok"),
]


def _dlq_limit_settings(make_settings: Any) -> Settings:
    return make_settings(kafka={"topic_partitions": PARTITIONS}, max_task_bytes=262_144)


def test_hostile_corpus_never_blocks_a_partition(make_settings: Any, fake_llm: FakeLLM) -> None:
    s = _dlq_limit_settings(make_settings)
    valid = [(f"ok-{i}".encode(), classify(f"ok-{i}")) for i in range(30)]
    corpus: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]] = []
    for i, (key, value) in enumerate(valid):  # hostile records interleaved with valid ones
        corpus.append((key, value, None))
        if i < len(HOSTILE):
            _name, hkey, hvalue, headers, _reason = HOSTILE[i]
            corpus.append((hkey, hvalue, headers))
    expected_dead = Counter(reason for *_rest, reason in HOSTILE if reason != "ok")
    expected_ok = len(valid) + sum(1 for *_rest, reason in HOSTILE if reason == "ok")
    unready: list[dict[str, Any]] = []
    polls: list[int] = []
    ends: dict[int, int] = {}

    _input_topic_taking(s, 4 * 1024 * 1024)  # as a user would, to accept records of a few MB

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            app = create_app(svc)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as http:
                stop = asyncio.Event()

                async def watch_readiness() -> None:  # from before the first record to after the last
                    while not stop.is_set():
                        ready = await http.get("/readyz")
                        polls.append(ready.status_code)
                        if ready.status_code != 200:
                            unready.append(ready.json())
                        await asyncio.sleep(0.02)

                watcher = asyncio.create_task(watch_readiness())
                ends.update(await asyncio.to_thread(_produce_spread, s, corpus))

                def done() -> bool:
                    finished = (metric(svc, "agent_tasks_total", {"outcome": "succeeded"})
                                + metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"}))
                    return finished >= len(corpus)

                try:
                    await wait_for(done, 120, interval_s=0.05, what="every record to end")
                finally:
                    stop.set()
                    await watcher
                await svc.runner.commit()
                assert metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == expected_ok
                for reason, n in expected_dead.items():
                    assert metric(svc, "agent_dead_letters_total", {"reason": reason}) == n, reason
                assert metric(svc, "agent_internal_errors_total") == 0

    asyncio.run(scenario())
    print(f"\nhostile corpus: records {len(corpus)} on {PARTITIONS} partitions, results {expected_ok}, "
          f"dead letters {dict(expected_dead)}, /readyz polls {len(polls)} (every 20 ms), not 200: {len(unready)}")
    assert unready == [], "readiness dropped while records were being processed"
    assert sum(ends.values()) == len(corpus)
    assert committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic, PARTITIONS) == ends
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=sum(expected_dead.values()))
    assert Counter(m.headers["dlq.reason"].decode() for m in dead) == expected_dead
    big = [m for m in dead if m.headers.get("dlq.value.truncated") == b"true"]
    assert big, "the 2.1 MB record was not dead-lettered with a cut value"
    original = HOSTILE[0][2]
    assert original is not None
    assert any(m.headers["dlq.value.size"] == str(len(original)).encode()
               and m.headers["dlq.value.sha256"].decode().endswith(hashlib.sha256(original).hexdigest())
               for m in big)
    for m in dead:  # the original coordinates travel with every dead letter
        assert m.headers["dlq.original.topic"] == s.kafka.input_topic.encode()
        assert int(m.headers["dlq.original.offset"]) >= 0
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=expected_ok))
    assert len({m.json()["task_id"] for m in results}) == expected_ok


def _input_topic_taking(s: Settings, max_bytes: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": s.kafka.bootstrap_servers})
    topic = NewTopic(s.kafka.input_topic, num_partitions=PARTITIONS, replication_factor=1,
                     config={"max.message.bytes": str(max_bytes)})
    for future in admin.create_topics([topic], operation_timeout=15).values():
        future.result(15)


def _produce_spread(s: Settings, corpus: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]]
                    ) -> dict[int, int]:
    """Round-robin over the partitions; returns each partition's end offset from the acknowledgements."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": s.kafka.bootstrap_servers, "message.max.bytes": 10_000_000,
                         "enable.idempotence": True, "acks": "all"})
    ends: dict[int, int] = {}
    errors: list[str] = []

    def acked(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err.str())
        else:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for i, (key, value, headers) in enumerate(corpus):
        producer.produce(s.kafka.input_topic, key=key, value=value, headers=headers, partition=i % PARTITIONS,
                         on_delivery=acked)
    assert producer.flush(30) == 0
    assert errors == []
    return ends


def test_revoked_api_key_dead_letters_nothing_and_every_task_succeeds_after(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """401 for several seconds: the endpoint's fault. Zero dead letters, no attempt spent, then all succeed."""
    s = make_settings(llm={"breaker_open_s": 0.5, "max_attempts": 2})
    fake_llm.add_fault(FaultRule("error", status=401))
    n = 20
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            app = create_app(svc)
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(f"key-{i}".encode(), classify(f"key-{i}")) for i in range(n)])
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as http:
                await wait_for(lambda: metric(svc, "agent_endpoint_degraded", {
                    "endpoint": svc.processor.guard.label if svc.processor.guard else "", "reason": "auth"}) == 1,
                    20, what="the endpoint to be marked unusable")
                ready = await http.get("/readyz")
                seen["readyz"] = (ready.status_code, ready.json())
                await asyncio.sleep(4)  # the key stays revoked: nothing may be dead-lettered meanwhile
                seen["dead_during"] = metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"})
                seen["paused"] = metric(svc, "agent_paused_partitions")
                fake_llm.clear_faults()  # the key works again
                await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) >= n, 60,
                               what="every task to succeed after the key works again")
                seen["dead_after"] = metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"})
                after = await http.get("/readyz")
                seen["readyz_after"] = (after.status_code, after.json())

    asyncio.run(scenario())
    status, body = seen["readyz"]
    assert status == 200 and body["status"] == "degraded" and "auth" in json.dumps(body["degraded"])
    assert "401" not in json.dumps(body) or "unauthorized" not in json.dumps(body).lower()
    assert seen["dead_during"] == 0 and seen["dead_after"] == 0
    assert seen["paused"] >= 1, "consumption was not paused while the endpoint was unusable"
    assert seen["readyz_after"][1]["status"] == "ok"
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n))
    assert len({m.json()["task_id"] for m in results}) == n
    assert all(m.json()["attempts"] == 1 for m in results), "a revoked key cost a task an attempt"
