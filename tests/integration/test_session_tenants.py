"""A session belongs to the tenant of its first task (docs/SESSIONS.md): a task of another tenant
naming it is the dead letter ``session`` ("session S belongs to tenant T"), runs nothing, and takes
no place in the session's queue; the owner's next turn runs and sees only the owner's turns."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from service.agents.registry import AgentRegistry
from service.devtools.fakellm import FakeLLM
from service.sdk import Agent, Session
from tests.support import produce, read_topic, running, session_kinds, task_value, wait_for
from tests.support.session_kinds import Text

pytestmark = [pytest.mark.integration]


class Chat(session_kinds.Chat):
    prompt_version = "sess-tenant-chat-v1"


def test_a_task_of_another_tenant_naming_a_session_is_a_dead_letter(
        make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str) -> None:
    s = make_settings(sessions={"poll_s": 0.05})
    session = f"tn-{uuid.uuid4().hex}"
    first, intruder, second = (uuid.uuid4().hex for _ in range(3))
    registry = AgentRegistry([Agent("sess_tenant_chat", Text, (Chat(),), session=Session())])

    def send(task_id: str, tenant: str, text: str) -> None:
        produce(kafka_bootstrap, s.kafka.input_topic, [(task_id.encode(), task_value(
            "sess_tenant_chat", {"text": text}, task_id, session=session, tenant=tenant))])

    async def scenario() -> None:
        async with running(s, fake_llm.base_url, agents=registry) as svc:

            async def ended(task_id: str, state: str) -> bool:
                record = await svc.ledger.get(task_id)
                return record is not None and record.state == state and record.published

            await asyncio.to_thread(send, first, "acme", "hello")
            await wait_for(lambda: ended(first, "succeeded"), 60, what="the owner's first turn", service=svc)
            await asyncio.to_thread(send, intruder, "globex", "let me in")
            await wait_for(lambda: ended(intruder, "dead"), 60, what="the other tenant's dead letter", service=svc)
            await asyncio.to_thread(send, second, "acme", "again")
            await wait_for(lambda: ended(second, "succeeded"), 60, what="the owner's next turn", service=svc)
            record = await svc.ledger.sessions.get(session)
            assert record is not None
            assert [t["task_id"] for t in record.turns] == [first, second]
            assert (record.tenant, record.queue) == ("acme", [])

    asyncio.run(scenario())
    letters = read_topic(kafka_bootstrap, s.kafka.dlq_topic, expect=1, timeout_s=30)
    assert [(m.key or b"").decode() for m in letters] == [intruder]
    assert letters[0].headers.get("dlq.reason") == b"session"
    assert f"session {session} belongs to tenant acme" in (letters[0].headers.get("dlq.error") or b"").decode()
    assert fake_llm.calls_for(intruder) == 0
