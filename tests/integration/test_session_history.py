"""A session's history as a budget end to end (docs/SESSIONS.md, "History as a budget"), on the
broker, Redis and the fake model: turns of a kind with a small ``history_share`` until its history
outgrows the budget; the oldest are summarised by one ``@summary`` call, stored once and reused by
the turns after it (their prompts carry the summary and only the recent turns); a redelivered turn
does not summarise again; a replayed turn reuses the summary it journaled; a summary that fails for
good lets the turn go on and its result says what it omitted."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from service.agents.registry import AgentRegistry
from service.agents.session import SUMMARY_PREFIX
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.devtools.fakellm.faults import FaultRule
from service.pipeline import dlq
from service.pipeline.history import SUMMARY_SYSTEM, budget_tokens, summary_room, to_fold
from service.runtime.wiring import Service
from service.sdk import Agent, Session
from tests.support import metric, produce, read_topic, running, session_kinds, task_value, wait_for
from tests.support.session_kinds import Text

pytestmark = [pytest.mark.integration]

SHARE, WINDOW, ANSWER_LIMIT = 0.1, 12288, 512  # a budget of 1,228 tokens: about five turns of ~225 bytes
KIND = "hist_chat"


class Chat(session_kinds.Chat):
    prompt_version = "hist-chat-v1"


def kinds() -> AgentRegistry:
    return AgentRegistry([Agent(KIND, Text, (Chat(),), session=Session(history_share=SHARE))])


def _settings(make_settings: Any) -> Settings:
    settings: Settings = make_settings(sessions={"poll_s": 0.05},
                                       llm={"context_tokens": WINDOW, "max_tokens": ANSWER_LIMIT})
    return settings


def _marker(k: int, session: str) -> str:
    return f"turn-{k:02d}-{session[-8:]}"


def _text(k: int, session: str) -> str:
    return f"{_marker(k, session)} " + "lorem ipsum " * 13


class Turns:
    """One session's turns, sent one at a time, each waited for."""

    def __init__(self, svc: Service, settings: Settings, bootstrap: str, session: str) -> None:
        self.svc, self.settings, self.bootstrap, self.session = svc, settings, bootstrap, session
        self.ids: list[str] = []

    async def send(self, task_id: str | None = None, *, until: str = "succeeded") -> str:
        """Produce the next turn and wait until it ended ``until`` (succeeded: it is the next turn)."""
        task_id = task_id or uuid.uuid4().hex
        value = task_value(KIND, {"text": _text(len(self.ids), self.session)}, task_id, session=self.session)
        await asyncio.to_thread(produce, self.bootstrap, self.settings.kafka.input_topic, [(task_id.encode(), value)])
        await self.ended(task_id, until)
        return task_id

    async def ended(self, task_id: str, until: str = "succeeded") -> None:
        async def done() -> bool:
            record = await self.svc.ledger.get(task_id)
            return record is not None and record.state == until and record.published

        await wait_for(done, 90, interval_s=0.1, what=f"turn {len(self.ids)} ({until})", service=self.svc)
        if until == "succeeded":
            self.ids.append(task_id)

    async def fill(self) -> None:
        """Send turns until the next one would outgrow the budget."""
        await self.send()
        while await self.would_fold() == 0:
            assert len(self.ids) < 12, "the history never outgrew its budget"
            await self.send()

    async def would_fold(self) -> int:
        """How many turns the next turn would fold, by the stored session."""
        record = await self.svc.ledger.sessions.get(self.session)
        assert record is not None
        upto = record.summary.upto if record.summary else 0
        budget = budget_tokens(SHARE, WINDOW)
        return to_fold(record.summary.text if record.summary else None, record.turns[upto:], budget=budget,
                       room=summary_room(budget, ANSWER_LIMIT), keep_turns=None)

    async def result(self, task_id: str) -> dict[str, Any]:
        record = await self.svc.ledger.get(task_id)
        assert record is not None and record.event is not None
        event: dict[str, Any] = json.loads(record.event)
        return event


def _told(fake_llm: FakeLLM, key: str) -> str:
    request = fake_llm.last_request(key)
    assert request is not None, key
    return json.dumps(request["messages"])


