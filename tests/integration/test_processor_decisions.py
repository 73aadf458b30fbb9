"""The processor's decisions, each against a defect it once had: real broker, real Redis, HTTP model."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from service.agents.base import Agent
from service.agents.kinds import ClassifyInput, ClassifyStep
from service.agents.registry import AgentRegistry, default_agents
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from tests.support import classify, metric, produce, read_topic, running, succeeded, wait_for

pytestmark = pytest.mark.integration


def test_duplicate_of_a_finished_task_is_a_duplicate_even_past_its_deadline(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """The ledger is read before the deadline: a redelivery of a finished task is no expiry."""
    s: Settings = make_settings()
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()  # the same task, its deadline since passed

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"late-1", classify("late-1", deadline=later))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="success")
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"late-1", classify("late-1", deadline=past))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) == 1, what="duplicate")
            assert metric(svc, "agent_dead_letters_total", {"reason": "expired"}) == 0

    asyncio.run(scenario())
    assert fake_llm.calls_for("late-1") == 1


class _BuggyStep(ClassifyStep):
    """A step whose own code fails on every answer: a bug of the service, not the record's fault."""

    def parse(self, task_input: BaseModel, content: str) -> dict[str, Any]:
        raise ZeroDivisionError("a bug in the step")


def test_a_bug_ends_the_record_as_internal_after_bounded_retries(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()
    agents = default_agents()
    buggy = AgentRegistry([Agent("classify", ClassifyInput, (_BuggyStep(),)),
                           *(agents.get(k) for k in agents.kinds() if k != "classify")])

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=buggy) as svc:
            svc.processor.config = dataclasses.replace(svc.processor.config, internal_backoff_s=0.01)
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(b"bug-1", classify("bug-1")), (b"fine", b'{"kind":"summarize","input":{"text":"a b","max_words":5}}')])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "internal"}) == 1, 60,
                           what="the internal dead letter")
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="the other task")
            assert metric(svc, "agent_internal_errors_total") == svc.processor.config.internal_retries + 1

    asyncio.run(scenario())
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    assert [m.headers["dlq.reason"] for m in dead] == [b"internal"]
    assert b"ZeroDivisionError" in dead[0].headers["dlq.error"]
    assert dead[0].headers["dlq.task_id"] == b"bug-1"


def test_a_complete_whose_reply_was_lost_is_ours_not_stale(make_settings: Any, fake_llm: FakeLLM) -> None:
    """COMPLETE landed but the worker did not hear back: the stored fence is our own, so publish."""
    s: Settings = make_settings()

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            proc = svc.processor
            claim = await svc.ledger.claim("lost-1", "sha256:x", "me", "classify")
            assert claim.decision == "claimed"
            first = await svc.ledger.complete("lost-1", claim.fence, result='{"label":"a"}', digest="sha256:d",
                                              event=b'{"task_id":"lost-1"}', model="m", prompt_version="v")
            assert first.status == "ok"
            from consumers.records import Record
            from service.agents.tasks import decode_task

            task = decode_task(classify("lost-1"), [], s.max_task_bytes)
            agent = proc.agents.get("classify")
            record = Record(s.kafka.input_topic, 0, 0, b"lost-1", classify("lost-1"))
            # the same COMPLETE again, as a retry after the lost reply sends it
            await proc.outcomes.complete(record, task, agent, claim.fence,
                                         {"classify": {"label": "a", "confidence": 1}}, 1, "ctx")
            assert metric(svc, "agent_stale_fence_writes_total") == 0
            assert metric(svc, "agent_results_published_total") == 1
            stored = await svc.ledger.get("lost-1")
            assert stored is not None and stored.published_by == record.coordinates
            assert stored.published_how == "acked"  # marked after the broker acknowledged it

    asyncio.run(scenario())
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert [m.value for m in results] == [b'{"task_id":"lost-1"}']  # the stored event, byte for byte


def test_shadow_runs_wait_for_the_breaker_like_every_call(make_settings: Any, fake_llm: FakeLLM) -> None:
    """A shadow (divergence) run of a duplicate is a model call: an open breaker holds it back."""
    s: Settings = make_settings(llm={"shadow_sample_rate": 1.0, "breaker_open_s": 60})

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"sh-1", classify("sh-1"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, what="success")
            guard = svc.processor.guard
            assert guard is not None
            while not guard.is_open:  # 5xx-style failures open the breaker; consumption goes on
                guard.failure()
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"sh-1", classify("sh-1"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) == 1, what="duplicate")
            await asyncio.sleep(1.0)
            assert fake_llm.calls_for("sh-1") == 1  # the shadow call waits while the breaker is open
            guard.success()  # the endpoint answers again
            await wait_for(lambda: sum(metric(svc, "agent_shadow_runs_total", {"outcome": o})
                                       for o in ("same", "different", "failed")) == 1, what="the shadow run")
            assert fake_llm.calls_for("sh-1") == 2

    asyncio.run(scenario())


