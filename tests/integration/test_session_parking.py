"""A session's turn and its dead ends on the broker, Redis and the fake model (docs/SESSIONS.md, "In
the pipeline"): a task of a session that parks for an approval keeps its turn until the park's own
deadline, so a later task of the session waits however long the lease and the stall are, and the
parked task's turn lands first once it is approved; a park that ends dead (expired) leaves the
session at once; the ``internal`` dead letter leaves too; a wait that the task's deadline ends is
``expired``, not ``session_busy``."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from service.agents.registry import AgentRegistry
from service.agents.tools import FunctionTool, ToolCall
from service.devtools.fakellm import FakeLLM
from service.pipeline.base import iso
from service.pipeline.parking import decide, sweep
from service.runtime.wiring import Service
from service.sdk import (
    SESSION,
    Agent,
    Messages,
    Session,
    Step,
    StrictInput,
    session_messages,
    system_message,
    user_message,
)
from tests.support import metric, produce, read_topic, running, succeeded, task_value, wait_for

pytestmark = [pytest.mark.integration]

LEASE_MS, STALL_S = 1000, 2.0  # small: a parked holder must outlast both


class Ask(StrictInput):
    text: str = Field(min_length=1, max_length=200)
    ask: bool = False  # its payment waits for a person's approval


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str = Field(min_length=1)


def _pay(call: ToolCall) -> dict[str, Any]:
    return {"paid": call.key}


class Pay(Step):
    name, prompt_version, output_model = "pay", "sp-pay-v1", Answer
    max_tool_rounds, max_tool_calls = 2, 2
    tools = (FunctionTool("pay", _pay, timeout_s=5.0),)

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        assert isinstance(task_input, Ask)
        if task_input.text == "crash":  # a bug of the kind's own code: the service's internal error
            raise RuntimeError("the step's messages crash")
        return [system_message("Pay what the user asks."), *session_messages(previous.get(SESSION)),
                user_message(task_input.text)]

    def approval(self, task_input: BaseModel, call: ToolCall) -> str | None:
        assert isinstance(task_input, Ask)
        return "a person approves this payment" if task_input.ask else None


class PayBriefly(Pay):
    prompt_version = "sp-pay-brief-v1"
    approval_timeout_s = 2.0


def kinds() -> AgentRegistry:
    return AgentRegistry([
        Agent("sp_pay", Ask, (Pay(),), session=Session()),
        Agent("sp_pay_brief", Ask, (PayBriefly(),), session=Session()),
    ])


def _send(bootstrap: str, topic: str, kind: str, task_id: str, session: str, **extra: Any) -> None:
    task_input = {"text": extra.pop("text", "pay the invoice"), "ask": extra.pop("ask", False)}
    produce(bootstrap, topic, [(task_id.encode(), task_value(kind, task_input, task_id, session=session, **extra))])


async def _state(svc: Service, task_id: str) -> str | None:
    record = await svc.ledger.get(task_id)
    return record.state if record is not None else None


async def _ended(svc: Service, task_id: str, state: str) -> bool:
    record = await svc.ledger.get(task_id)
    return record is not None and record.state == state and record.published


async def _queued(svc: Service, session: str, task_id: str) -> bool:
    record = await svc.ledger.sessions.get(session)
    return record is not None and task_id in record.queue


def _settings(make_settings: Any, stall_s: float = STALL_S, **sessions: Any) -> Any:
    return make_settings(ledger={"lease_ms": LEASE_MS}, tools={"sweep_interval_s": 0.3}, internal_retries=0,
                         sessions={"poll_s": 0.1, "max_wait_s": 120, "stall_s": stall_s, **sessions})


def _letters(bootstrap: str, topic: str, expect: int) -> dict[str, tuple[str, str]]:
    """The dead letters on ``topic``: task id -> (reason, error)."""
    return {(m.key or b"").decode(): ((m.headers.get("dlq.reason") or b"").decode(),
                                      (m.headers.get("dlq.error") or b"").decode())
            for m in read_topic(bootstrap, topic, expect=expect, timeout_s=30)}


def test_a_parked_task_keeps_its_turn_and_its_turn_lands_first(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """Task 1 parks for an approval while it holds its session; task 2 of the session arrives and
    waits far longer than the lease and the stall: it has not run. Approved, task 1 completes and its
    turn is applied first; task 2 then runs and sees task 1's turn."""
    s = _settings(make_settings)
    session = f"p-{uuid.uuid4().hex}"
    first, second = f"sp1-{uuid.uuid4().hex}", f"sp2-{uuid.uuid4().hex}"

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sp_pay", first, session, ask=True)
            await wait_for(lambda: _state_is(svc, first, "waiting_approval"), 60, what="task 1 parked", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sp_pay", second, session)
            await wait_for(lambda: _queued(svc, session, second), 60, what="task 2 queued behind task 1", service=svc)
            await asyncio.sleep(3 * (LEASE_MS / 1000 + STALL_S))  # lease and stall run out several times over
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.holder == first and record.version == 0 and record.turns == []
            assert await _state(svc, second) != "succeeded"
            await decide(svc.ledger, svc.publisher.send, svc.metrics, datetime.now(UTC), first, "approved", by="ana")
            await wait_for(lambda: _ended(svc, first, "succeeded"), 60, what="task 1 approved and done", service=svc)
            await wait_for(lambda: _ended(svc, second, "succeeded"), 60, what="task 2 after it", service=svc)
            record = await svc.ledger.sessions.get(session)
            assert record is not None and [t["task_id"] for t in record.turns] == [first, second]
            assert record.version == 2 and record.queue == [] and not record.holder
            assert metric(svc, "agent_dead_letters_total", {"reason": "session_busy"}) == 0

    asyncio.run(scenario())
    results = {e["task_id"]: e for e in (json.loads(m.value or b"{}") for m in
                                         succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=2)))}
    assert set(results) == {first, second}
    assert results[second]["session"]["version"] == 1 and results[second]["session"]["turns_seen"] == 1


