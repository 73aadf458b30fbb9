"""End to end on a real broker and a real redis-server: one result per task, however delivered."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import (
    classify,
    committed,
    failed,
    metric,
    produce,
    read_topic,
    running,
    succeeded,
    task_value,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.standins]  # the embedded mode runs on the stand-ins


def results_by_task(msgs: list[Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in msgs:
        body = m.json()
        out.setdefault(body["task_id"], []).append(body)
    return out


def test_same_task_delivered_many_times_runs_the_model_once(
    make_settings: Any, fake_llm: FakeLLM, any_redis_url: str
) -> None:
    s: Settings = make_settings(redis={"url": any_redis_url})
    value = classify("order-1")

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"order-1", value)] * 5)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) >= 4, what="duplicates")
            assert metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1

    asyncio.run(scenario())
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert len(results) == 1
    assert results[0].key == b"order-1"
    body = results[0].json()
    assert body["status"] == "succeeded" and body["result"]["label"] in {"complaint", "praise", "question"}
    assert fake_llm.calls_for("order-1") == 1


def test_retry_after_slow_success_keeps_one_result(make_settings: Any, fake_llm: FakeLLM, any_redis_url: str) -> None:
    # The first call finishes on the server but arrives after the client gave up.
    s: Settings = make_settings(llm={"timeout_s": 0.5}, redis={"url": any_redis_url})
    fake_llm.add_fault(FaultRule("slow_success", match="slow-1", times=1, delay_s=1.5))

    async def scenario() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"slow-1", classify("slow-1"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="success")
            # the same event again, as a redelivery would bring it
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"slow-1", classify("slow-1"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) == 1, what="duplicate")
            assert metric(svc, "agent_llm_requests_total", {"outcome": "timeout"}) == 1
            assert metric(svc, "agent_retries_total") == 1
            record = await svc.ledger.get("slow-1")
            assert record is not None
            return record.to_json()

    stored = asyncio.run(scenario())
    stats = fake_llm.stats()
    assert stats["completions_by_step"]["slow-1:classify"] == 2  # the model answered twice...
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert len(results) == 1  # ...but exactly one answer landed
    assert results[0].json()["result"] == stored["result"]
    assert stored["attempts"] == 2 and stored["state"] == "succeeded"


def test_stale_worker_write_is_refused_by_its_fence(make_settings: Any, fake_llm: FakeLLM, any_redis_url: str) -> None:
    """Worker A stalls past its lease; B reclaims with a higher fence and wins; A's late write is refused."""
    s_a: Settings = make_settings(ledger={"lease_ms": 800}, redis={"url": any_redis_url})
    s_b = s_a.model_copy(update={"kafka": s_a.kafka.model_copy(update={"group_id": s_a.kafka.group_id + "-b"}),
                                 "worker_id": "worker-b"})
    fake_llm.add_fault(FaultRule("latency", match="race-1", times=1, delay_s=10.0))  # outlasts B's group join

    async def scenario() -> None:
        async with running(s_a, fake_llm.base_url) as a:
            # A stalls: its heartbeats stop, as in a long GC pause or a network partition
            a.processor.config = dataclasses.replace(a.processor.config, lease_ms=600_000)
            produce(s_a.kafka.bootstrap_servers, s_a.kafka.input_topic, [(b"race-1", classify("race-1"))])
            await wait_for(lambda: fake_llm.calls_for("race-1") == 1, what="A's call")
            async with running(s_b, fake_llm.base_url) as b:
                await wait_for(lambda: metric(b, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="B wins")
                await wait_for(lambda: metric(a, "agent_stale_fence_writes_total") == 1, what="A refused")
                assert metric(a, "agent_tasks_total", {"outcome": "succeeded"}) == 0
                record = await b.ledger.get("race-1")
                assert record is not None and record.fence == 2 and record.state == "succeeded"

    asyncio.run(scenario())
    results = succeeded(read_topic(s_a.kafka.bootstrap_servers, s_a.kafka.results_topic, expect=1))
    assert [r.json()["fence"] for r in results] == [2]


def test_same_task_id_with_other_input_is_a_conflict(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()

    async def scenario() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"dup-1", classify("dup-1", "first text"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="first")
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"dup-1", classify("dup-1", "other text"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "conflict"}) == 1, what="conflict")
            record = await svc.ledger.get("dup-1")
            assert record is not None
            return record.to_json()

    first = asyncio.run(scenario())
    assert first["state"] == "succeeded"
    dlq = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    assert len(dlq) == 1 and dlq[0].headers["dlq.reason"] == b"conflict"
    assert json.loads(dlq[0].value or b"{}")["input"]["text"] == "other text"
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert len(results) == 1 and results[0].json()["result"] == first["result"]
    assert fake_llm.calls_for("dup-1") == 1


