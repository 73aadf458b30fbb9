"""Sessions end to end (docs/SESSIONS.md, "In the pipeline"), on the broker, Redis and the fake model:
the turns of a session one at a time in arrival order, each applied once and shown to the next
turn; a reduced state with no lost update under 100 concurrent tasks; a turn that fails for good
leaves its session's queue and the next turn runs."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from confluent_kafka import Consumer
from pydantic import BaseModel

from dedup.sessions import Entered
from service.agents.registry import AgentRegistry
from service.agents.tasks import canonical_json, digest, fingerprint
from service.devtools.fakellm import FakeLLM
from service.devtools.fakellm.faults import FaultRule
from service.runtime.wiring import Service
from service.sdk import Agent, Session
from tests.support import metric, produce, read_topic, running, session_kinds, succeeded, task_value, wait_for
from tests.support.session_kinds import Text

pytestmark = [pytest.mark.integration]


class Chat(session_kinds.Chat):
    prompt_version = "sess-chat-v1"


class Count(BaseModel):
    n: int = 0
    seen: list[str] = []


def count(state: Count, task_input: Text, result: Any) -> Count:
    return Count(n=state.n + 1, seen=[*state.seen, task_input.text])


def kinds() -> AgentRegistry:
    return AgentRegistry([
        Agent("sess_chat", Text, (Chat(),), session=Session()),
        Agent("sess_count", Text, (Chat(),), session=Session(state=Count, reduce=count)),
    ])


class Results:
    """The results topic read as it grows (a user waiting for the answer): task id -> events."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.events: dict[str, list[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"watch-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False, "isolation.level": "read_committed"})
        self._consumer.subscribe([topic])
        self._thread = threading.Thread(target=self._run, name="results", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            self.events.setdefault((msg.key() or b"").decode(), []).append(json.loads(msg.value() or b"{}"))

    @contextmanager
    def watching(self) -> Iterator[Results]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(30)
            self._consumer.close()


def _send(bootstrap: str, topic: str, kind: str, task_id: str, session: str, text: str) -> None:
    produce(bootstrap, topic, [(task_id.encode(), task_value(kind, {"text": text}, task_id, session=session))])


async def _turns(svc: Service, session: str) -> list[dict[str, Any]]:
    record = await svc.ledger.sessions.get(session)
    assert record is not None, f"session {session} not stored"
    return record.turns


def test_interleaved_turns_of_two_producers_each_once_in_order_and_shown_to_the_next(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    s = make_settings(sessions={"poll_s": 0.05})
    sessions = [f"s-{uuid.uuid4().hex}", f"s-{uuid.uuid4().hex}"]
    sent: dict[str, list[str]] = {"p1": [], "p2": []}  # producer -> its task ids, in its order
    text_of: dict[str, str] = {}

    async def producer(name: str, results: Results) -> None:
        for i in range(4):
            session = sessions[i % 2]
            task_id = f"{uuid.uuid4().hex}"  # a random key: any partition
            text_of[task_id] = f"{name} says {i} in {session[-6:]}"
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", task_id, session,
                                    text_of[task_id])
            sent[name].append(task_id)
            await wait_for(lambda t=task_id: t in results.events, 60, what=f"the result of {name}'s turn {i}")

    async def scenario(results: Results) -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.gather(producer("p1", results), producer("p2", results))
            for session in sessions:
                turns = await _turns(svc, session)
                ids = [t["task_id"] for t in turns]
                mine = [t for t in sent["p1"] + sent["p2"] if t in ids]
                assert sorted(ids) == sorted(mine) and len(ids) == len(set(ids)) == 4, "each turn once"
                for who in ("p1", "p2"):  # each producer's turns in its order
                    theirs = [t for t in sent[who] if t in ids]
                    assert [t for t in ids if t in theirs] == theirs
                for k, turn in enumerate(turns):  # each turn's prompt shows every turn before it
                    assert turn["input"] == {"text": text_of[turn["task_id"]]}
                    request = fake_llm.last_request(f"{turn['task_id']}:answer")
                    assert request is not None
                    told = json.dumps(request["messages"])
                    assert all(text_of[t["task_id"]] in told for t in turns[:k])
                    assert all(text_of[t["task_id"]] not in told for t in turns[k + 1:])
                    assert turn["result"] == results.events[turn["task_id"]][0]["result"]
                    event = results.events[turn["task_id"]][0]
                    assert event["session"] == {"id": session, "version": k, "turns_seen": k, "summarized": 0}
            # a redelivered turn (the same task id produced again) is a duplicate: applied once
            again = sent["p1"][0]
            before = metric(svc, "agent_tasks_total", {"outcome": "duplicate"})
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", again, sessions[0],
                                    text_of[again])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) > before, 60,
                           what="the redelivered turn", service=svc)
            assert [t["task_id"] for t in await _turns(svc, sessions[0])].count(again) == 1
            assert metric(svc, "agent_session_turns_total", {"kind": "sess_chat"}) == 8
            for session in sessions:
                record = await svc.ledger.sessions.get(session)
                assert record is not None and record.queue == [] and record.holder in (None, "")

    with Results(kafka_bootstrap, s.kafka.results_topic).watching() as results:
        asyncio.run(scenario(results))
    assert all(fake_llm.stats()["completions_by_step"].get(f"{t}:answer") == 1 for t in sent["p1"] + sent["p2"])