def test_a_task_busy_past_its_deadline_ends_as_one_expired_dead_letter_and_no_result(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """The expiry of a task another worker holds goes through the ledger: that holder's later
    result is refused by its fence, so the task has a dead letter or a result, never both."""
    from consumers.records import Record
    from service.agents.tasks import decode_task

    s: Settings = make_settings()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    value = classify("bx-1", deadline=past)
    task = decode_task(value, [], s.max_task_bytes)

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            held = await svc.ledger.claim("bx-1", task.fingerprint, "another-worker", "classify")
            assert held.decision == "claimed"  # a live lease of another worker (the service's lease_ms)
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"bx-1", value)])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "expired"}) == 1,
                           what="the expired dead letter", service=svc)
            stored = await svc.ledger.get("bx-1")
            assert stored is not None and (stored.state, stored.fields.get("dead_reason")) == ("dead", "expired")
            # the other holder answers late and completes under its fence: refused, nothing published
            proc = svc.processor
            record = Record(s.kafka.input_topic, 0, 99, b"bx-1", value)
            await proc.outcomes.complete(record, task, proc.agents.get("classify"), held.fence,
                                         {"classify": {"label": "a", "confidence": 1}}, 1, "ctx")
            assert metric(svc, "agent_results_published_total") == 0
            assert metric(svc, "agent_stale_fence_writes_total") >= 1

    asyncio.run(scenario())
    events = read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1)
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    assert [m.headers["dlq.reason"] for m in dead] == [b"expired"]
    # its one outcome event: failed, naming the dead letter where it was written
    assert [m.json() | {"failed_at": None} for m in events] == [{
        "task_id": "bx-1", "kind": "classify", "outcome": "failed", "status": "failed", "reason": "expired",
        "error": "deadline passed while another worker held the task", "attempts": events[0].json()["attempts"],
        "failed_at": None, "dead_letter": {"topic": s.kafka.dlq_topic, "partition": dead[0].partition,
                                           "offset": dead[0].offset, "id": dead[0].headers["dlq.id"].decode()}}]
    assert fake_llm.calls_for("bx-1") == 0


def test_a_redelivered_record_finds_its_dead_letter_written_and_sends_none(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """Records read again after a crash (their offsets not committed) dead-letter once each: the
    ledger notes which coordinates were dead-lettered once the broker acknowledged it."""
    from consumers.records import Record

    s: Settings = make_settings()
    poison = b'{"kind": "classify", "input": '  # does not decode

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"px-1", poison)], partition=0)
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"cx-1", classify("cx-1"))], partition=0)
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(b"cx-1", classify("cx-1", text="another input"))], partition=0)
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "decode"}) == 1
                           and metric(svc, "agent_dead_letters_total", {"reason": "conflict"}) == 1,
                           what="the two dead letters", service=svc)
            proc = svc.processor
            # the same records read again, as the next owner of the partition reads them after a crash
            for offset, (key, value) in enumerate([(b"px-1", poison), (b"cx-1", classify("cx-1")),
                                                   (b"cx-1", classify("cx-1", text="another input"))]):
                await proc._process_bounded(Record(s.kafka.input_topic, 0, offset, key, value))

    asyncio.run(scenario())
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=2)
    assert sorted(m.headers["dlq.reason"] for m in dead) == [b"conflict", b"decode"]
    assert len({m.headers["dlq.id"] for m in dead}) == 2


def test_copies_of_one_dead_letter_carry_one_id_and_are_listed_once(make_settings: Any, fake_llm: FakeLLM) -> None:
    """A crash between the broker's acknowledgement and the ledger's note leaves a copy: it carries
    the same ``dlq.id`` (the original coordinates and the reason), and the listing drops it."""
    from consumers.records import Record
    from service.pipeline import dlq

    s: Settings = make_settings()

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            outputs = svc.processor.outputs
            for offset in (7, 7, 8):
                record = Record(s.kafka.input_topic, 1, offset, b"k", b"v")
                await outputs.dead_letter(record, reason="decode", error="e", attempts=0, task_id=None)
            await outputs.dead_letter(Record(s.kafka.input_topic, 1, 7, b"k", b"v"), reason="internal",
                                      error="e", attempts=0, task_id=None)

    asyncio.run(scenario())
    written = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=4)
    ids = [m.headers.get("dlq.id") for m in written]
    assert None not in ids and len(set(ids)) == 3
    listed = dlq.peek(s.kafka, 50)
    assert sorted((d.original_offset, d.reason) for d in listed) == [(7, "decode"), (7, "internal"), (8, "decode")]
    assert all(d.id for d in listed)
