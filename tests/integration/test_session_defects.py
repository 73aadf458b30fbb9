"""Sessions' dead ends on the broker, Redis and the fake model (docs/SESSIONS.md, "In the pipeline"):
a reduce that fails is the task's own dead letter ``session`` before the ledger's DONE, and leaves the
session so the next turn enters at once; a reduce that fails only on a state moved after DONE drops
that update (counted) and never dead-letters a task the ledger calls succeeded; a stored state that
no longer loads into the kind's model is dead letter ``session`` and leaves; a duplicate of a kind
with a session is never run in shadow."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from service.agents.registry import AgentRegistry
from service.devtools.fakellm import FakeLLM
from service.devtools.fakellm.faults import FaultRule
from service.runtime.wiring import Service
from service.sdk import SESSION, Agent, Messages, Session, Step, StrictInput, system_message, user_message
from tests.support import committed, metric, produce, read_topic, running, succeeded, task_value, wait_for

pytestmark = [pytest.mark.integration]

FULL = 50  # the tally refuses to count past this


class Item(StrictInput):
    text: str = Field(min_length=1, max_length=200)
    boom: bool = False


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str = Field(min_length=1)


class Reply(Step):
    name, prompt_version, output_model = "answer", "sd-reply-v1", Answer

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        assert isinstance(task_input, Item)
        view = previous[SESSION]  # a step of a kind with a session reads its view
        return [system_message(f"Answer the user (session version {view.version})."), user_message(task_input.text)]


class Tally(BaseModel):
    n: int = 0
    texts: list[str] = []


def tally(state: Tally, task_input: Item, result: Any) -> Tally:
    if task_input.boom:
        raise ValueError("the tally refuses boom")
    if state.n >= FULL:
        raise ValueError("the tally is full")
    return Tally(n=state.n + 1, texts=[*state.texts, task_input.text])


def kinds() -> AgentRegistry:
    return AgentRegistry([
        Agent("sd_chat", Item, (Reply(),), session=Session()),
        Agent("sd_tally", Item, (Reply(),), session=Session(state=Tally, reduce=tally)),
    ])


def _send(bootstrap: str, topic: str, kind: str, task_id: str, session: str, **task_input: Any) -> None:
    produce(bootstrap, topic, [(task_id.encode(), task_value(kind, task_input, task_id, session=session))])


async def _ended(svc: Service, task_id: str, state: str) -> bool:
    record = await svc.ledger.get(task_id)
    return record is not None and record.state == state and record.published


def _letters(bootstrap: str, topic: str, expect: int) -> dict[str, tuple[str, str]]:
    """The dead letters on ``topic``: task id -> (reason, error)."""
    return {(m.key or b"").decode(): ((m.headers.get("dlq.reason") or b"").decode(),
                                      (m.headers.get("dlq.error") or b"").decode())
            for m in read_topic(bootstrap, topic, expect=expect, timeout_s=30)}


def test_a_reduce_that_fails_is_the_tasks_dead_letter_and_the_next_turn_enters_at_once(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """The reduced state is computed before the ledger's DONE: a reduce that raises ends the task as
    dead letter ``session`` (one outcome, no result), the session is left, and the next turn enters
    without waiting out the stall (120 s here, longer than the next turn may wait)."""
    s = make_settings(sessions={"poll_s": 0.05, "max_wait_s": 60})
    session = f"r-{uuid.uuid4().hex}"
    first, boom, after = (uuid.uuid4().hex for _ in range(3))

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", first, session, text="one")
            await wait_for(lambda: _ended(svc, first, "succeeded"), 60, what="the first turn", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", boom, session,
                                    text="two", boom=True)
            await wait_for(lambda: _ended(svc, boom, "dead"), 60, what="the failing reduce's dead end", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", after, session,
                                    text="three")
            await wait_for(lambda: _ended(svc, after, "succeeded"), 60, what="the turn after", service=svc)
            record = await svc.ledger.sessions.get(session)
            assert record is not None
            assert record.state == {"n": 2, "texts": ["one", "three"]} and record.version == 2
            assert record.queue == [] and not record.holder
            assert metric(svc, "agent_internal_errors_total") == 0

    asyncio.run(scenario())
    letters = _letters(kafka_bootstrap, s.kafka.dlq_topic, 1)
    assert list(letters) == [boom]
    reason, error = letters[boom]
    assert reason == "session" and "the tally refuses boom" in error
    results = [json.loads(m.value or b"{}") for m in succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=2))]
    assert sorted(e["task_id"] for e in results) == sorted([first, after])  # no result for the dead end


def test_a_reduce_that_fails_on_a_state_moved_after_done_drops_the_update_and_publishes(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """An operator's PUT moves the version while the task runs; after the ledger's DONE the apply
    reads the new state and reduces again, and the reduce refuses it: nothing is dead-lettered (the
    ledger accepted the result, which is published), the update is dropped and counted, the state
    stays the operator's, and the session is free for the next turn."""
    s = make_settings(sessions={"poll_s": 0.05, "max_wait_s": 60})
    session = f"m-{uuid.uuid4().hex}"
    first, moved, after = (uuid.uuid4().hex for _ in range(3))
    fake_llm.add_fault(FaultRule("latency", match=f"{moved}:", delay_s=3.0, times=1))

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", first, session, text="one")
            await wait_for(lambda: _ended(svc, first, "succeeded"), 60, what="the first turn", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", moved, session, text="two")

            async def holding() -> bool:
                record = await svc.ledger.sessions.get(session)
                return record is not None and record.holder == moved

            await wait_for(holding, 60, what="the slow turn holding the session", service=svc)
            assert await svc.ledger.sessions.put(session, 1, state={"n": FULL, "texts": ["operator"]}) == "ok"
            await wait_for(lambda: _ended(svc, moved, "succeeded"), 60, what="the moved turn", service=svc)
            assert metric(svc, "agent_session_updates_dropped_total", {"kind": "sd_tally"}) == 1
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.state == {"n": FULL, "texts": ["operator"]}
            assert record.queue == [] and not record.holder
            assert await svc.ledger.sessions.put(session, record.version, state={"n": 0, "texts": []}) == "ok"
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", after, session,
                                    text="three")
            await wait_for(lambda: _ended(svc, after, "succeeded"), 60, what="the turn after", service=svc)
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.state == {"n": 1, "texts": ["three"]}
            assert metric(svc, "agent_internal_errors_total") == 0
            assert metric(svc, "agent_dead_letters_total", {"reason": "internal"}) == 0

    asyncio.run(scenario())
    results = [json.loads(m.value or b"{}") for m in succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=3))]
    assert sorted(e["task_id"] for e in results) == sorted([first, moved, after])
    assert read_topic(kafka_bootstrap, s.kafka.dlq_topic, timeout_s=5) == []