async def _state_is(svc: Service, task_id: str, state: str) -> bool:
    return await _state(svc, task_id) == state


async def _swept(svc: Service, task_id: str) -> bool:
    """The sweeper's turn (every replica runs one; the test's service runs none), then whether the
    task ended dead."""
    await sweep(svc.ledger, svc.publisher.send, svc.metrics, datetime.now(UTC))
    return await _ended(svc, task_id, "dead")


def test_a_park_that_expires_leaves_the_session_at_once(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """The park's deadline passes: the sweeper expires it, the task resumes in its own turn, ends
    dead letter ``expired`` and leaves; the next task enters without waiting out the stall (60 s)."""
    s = _settings(make_settings, stall_s=60.0)
    session = f"e-{uuid.uuid4().hex}"
    first, second = f"se1-{uuid.uuid4().hex}", f"se2-{uuid.uuid4().hex}"

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sp_pay_brief", first, session,
                                    ask=True)
            await wait_for(lambda: _state_is(svc, first, "waiting_approval"), 60, what="task 1 parked", service=svc)
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sp_pay_brief", second, session)
            await wait_for(lambda: _swept(svc, first), 30, interval_s=0.3, what="task 1 expired", service=svc)
            await wait_for(lambda: _ended(svc, second, "succeeded"), 30, what="task 2 well within the stall",
                           service=svc)
            record = await svc.ledger.sessions.get(session)
            assert record is not None and [t["task_id"] for t in record.turns] == [second]

    asyncio.run(scenario())
    letters = _letters(kafka_bootstrap, s.kafka.dlq_topic, 1)
    assert list(letters) == [first] and letters[first][0] == "expired"


def test_the_internal_dead_letter_leaves_the_session(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """A bug of the service's own code on a task that entered its session: dead letter ``internal``,
    and the session is left, so the next task enters without waiting out the stall (60 s)."""
    s = _settings(make_settings, stall_s=60.0)
    session = f"i-{uuid.uuid4().hex}"
    first, second = f"si1-{uuid.uuid4().hex}", f"si2-{uuid.uuid4().hex}"

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sp_pay", first, session,
                                    text="crash")
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sp_pay", second, session)
            await wait_for(lambda: _ended(svc, second, "succeeded"), 30, what="task 2 well within the stall",
                           service=svc)
            record = await svc.ledger.sessions.get(session)
            assert record is not None and [t["task_id"] for t in record.turns] == [second]
            assert record.queue == [] and not record.holder

    asyncio.run(scenario())
    letters = _letters(kafka_bootstrap, s.kafka.dlq_topic, 1)
    assert list(letters) == [first] and letters[first][0] == "internal"


def test_a_wait_its_deadline_ends_is_expired_and_observed(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """Task 2 waits behind a parked holder; its deadline comes before the session's longest wait:
    dead letter ``expired`` naming the session, and the wait is observed."""
    s = _settings(make_settings, stall_s=60.0)
    session = f"d-{uuid.uuid4().hex}"
    first, second = f"sd1-{uuid.uuid4().hex}", f"sd2-{uuid.uuid4().hex}"

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sp_pay", first, session, ask=True)
            await wait_for(lambda: _state_is(svc, first, "waiting_approval"), 60, what="task 1 parked", service=svc)
            deadline = iso(datetime.now(UTC) + timedelta(seconds=4))
            await asyncio.to_thread(_send, kafka_bootstrap, s.kafka.input_topic, "sp_pay", second, session,
                                    deadline=deadline)
            await wait_for(lambda: _ended(svc, second, "dead"), 60, what="task 2's deadline", service=svc)
            assert metric(svc, "agent_session_wait_seconds_count", {"kind": "sp_pay"}) >= 1
            assert metric(svc, "agent_dead_letters_total", {"reason": "session_busy"}) == 0

    asyncio.run(scenario())
    letters = _letters(kafka_bootstrap, s.kafka.dlq_topic, 1)
    assert list(letters) == [second]
    reason, error = letters[second]
    assert reason == "expired" and f"waiting for its turn in session {session}" in error
