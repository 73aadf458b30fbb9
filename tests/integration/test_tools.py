"""Agents that act, on the broker: tool calls run once, invalid ones never run, a stale holder cannot
run a tool, unknown outcomes are reconciled, approvals park and resume, compensation undoes once.

The downstream is :class:`FakeDownstream` in its non-idempotent mode: every create it receives is
an effect, so a service that sent a call twice would show a count of 2 for that key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from consumers.records import Record
from dedup.ledger import Claim
from service.api.app import create_app
from service.core.settings import Settings
from service.devtools.downstream import DownstreamFault, FakeDownstream
from service.devtools.fakellm import FakeLLM, FaultRule, ToolArguments
from service.pipeline.base import LostFence, utcnow
from service.pipeline.decode import decode_record
from service.pipeline.parking import compensate, decide, side_effects
from service.runtime.wiring import Service
from tests.support import (
    kill_worker,
    metric,
    produce,
    read_topic,
    running,
    spawn_worker,
    succeeded,
    task_value,
    wait_for,
)

pytestmark = [pytest.mark.integration]

AUTH = {"Authorization": "Bearer s3cret"}
NO_REFUND = {"title": "Broken parcel", "priority": "normal", "refund": 0}
BIG_REFUND = {"title": "Refund the order", "priority": "urgent", "refund": 500}


@pytest.fixture
def downstream() -> Iterator[FakeDownstream]:
    with FakeDownstream(idempotent=False) as api:
        yield api


@pytest.fixture
def model(fake_llm: FakeLLM) -> FakeLLM:
    """The fake model answering with one round of an ``open_ticket`` call: a big refund for task ids
    containing ``appr-``, none otherwise."""
    fake_llm.tool_arguments = [ToolArguments("open_ticket", BIG_REFUND, match="appr-"),
                               ToolArguments("open_ticket", NO_REFUND)]
    return fake_llm


def ticket(task_id: str, message: str = "My parcel arrived broken.") -> bytes:
    return task_value("support_ticket", {"customer": "Ada", "message": message}, task_id)


def settings_for(make_settings: Any, downstream: FakeDownstream, tools: dict[str, Any] | None = None,
                 **overrides: Any) -> Settings:
    s: Settings = make_settings(tools={"tickets_url": downstream.base_url, "sweep_interval_s": 0.3, **(tools or {})},
                                **overrides)
    return s


def results(s: Settings, expect: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=expect)):
        if m.key is not None:
            out.setdefault(m.key.decode(), []).append(m.json())
    return out


def key_of(task_id: str, ordinal: int = 1) -> str:
    return f"{task_id}/file/{ordinal}"


def test_each_call_runs_once_its_result_reaches_the_model_and_a_redelivery_calls_nothing(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    s = settings_for(make_settings, downstream)
    ids = [f"tk-{i}" for i in range(12)]
    views: dict[str, dict[str, Any]] = {}

    async def scenario() -> None:
        async with running(s, model.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), ticket(t)) for t in ids])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == len(ids), 60,
                           what="every ticket task", service=svc)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t") as c:
                for t in ids:
                    r = await c.get(f"/tasks/{t}", headers=AUTH)
                    assert r.status_code == 200, r.text
                    views[t] = r.json()
            requests_before = downstream.stats()["requests"]
            # every record again: duplicates of finished tasks make no tool call and no model call
            calls_before = model.stats()["requests"]
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), ticket(t)) for t in ids])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "duplicate"}) == len(ids), 60,
                           what="every duplicate", service=svc)
            assert downstream.stats()["requests"] == requests_before
            assert model.stats()["requests"] == calls_before
            assert metric(svc, "agent_tool_calls_total", {"tool": "open_ticket", "outcome": "executed"}) == len(ids)

    asyncio.run(scenario())
    stats = downstream.stats()
    assert stats["effects_by_key"] == {key_of(t): 1 for t in ids}
    by_task = results(s, len(ids))
    for t in ids:
        assert len(by_task[t]) == 1
        created = downstream.ticket_for(key_of(t))
        assert created is not None and created["fields"] == NO_REFUND
        view = views[t]
        (call,) = view["tool_calls"]
        assert call["key"] == key_of(t) and call["outcome"] == "executed" and call["result"] == created
        assert call["fence"] == view["fence"] and call["args_digest"] and call["result_digest"]
        (entry,) = view["audit"]
        assert entry["outcome"] == "executed" and entry["key"] == key_of(t) and entry["accepted"] is True
        assert entry["result_digest"] == call["result_digest"] and entry["worker"] == s.worker_id
        # the model's final request carried the ticket as the tool's answer, right after its call
        sent = model.last_request(f"{t}:file")
        assert sent is not None
        assistant, tool_message = sent["messages"][-2:]
        assert assistant["tool_calls"][0]["function"]["name"] == "open_ticket"
        assert tool_message["role"] == "tool" and json.loads(tool_message["content"]) == created
    audit = [m.json() for m in read_topic(s.kafka.bootstrap_servers, s.kafka.audit_topic, expect=len(ids))]
    assert sorted(e["task_id"] for e in audit) == sorted(ids)
    assert all(e["index"] == 0 and e["outcome"] == "executed" for e in audit)


def test_invalid_arguments_and_unknown_tools_are_answered_to_the_model_and_never_run(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    s = settings_for(make_settings, downstream)
    model.tool_rounds = 2  # the model gets a second round after its mistake
    model.add_fault(FaultRule("invalid_tool_args", match="inv-1:file", times=1))
    model.add_fault(FaultRule("unknown_tool", match="unk-1:file", times=1))
    journals: dict[str, dict[str, Any]] = {}

    async def scenario() -> None:
        async with running(s, model.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(t.encode(), ticket(t)) for t in ("inv-1", "unk-1")])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 2, 60,
                           what="both tasks", service=svc)
            for t in ("inv-1", "unk-1"):
                journals[t] = await side_effects(svc.ledger, t)

    asyncio.run(scenario())
    for t, says in (("inv-1", "invalid arguments"), ("unk-1", "there is no tool named")):
        first, second = journals[t]["tool_calls"]
        assert first["state"] == "invalid" and says in first["result"]["error"]
        assert second["state"] == "done" and second["outcome"] == "executed"
        # only the valid call reached the downstream
        assert downstream.stats()["effects_by_key"].get(key_of(t, 1)) is None
        assert downstream.stats()["effects_by_key"][key_of(t, 2)] == 1
        sent = model.last_request(f"{t}:file")
        assert sent is not None
        answered = [m for m in sent["messages"] if m["role"] == "tool"]
        assert says in json.loads(answered[0]["content"])["error"]


def test_a_stale_holder_cannot_run_a_tool(make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    """The round is journaled under fence 1; a newer claim (fence 2) takes the task; the fence-1 worker
    goes on: its intent is refused and the downstream never hears of the call."""
    s = settings_for(make_settings, downstream, ledger={"lease_ms": 200})

    async def scenario() -> None:
        async with running(s, model.base_url) as svc:
            record = Record(s.kafka.input_topic, 0, 0, b"stale-1", ticket("stale-1"))
            task, agent, task_input = decode_record(record, svc.agents, s.max_task_bytes)
            old = await svc.ledger.claim(task.key, task.fingerprint, "old", task.kind)
            assert old.decision == "claimed"
            status, _ = await svc.ledger.effects.first(task.key, old.fence, "r:file:1", {
                "calls": [{"id": "call_1", "name": "open_ticket", "arguments": json.dumps(NO_REFUND)}],
                "fence": old.fence, "at": "t"})
            assert status == "ok"
            await asyncio.sleep(0.3)  # the lease runs out
            new = await svc.ledger.claim(task.key, task.fingerprint, "new", task.kind)
            assert new.decision == "claimed" and new.fence == old.fence + 1
            stale = Claim("claimed", old.fence, 0, 0, None)
            with pytest.raises(LostFence):
                await svc.processor._run(task, agent, task_input, stale, record)
            journal = await side_effects(svc.ledger, task.key)
            assert journal["tool_calls"] == [] and journal["audit"] == []

    asyncio.run(scenario())
    assert downstream.stats()["requests"] == 0


def test_an_unknown_outcome_is_reconciled_and_an_unknowable_one_waits_for_an_operator(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    s = settings_for(make_settings, downstream)
    # the ticket is created, then the connection drops: the service cannot know it landed
    downstream.add_fault(DownstreamFault("drop_after", match="drop-1/", times=1))
    # the same, and the status lookup fails too: nobody can tell
    downstream.add_fault(DownstreamFault("drop_after", match="blind-1/", times=1))
    downstream.add_fault(DownstreamFault("status_error", match="blind-1", status=500))
    # the call fails before it is applied: reconcile says absent, it runs again with the same key
    downstream.add_fault(DownstreamFault("drop_before", match="retry-1/", times=1))
    views: dict[str, dict[str, Any]] = {}

    async def scenario() -> None:
        async with running(s, model.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(t.encode(), ticket(t)) for t in ("drop-1", "blind-1", "retry-1")])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 2
                           and metric(svc, "agent_tasks_total", {"outcome": "parked"}) == 1, 60,
                           what="two tasks done and one parked", service=svc)
            record = await svc.ledger.get("blind-1")
            assert record is not None and record.state == "waiting_approval"
            waiting = json.loads(record.fields["waiting"])
            assert waiting["what"] == "reconcile" and waiting["key"] == key_of("blind-1")
            # an operator checks the downstream by hand and answers: it landed
            landed = downstream.ticket_for(key_of("blind-1"))
            await decide(svc.ledger, svc.publisher.send, svc.metrics, utcnow(), "blind-1", "landed", by="ops",
                         reason="found it in the ticket list", result=landed)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 3, 60,
                           what="the reconciled task", service=svc)
            for t in ("drop-1", "blind-1", "retry-1"):
                views[t] = await side_effects(svc.ledger, t)

    asyncio.run(scenario())
    effects = downstream.stats()["effects_by_key"]
    assert effects == {key_of(t): 1 for t in ("drop-1", "blind-1", "retry-1")}
    assert views["drop-1"]["tool_calls"][0]["outcome"] == "reconciled_landed"
    assert views["blind-1"]["tool_calls"][0]["outcome"] == "reconciled_landed"
    assert views["blind-1"]["tool_calls"][0]["result"] == downstream.ticket_for(key_of("blind-1"))
    assert [d["decision"] for d in views["blind-1"]["decisions"]] == ["landed"]
    assert [e["outcome"] for e in views["blind-1"]["audit"]] == ["reconcile:landed", "reconciled_landed"]
    assert views["retry-1"]["tool_calls"][0]["outcome"] == "executed"


def _ledger_state(s: Settings, task_id: str) -> Any:
    from dedup.client import close, connect
    from dedup.keys import Keys
    from dedup.ledger import Ledger

    async def read() -> str | None:
        client = connect(s.redis.url.get_secret_value())
        try:
            record = await Ledger(client, keys=Keys(s.redis.key_prefix)).get(task_id)
            return record.state if record is not None else None
        finally:
            await close(client)

    return read


@pytest.mark.evicts_killed_members
def test_an_approval_resumes_a_parked_task_on_another_replica_once(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream, tmp_path: Path) -> None:
    s = settings_for(make_settings, downstream)
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    first = spawn_worker(s, str(tmp_path / "a.log"))
    second = None
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"appr-1", ticket("appr-1", "Refund me!"))])
        asyncio.run(wait_for(lambda: _state_is(s, "appr-1", "waiting_approval"), 60, what="the task parked"))
        assert downstream.stats()["requests"] == 0  # nothing ran before the approval
        kill_worker(first)
        second = spawn_worker(s, str(tmp_path / "b.log"))
        approval = json.dumps({"task_id": "appr-1", "approve": True, "reason": "checked", "by": "ada"}).encode()
        produce(s.kafka.bootstrap_servers, s.kafka.approvals_topic, [(b"appr-1", approval), (b"appr-1", approval)])
        got = results(s, 1)
        assert list(got) == ["appr-1"] and len(got["appr-1"]) == 1
        asyncio.run(wait_for(lambda: _state_is(s, "appr-1", "succeeded"), 30, what="the task done"))
    finally:
        kill_worker(first)
        if second is not None:
            kill_worker(second)
    assert downstream.stats()["effects_by_key"] == {key_of("appr-1"): 1}
    assert downstream.ticket_for(key_of("appr-1"))["fields"] == BIG_REFUND  # type: ignore[index]
    # at least once: two exporters (the decision's and the run's) may both send an entry; its
    # index lets a reader drop the repeat
    audit = list({m.json()["index"]: m.json() for m in read_topic(s.kafka.bootstrap_servers, s.kafka.audit_topic,
                                                                  expect=2)}.values())
    assert [e["outcome"] for e in sorted(audit, key=lambda e: e["index"])] == ["approval:approved", "executed"]
    assert audit[0]["by"] == "ada" or audit[1]["by"] == "ada"


async def _state_is(s: Settings, task_id: str, state: str) -> bool:
    return await _ledger_state(s, task_id)() == state


def test_a_rejection_or_no_decision_in_time_dead_letters_the_task(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream, tmp_path: Path) -> None:
    s = settings_for(make_settings, downstream, {"approval_timeout_s": 1.5})
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    worker = spawn_worker(s, str(tmp_path / "w.log"))
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                [(t.encode(), ticket(t, "Refund me!")) for t in ("appr-no", "appr-late")])
        asyncio.run(wait_for(lambda: _state_is(s, "appr-no", "waiting_approval"), 60, what="the task parked"))

        async def reject() -> int:
            from service.runtime.wiring import build

            svc = build(s, llm_base_url=model.base_url)
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                             base_url="http://t") as c:
                    body = {"approve": False, "reason": "not covered", "by": "ada"}
                    refused = await c.post("/tasks/appr-no/approval", json=body)
                    assert refused.status_code == 401  # a write needs the admin token
                    r = await c.post("/tasks/appr-no/approval", json=body, headers=AUTH)
                    assert r.status_code == 200 and r.json()["status"] == "decided", r.text
                    again = await c.post("/tasks/appr-no/approval", json={"approve": True}, headers=AUTH)
                    if again.status_code == 200:  # still resuming: the recorded decision stands
                        assert again.json() == {"status": "resumed_again", "task_id": "appr-no",
                                                "decision": "rejected"}
                    return again.status_code
            finally:
                await svc.aclose()

        assert asyncio.run(reject()) in (200, 409)  # decided once: a second decision changes nothing
        letters = {m.key.decode(): m for m in read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=2,
                                                          timeout_s=60) if m.key is not None}
    finally:
        kill_worker(worker)
    assert letters["appr-no"].headers["dlq.reason"] == b"rejected"
    assert b"not covered" in letters["appr-no"].headers["dlq.error"]
    assert letters["appr-late"].headers["dlq.reason"] == b"expired"
    assert downstream.stats()["requests"] == 0


def test_compensation_undoes_each_call_once_and_a_rerun_is_a_new_generation(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    s = settings_for(make_settings, downstream)
    ids = ["comp-1", "comp-2"]

    async def scenario(svc: Service) -> None:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), ticket(t)) for t in ids])
        await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 2, 60,
                       what="both tasks", service=svc)
        send = svc.publisher.send
        first = await compensate(svc.ledger, svc.agents, send, svc.metrics, utcnow, "comp-1", by="ops")
        assert first.undone == [key_of("comp-1")] and not first.failed
        again = await compensate(svc.ledger, svc.agents, send, svc.metrics, utcnow, "comp-1", by="ops")
        assert again.undone == [] and again.already == [key_of("comp-1")]
        rerun = await compensate(svc.ledger, svc.agents, send, svc.metrics, utcnow, "comp-2", by="ops", rerun=True)
        assert rerun.undone == [key_of("comp-2")] and rerun.rerun
        await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 3, 60,
                       what="the rerun", service=svc)
        view = await side_effects(svc.ledger, "comp-2")
        assert [c["key"] for c in view["tool_calls"]] == ["comp-2/g2/file/1"]
        assert [e["outcome"] for e in view["audit"]] == ["executed", "compensated", "executed"]
        record = await svc.ledger.get("comp-2")
        assert record is not None and record.state == "succeeded" and record.fields["generation"] == "2"

    async def main() -> None:
        async with running(s, model.base_url) as svc:
            await scenario(svc)

    asyncio.run(main())
    stats = downstream.stats()
    assert stats["undos_by_key"] == {f"{key_of('comp-1')}/undo": 1, f"{key_of('comp-2')}/undo": 1}
    assert downstream.ticket_for(key_of("comp-1"))["status"] == "cancelled"  # type: ignore[index]
    assert stats["effects_by_key"] == {key_of("comp-1"): 1, key_of("comp-2"): 1, "comp-2/g2/file/1": 1}
    by_task = results(s, 3)
    assert len(by_task["comp-2"]) == 2 and len(by_task["comp-1"]) == 1