def test_a_long_history_is_summarised_once_and_reused_by_the_turns_after_it(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    s = _settings(make_settings)
    session = f"h-{uuid.uuid4().hex}"

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            turns = Turns(svc, s, kafka_bootstrap, session)
            await turns.fill()
            assert fake_llm.calls_for("@summary") == 0  # every turn so far fitted
            folding = await turns.send()
            assert fake_llm.calls_for("@summary") == 1
            for _ in range(2):  # the turns after it fit under the summary: no call
                assert await turns.would_fold() == 0
                await turns.send()
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.summary is not None
            upto = record.summary.upto
            # the summary as the prompt frames it: the fake model's one-word summary may also be an
            # earlier turn's answer, so the bare word proves nothing
            summary = SUMMARY_PREFIX + record.summary.text
            assert 0 < upto < turns.ids.index(folding)
            asked = _told(fake_llm, f"{folding}:@summary")
            request = fake_llm.last_request(f"{folding}:@summary")
            assert request is not None and request["messages"][0]["content"] == SUMMARY_SYSTEM
            assert all(_marker(k, session) in asked for k in range(upto))
            assert all(_marker(k, session) not in asked for k in range(upto, len(turns.ids)))
            for k, task_id in enumerate(turns.ids):
                told = _told(fake_llm, f"{task_id}:answer")
                seen = (await turns.result(task_id))["session"]
                if k < turns.ids.index(folding):  # before the summary: every turn in full
                    assert seen == {"id": session, "version": k, "turns_seen": k, "summarized": 0}
                    assert all(_marker(j, session) in told for j in range(k)) and summary not in told
                    continue
                assert seen == {"id": session, "version": k, "turns_seen": k - upto, "summarized": upto}
                assert summary in told  # the summary, then only the recent turns
                assert all(_marker(j, session) not in told for j in range(upto))
                assert all(_marker(j, session) in told for j in range(upto, k))
            # a redelivered turn (the one that summarised) is a duplicate: nothing is summarised again
            before = metric(svc, "agent_tasks_total", {"outcome": "duplicate"})
            value = task_value(KIND, {"text": _text(turns.ids.index(folding), session)}, folding, session=session)
            await asyncio.to_thread(produce, kafka_bootstrap, s.kafka.input_topic, [(folding.encode(), value)])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) > before, 60,
                           what="the redelivered turn", service=svc)
            assert fake_llm.calls_for("@summary") == 1
            assert metric(svc, "agent_session_summaries_total", {"kind": KIND}) == 1
            again = await svc.ledger.sessions.get(session)
            assert again is not None and again.summary == record.summary and len(again.turns) == len(turns.ids)

    asyncio.run(scenario())


def test_a_replayed_turn_reuses_the_summary_it_journaled(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    """The turn that summarised fails for good after storing its summary; an operator's correction
    drops the summary; the turn replayed from its dead letter finds its journaled summary and makes
    no second call."""
    s = _settings(make_settings)
    session = f"r-{uuid.uuid4().hex}"
    failing = uuid.uuid4().hex
    fake_llm.add_fault(FaultRule("schema_violation", match=f"{failing}:answer"))  # every attempt

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            turns = Turns(svc, s, kafka_bootstrap, session)
            await turns.fill()
            await turns.send(failing, until="dead")
            assert fake_llm.calls_for(f"{failing}:@summary") == 1
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.summary is not None and record.queue == []
            stored = record.summary
            assert await svc.ledger.sessions.put(session, record.version, turns=record.turns) == "ok"
            corrected = await svc.ledger.sessions.get(session)
            assert corrected is not None and corrected.summary is None
            fake_llm.clear_faults()
            report = await dlq.replay(s.kafka, svc.ledger, None, {"invalid_output"}, limit=10)
            assert report.replayed == 1
            await turns.ended(failing)  # produced again by the replay
            assert fake_llm.calls_for(f"{failing}:@summary") == 1  # the journaled summary, reused
            after = await svc.ledger.sessions.get(session)
            assert after is not None and after.summary == stored
            seen = (await turns.result(failing))["session"]
            assert seen["summarized"] == stored.upto and seen["turns_seen"] == len(record.turns) - stored.upto
            assert SUMMARY_PREFIX + stored.text in _told(fake_llm, f"{failing}:answer")

    asyncio.run(scenario())


def test_a_summary_that_fails_for_good_lets_the_turn_go_on_and_says_what_it_omitted(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    s = _settings(make_settings)
    session = f"o-{uuid.uuid4().hex}"
    fake_llm.add_fault(FaultRule("schema_violation", match="@summary"))  # every summary, every attempt

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=kinds()) as svc:
            turns = Turns(svc, s, kafka_bootstrap, session)
            await turns.fill()
            fold = await turns.would_fold()
            cut = await turns.send()
            k = turns.ids.index(cut)
            assert fake_llm.calls_for(f"{cut}:@summary") == s.llm.max_attempts
            seen = (await turns.result(cut))["session"]
            assert seen == {"id": session, "version": k, "turns_seen": k - fold, "summarized": 0, "omitted": fold}
            told = _told(fake_llm, f"{cut}:answer")
            assert all(_marker(j, session) not in told for j in range(fold))
            assert all(_marker(j, session) in told for j in range(fold, k))
            record = await svc.ledger.sessions.get(session)
            assert record is not None and record.summary is None and len(record.turns) == k + 1
            assert metric(svc, "agent_session_summaries_total", {"kind": KIND}) == 0

    asyncio.run(scenario())
    assert read_topic(kafka_bootstrap, s.kafka.dlq_topic, timeout_s=5) == []