def test_a_reduced_count_loses_no_update_under_a_hundred_concurrent_tasks(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    s = make_settings(sessions={"poll_s": 0.05})
    sessions = [f"c-{uuid.uuid4().hex}" for _ in range(5)]
    tasks = [(uuid.uuid4().hex, random.choice(sessions)) for _ in range(100)]
    records = [(task_id.encode(), task_value("sess_count", {"text": task_id}, task_id, session=session))
               for task_id, session in tasks]

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(produce, kafka_bootstrap, s.kafka.input_topic, records)

            async def all_done() -> bool:
                done = 0
                for task_id, _ in tasks:
                    record = await svc.ledger.get(task_id)
                    done += record is not None and record.state == "succeeded" and record.published
                return done == len(tasks)

            await wait_for(all_done, 240, interval_s=0.5, what="100 results", service=svc)
            for session in sessions:
                mine = [task_id for task_id, sid in tasks if sid == session]
                record = await svc.ledger.sessions.get(session)
                if not mine:
                    assert record is None
                    continue
                assert record is not None
                assert record.state["n"] == len(mine) == record.version, session
                assert sorted(record.state["seen"]) == sorted(mine)
                assert record.queue == []

    asyncio.run(scenario())
    results = succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=100, timeout_s=60))
    versions: dict[str, list[int]] = {}
    for m in results:
        event = json.loads(m.value or b"{}")
        versions.setdefault(event["session"]["id"], []).append(event["session"]["version"])
    # serialized: each task of a session saw a version of its own, one after another
    for session, seen in versions.items():
        assert sorted(seen) == list(range(len(seen))), session
    assert sum(len(v) for v in versions.values()) == 100