def test_every_poison_kind_is_dead_lettered_and_the_partition_keeps_flowing(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    s: Settings = make_settings(max_task_bytes=2048, llm={"max_attempts": 3})
    fake_llm.add_fault(FaultRule("error", match="perm-1", status=400))
    fake_llm.add_fault(FaultRule("schema_violation", match="invalid-1"))
    fake_llm.add_fault(FaultRule("error", match="exhaust-1", status=503))
    records: list[tuple[bytes | None, bytes | None]] = [
        (b"k-decode", b"\xff\xfe not json"),
        (b"k-schema", json.dumps({"kind": "classify"}).encode()),
        (b"k-kind", task_value("no_such_kind", {"x": 1}, "kind-1")),
        (b"k-input", task_value("classify", {"text": "t", "labels": "not a list"}, "input-1")),
        (b"k-oversize", task_value("summarize", {"text": "x" * 4096, "max_words": 5}, "big-1")),
        (b"ok-1", classify("ok-1", "first")),
        (b"ok-1", classify("ok-1", "second")),  # conflict with the line above
        (b"perm-1", classify("perm-1")),
        (b"invalid-1", classify("invalid-1")),
        (b"exhaust-1", classify("exhaust-1")),
        (b"late-1", classify("late-1", deadline="2001-01-01T00:00:00Z")),
        (b"ok-2", classify("ok-2")),
    ]
    expected = {
        b"k-decode": "decode", b"k-schema": "schema", b"k-kind": "schema", b"k-input": "schema",
        b"k-oversize": "oversize", b"ok-1": "conflict", b"perm-1": "permanent",
        b"invalid-1": "invalid_output", b"exhaust-1": "exhausted", b"late-1": "expired",
    }

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records, partition=0)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 2, what="good tasks")
            await wait_for(lambda: sum(metric(svc, "agent_dead_letters_total", {"reason": r})
                                       for r in set(expected.values())) == len(expected), what="dead letters")
            await wait_for(lambda: committed(s.kafka.bootstrap_servers, s.kafka.group_id,
                                             s.kafka.input_topic, 1)[0] == len(records), what="commit to the end")

    asyncio.run(scenario())
    dlq = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=len(expected))
    assert Counter(m.headers["dlq.reason"].decode() for m in dlq) == Counter(expected.values())
    for m in dlq:
        assert m.headers["dlq.reason"].decode() == expected[m.key or b""]
        assert m.headers["dlq.original.topic"] == s.kafka.input_topic.encode()
        assert m.headers["dlq.original.partition"] == b"0"
        offset = int(m.headers["dlq.original.offset"])
        assert records[offset][0] == m.key and records[offset][1] == m.value  # original key and value kept
        assert m.headers["dlq.error"] and m.headers["dlq.failed_at"]
    by_key = {m.key: m for m in dlq}
    assert by_key[b"exhaust-1"].headers["dlq.attempts"] == b"3"
    assert by_key[b"perm-1"].headers["dlq.attempts"] == b"1"
    assert by_key[b"exhaust-1"].headers["dlq.task_id"] == b"exhaust-1"
    events = read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=2 + 6)
    results = succeeded(events)
    assert sorted(r.key for r in results) == [b"ok-1", b"ok-2"]
    assert fake_llm.calls_for("exhaust-1") == 3 and fake_llm.calls_for("perm-1") == 1
    # every dead letter of a task id is its task's failed event too, naming where the letter is; a
    # record without a task id has none, and a conflict none (the task id is the first input's)
    announced = {m.headers["dlq.task_id"].decode(): m for m in dlq
                 if m.headers["dlq.task_id"] and m.headers["dlq.reason"] != b"conflict"}
    assert {"perm-1", "invalid-1", "exhaust-1", "late-1", "kind-1", "input-1"} <= set(announced)
    failures = {m.json()["task_id"]: m.json() for m in failed(events)}
    assert len(failed(events)) == len(failures) == len(announced)
    for task_id, letter in announced.items():
        event = failures[task_id]
        assert (event["outcome"], event["reason"]) == ("failed", letter.headers["dlq.reason"].decode())
        assert event["attempts"] == int(letter.headers["dlq.attempts"])
        assert event["dead_letter"] == {"topic": s.kafka.dlq_topic, "partition": letter.partition,
                                        "offset": letter.offset, "id": letter.headers["dlq.id"].decode()}
    assert failures["exhaust-1"]["kind"] == "classify"


def test_no_offset_is_committed_ahead_of_an_unfinished_record(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()
    fake_llm.add_fault(FaultRule("latency", match="slow-head", times=1, delay_s=3.0))
    records = [(b"slow-head", classify("slow-head"))] + [(f"fast-{i}".encode(), classify(f"fast-{i}")) for i in range(5)]

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records, partition=0)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 5, what="fast ones")
            await asyncio.sleep(0.6)  # several commit intervals pass while the head is still running
            offsets = committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic, 1)
            assert offsets[0] <= 0, f"committed {offsets[0]} past the unfinished record at offset 0"
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 6, what="head")
            await wait_for(lambda: committed(s.kafka.bootstrap_servers, s.kafka.group_id,
                                             s.kafka.input_topic, 1)[0] == 6, what="commit after the head")

    asyncio.run(scenario())