def test_a_stored_state_that_does_not_load_is_the_tasks_dead_letter_and_leaves(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """A state the kind's model refuses (an operator's PUT, a model changed by a deploy): the task
    that enters is dead letter ``session`` saying so, not an internal error, and it leaves the
    session: once the state is corrected, the next turn runs at once."""
    s = make_settings(sessions={"poll_s": 0.05, "max_wait_s": 60})
    session = f"l-{uuid.uuid4().hex}"
    first, refused, after = (uuid.uuid4().hex for _ in range(3))

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", first, session, text="one")
            await wait_for(lambda: _ended(svc, first, "succeeded"), 60, what="the first turn", service=svc)
            assert await svc.ledger.sessions.put(session, 1, state={"n": "many", "texts": []}) == "ok"
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", refused, session,
                                    text="two")
            await wait_for(lambda: _ended(svc, refused, "dead"), 60, what="the refused turn", service=svc)
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.queue == [] and not record.holder
            assert await svc.ledger.sessions.put(session, record.version, state={"n": 7, "texts": []}) == "ok"
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_tally", after, session,
                                    text="three")
            await wait_for(lambda: _ended(svc, after, "succeeded"), 60, what="the turn after", service=svc)
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.state == {"n": 8, "texts": ["three"]}
            assert metric(svc, "agent_internal_errors_total") == 0

    asyncio.run(scenario())
    letters = _letters(kafka_bootstrap, s.kafka.dlq_topic, 1)
    assert list(letters) == [refused]
    reason, error = letters[refused]
    assert reason == "session" and "does not load" in error
    assert fake_llm.calls_for(refused) == 0


def test_a_duplicate_of_a_kind_with_a_session_is_not_run_in_shadow(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """Shadow runs sample every duplicate here; a kind with a session is skipped (its steps need the
    session's view as it stood): the duplicate ends as a duplicate, no call, no dead letter."""
    s = make_settings(llm={"shadow_sample_rate": 1.0}, sessions={"poll_s": 0.05})
    session, task_id = f"h-{uuid.uuid4().hex}", uuid.uuid4().hex

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_chat", task_id, session, text="hi")
            await wait_for(lambda: _ended(svc, task_id, "succeeded"), 60, what="the turn", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sd_chat", task_id, session, text="hi")

            async def both_done() -> bool:
                offsets = await asyncio.to_thread(committed, kafka_bootstrap, s.kafka.group_id, s.kafka.input_topic,
                                                  s.kafka.topic_partitions)
                return sum(max(o, 0) for o in offsets.values()) == 2

            await wait_for(both_done, 90, interval_s=0.5, what="both records' offsets committed", service=svc)
            assert metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) == 1
            assert metric(svc, "agent_internal_errors_total") == 0
            assert sum(metric(svc, "agent_shadow_runs_total", {"outcome": o}) for o in ("same", "different", "failed")) == 0

    asyncio.run(scenario())
    assert fake_llm.calls_for(task_id) == 1
    assert read_topic(kafka_bootstrap, s.kafka.dlq_topic, timeout_s=5) == []