def test_a_turn_that_fails_for_good_leaves_the_queue_and_the_next_turn_runs(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    s = make_settings(sessions={"poll_s": 0.05, "max_wait_s": 120})
    session = f"f-{uuid.uuid4().hex}"
    first, failing, after = (uuid.uuid4().hex for _ in range(3))
    fake_llm.add_fault(FaultRule("schema_violation", match=f"{failing}:", delay_s=1.0))  # every attempt

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", first, session, "hello")

            async def succeeded(task_id: str) -> bool:
                record = await svc.ledger.get(task_id)
                return record is not None and record.state == "succeeded" and record.published

            await wait_for(lambda: succeeded(first), 60, what="the first turn", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", failing, session, "boom")

            async def holding() -> bool:  # the failing turn holds the session: the next one queues behind it
                record = await svc.ledger.sessions.get(session)
                return record is not None and record.holder == failing

            await wait_for(holding, 60, what="the failing turn holding the session", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", after, session, "again")
            await wait_for(lambda: succeeded(after), 90, what="the turn after the failing one", service=svc)
            dead = await svc.ledger.get(failing)
            assert dead is not None and dead.state == "dead"
            record = await svc.ledger.sessions.get(session)
            assert record is not None
            assert [t["task_id"] for t in record.turns] == [first, after]
            assert record.queue == []
            told = json.dumps((fake_llm.last_request(f"{after}:answer") or {})["messages"])
            assert "hello" in told and "boom" not in told

    asyncio.run(scenario())
    letters = read_topic(kafka_bootstrap, s.kafka.dlq_topic, expect=1, timeout_s=30)
    assert [(m.key or b"").decode() for m in letters] == [failing]


def test_a_result_accepted_but_never_applied_is_applied_by_its_redelivery(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """A worker that stopped between the ledger's DONE and the session's apply: the task's record
    read again finds the result stored and unpublished, applies it once, then publishes it."""
    s = make_settings(sessions={"poll_s": 0.05})
    session, task_id = f"d-{uuid.uuid4().hex}", uuid.uuid4().hex
    task_input, result = {"text": "remember me"}, {"answer": "stored before the stop"}

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            claim = await svc.ledger.claim(task_id, fingerprint("sess_chat", task_input, None, session), "gone",
                                           "sess_chat")
            entered = await svc.ledger.sessions.enter(session, "sess_chat", task_id, claim.fence, 3000)
            assert isinstance(entered, Entered)
            text = canonical_json(result)
            event = canonical_json({"task_id": task_id, "kind": "sess_chat", "status": "succeeded", "result": result,
                                    "session": {"id": session, "version": 0, "turns_seen": 0, "summarized": 0}})
            done = await svc.ledger.complete(task_id, claim.fence, result=text, digest=digest(text),
                                             event=event.encode(), model="fake", prompt_version="sess-chat-v1")
            assert done.status == "ok"
            assert await _turns(svc, session) == []  # stopped before the apply
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", task_id, session,
                                    task_input["text"])

            async def published() -> bool:
                record = await svc.ledger.get(task_id)
                return record is not None and record.published

            await wait_for(published, 60, what="the redelivered result", service=svc)
            turns = await _turns(svc, session)
            assert [(t["task_id"], t["input"], t["result"]) for t in turns] == [(task_id, task_input, result)]
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.version == 1 and record.queue == [] and not record.holder

    asyncio.run(scenario())
    assert fake_llm.calls_for(task_id) == 0  # nothing ran again
    (message,) = succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=1, timeout_s=30))
    assert json.loads(message.value or b"{}")["result"] == result


class Slow(Chat):
    name, prompt_version = "answer", "sess-slow-v1"


def test_a_task_of_another_kind_and_one_that_waits_too_long_are_dead_letters(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """A session belongs to its first task's kind: another kind naming it is dead letter ``session``;
    a task that waits past AGENT_SESSIONS__MAX_WAIT_S behind a holder is ``session_busy`` naming
    it, and leaves the queue (the next turn runs once the holder is done)."""
    s = make_settings(sessions={"poll_s": 0.05, "max_wait_s": 2})
    session = f"k-{uuid.uuid4().hex}"
    holder, other_kind, waiter, later = (uuid.uuid4().hex for _ in range(4))
    fake_llm.add_fault(FaultRule("latency", match=f"{holder}:", delay_s=4.0, times=1))
    registry = AgentRegistry([*kinds(), Agent("sess_other", Text, (Slow(),), session=Session())])

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=registry) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", holder, session, "slow")

            async def holding() -> bool:
                record = await svc.ledger.sessions.get(session)
                return record is not None and record.holder == holder

            await wait_for(holding, 60, what="the first turn holding the session", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_other", other_kind, session,
                                    "astray")
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", waiter, session, "wait")

            async def ended(task_id: str, state: str) -> bool:
                record = await svc.ledger.get(task_id)
                return record is not None and record.state == state and record.published

            await wait_for(lambda: ended(waiter, "dead"), 60, what="the waiter's dead letter", service=svc)
            await wait_for(lambda: ended(other_kind, "dead"), 60, what="the other kind's dead letter", service=svc)
            await wait_for(lambda: ended(holder, "succeeded"), 60, what="the slow turn", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sess_chat", later, session, "later")
            await wait_for(lambda: ended(later, "succeeded"), 60, what="the turn after", service=svc)
            assert [t["task_id"] for t in await _turns(svc, session)] == [holder, later]
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.kind == "sess_chat" and record.queue == []

    asyncio.run(scenario())
    letters = {(m.key or b"").decode(): m for m in read_topic(kafka_bootstrap, s.kafka.dlq_topic, expect=2,
                                                                timeout_s=30)}
    assert set(letters) == {other_kind, waiter}
    assert letters[other_kind].headers.get("dlq.reason") == b"session"
    assert letters[waiter].headers.get("dlq.reason") == b"session_busy"
    assert holder in (letters[waiter].headers.get("dlq.error") or b"").decode()
    assert fake_llm.calls_for(other_kind) == 0 and fake_llm.calls_for(waiter) == 0