def test_after_a_restart_nothing_is_lost_and_nothing_is_rerun(
    make_settings: Any, fake_llm: FakeLLM, any_redis_url: str
) -> None:
    s: Settings = make_settings(redis={"url": any_redis_url})
    n = 30
    records = [(f"r-{i}".encode(), classify(f"r-{i}", f"text {i}")) for i in range(n)]

    async def first_run() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == n, what="all")

    async def second_run(settings: Settings) -> float:
        async with running(settings, fake_llm.base_url) as svc:
            await asyncio.sleep(1.0)
            return metric(svc, "agent_tasks_total", {"outcome": "duplicate"})

    asyncio.run(first_run())
    calls = fake_llm.stats()["requests"]
    assert calls == n
    # the same group again: offsets were committed, nothing is redelivered
    assert asyncio.run(second_run(s)) == 0
    # a new group replays the topic from offset 0: every task is a duplicate, no model call
    replay = s.model_copy(update={"kafka": s.kafka.model_copy(update={"group_id": s.kafka.group_id + "-replay"})})

    async def replay_run() -> None:
        async with running(replay, fake_llm.base_url) as svc:
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) == n, what="replay")

    asyncio.run(replay_run())
    assert fake_llm.stats()["requests"] == calls
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n))
    assert len(results) == n and len({r.key for r in results}) == n


def test_a_replay_is_screened_in_batches_yet_conflicts_poison_and_unpublished_outcomes_are_not(
    make_settings: Any, fake_llm: FakeLLM, any_redis_url: str
) -> None:
    """A new group reads a processed topic: batches of finished tasks are finished by one ledger read
    each (the replay screen), and what the handler must still see reaches it: a task whose outcome
    was never published, another input under a finished task's id, a record that does not decode."""
    s: Settings = make_settings(redis={"url": any_redis_url}, max_in_flight=20)  # fetches of at most 20
    n = 200
    records = [(f"s-{i}".encode(), classify(f"s-{i}", f"text {i}")) for i in range(n)]

    async def first_run() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == n, what="all")
            # as if the service had died between the ledger's write and the result's acknowledgement
            await svc.ledger.client.hset(svc.ledger.keys.task("s-5"), "published", "0")

    asyncio.run(first_run())
    calls = fake_llm.stats()["requests"]
    produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [
        (b"s-7", classify("s-7", "another text")),  # a finished task's id with another input
        (b"s-bad", b'{"task_id": "s-bad", "kind": "classify", "input": {"text": "\\ud800"}}'),
    ])
    replay = s.model_copy(update={"kafka": s.kafka.model_copy(update={"group_id": s.kafka.group_id + "-replay"})})

    async def replay_run() -> dict[str, float]:
        async with running(replay, fake_llm.base_url) as svc:
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) == n
                           and metric(svc, "agent_dead_letters_total", {"reason": "conflict"}) == 1
                           and metric(svc, "agent_dead_letters_total", {"reason": "decode"}) == 1, what="replay")
            await wait_for(lambda: sum(max(o, 0) for o in committed(
                s.kafka.bootstrap_servers, replay.kafka.group_id, s.kafka.input_topic, 3).values()) == n + 2,
                what="commit to the end")
            return {"screened": metric(svc, "agent_replay_screened_total"),
                    "succeeded": metric(svc, "agent_tasks_total", {"outcome": "succeeded"})}

    seen = asyncio.run(replay_run())
    assert seen["succeeded"] == 0
    assert n / 2 <= seen["screened"] < n  # most records screened; s-5 (unpublished) went to the handler
    assert fake_llm.stats()["requests"] == calls
    results = results_by_task(succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n + 1)))
    assert len(results["s-5"]) == 2 and results["s-5"][0] == results["s-5"][1]  # re-emitted, byte for byte
    assert sum(len(v) for v in results.values()) == n + 1
    dlq = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=2)
    assert sorted(m.headers["dlq.reason"] for m in dlq) == [b"conflict", b"decode"]
    # the conflict's dead letter names the record that carried the other input
    (other,) = [m for m in read_topic(s.kafka.bootstrap_servers, s.kafka.input_topic, expect=n + 2)
                if m.key == b"s-7" and b"another text" in (m.value or b"")]
    (conflict,) = [m for m in dlq if m.headers["dlq.reason"] == b"conflict"]
    assert (conflict.headers["dlq.original.topic"], conflict.headers["dlq.original.partition"],
            conflict.headers["dlq.original.offset"]) == (
        s.kafka.input_topic.encode(), str(other.partition).encode(), str(other.offset).encode())


def test_context_budget_and_deadline_pass_through(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={"context_tokens": 1024, "max_tokens": 256})
    long_text = "word " * 2000  # fits the byte limit, not the model's window
    records = [
        (b"long-1", task_value("summarize", {"text": long_text, "max_words": 10}, "long-1")),
        (b"due-1", classify("due-1", deadline="2099-01-01T00:00:00Z")),
    ]

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records)
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "oversize"}) == 1
                           and metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="both")

    asyncio.run(scenario())
    assert fake_llm.calls_for("long-1") == 0  # rejected before any call, never truncated
    dlq = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    assert dlq[0].key == b"long-1" and b"window" in dlq[0].headers["dlq.error"]
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert results[0].headers["deadline"] == b"2099-01-01T00:00:00.000Z"  # the budget travels on
