"""Parked tasks, approvals and tools under hostile input and bad timing, on the broker and Redis:
the approvals consumer survives every malformed record and never commits a decision it did not
apply; a tool call still in flight downstream is never run again; a rerun whose record was not
produced is produced by the sweeper; a parked task outlives the ledger's TTL until its deadline;
a tool URL's secrets never reach a reason, a log or a read-only page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from consumers.records import Record
from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger, LedgerUnavailable
from service.agents.support import TICKET_PARAMETERS, FileTicket
from service.agents.tools import HttpTool
from service.api.app import create_app
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.devtools.downstream import DownstreamFault, FakeDownstream
from service.devtools.fakellm import FakeLLM, ToolArguments
from service.pipeline.base import Parked, iso, utcnow
from service.pipeline.decode import decode_record
from service.pipeline.parking import compensate, side_effects, sweep
from service.pipeline.tools import ToolLoop
from service.runtime.parked import ApprovalsConsumer, approval_applier
from service.runtime.wiring import Service, build
from tests.support import committed, metric, produce, running, task_value, wait_for

pytestmark = [pytest.mark.integration]

AUTH = {"Authorization": "Bearer s3cret"}
NO_REFUND = {"title": "Broken parcel", "priority": "normal", "refund": 0}
BIG_REFUND = {"title": "Refund the order", "priority": "urgent", "refund": 500}
SECRETS = ("Hunter2pw", "TOPSECRETSIG")


@pytest.fixture
def downstream() -> Iterator[FakeDownstream]:
    with FakeDownstream(idempotent=False) as api:
        yield api


@pytest.fixture
def model(fake_llm: FakeLLM) -> FakeLLM:
    fake_llm.tool_arguments = [ToolArguments("open_ticket", BIG_REFUND, match="appr-"),
                               ToolArguments("open_ticket", NO_REFUND)]
    return fake_llm


def ticket(task_id: str, message: str = "My parcel arrived broken.", **extra: Any) -> bytes:
    return task_value("support_ticket", {"customer": "Ada", "message": message}, task_id, **extra)


def settings_for(make_settings: Any, downstream: FakeDownstream, **overrides: Any) -> Settings:
    s: Settings = make_settings(tools={"tickets_url": downstream.base_url, "sweep_interval_s": 0.3}, **overrides)
    return s


async def state_of(svc: Service, task_id: str) -> str | None:
    record = await svc.ledger.get(task_id)
    return record.state if record is not None else None


# -- the approvals consumer -----------------------------------------------------------------------


def test_malformed_approvals_are_skipped_and_counted_and_the_next_one_is_applied(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    s = settings_for(make_settings, downstream)
    bad: list[tuple[bytes | None, bytes | None]] = [
        (b"k", json.dumps({"task_id": "a b", "approve": True}).encode()),  # an invalid task key
        (b"k", None),  # a tombstone
        (b"k", b"{not json"),
        (b"k", b"\xff\xfe{}"),  # not UTF-8
        (b"k", b'{"task_id": "\\ud800", "approve": true}'),  # a lone surrogate
        (b"k", json.dumps({"task_id": 7, "approve": "yes"}).encode()),  # wrong types
        (b"k", b"[" * 50_000),  # nested too deep to parse
        (b"k", json.dumps({"task_id": "appr-1", "approve": True, "reason": "x" * 200_000}).encode()),  # huge
        (b"k", json.dumps({"task_id": "nobody", "approve": True}).encode()),  # an unknown task
    ]

    async def scenario() -> None:
        async with running(s, model.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"appr-1", ticket("appr-1", "Refund me!"))])
            await wait_for(lambda: _is(state_of(svc, "appr-1"), "waiting_approval"), 60, what="the task parked")
            consumer = ApprovalsConsumer(s, approval_applier(svc.ledger, svc.publisher.send, svc.metrics, s),
                                         asyncio.get_running_loop(), metrics=svc.metrics)
            consumer.start()
            try:
                produce(s.kafka.bootstrap_servers, s.kafka.approvals_topic, bad, partition=0)
                odd_headers = [("", b""), ("\u00e9t\u00e9", b"\xff\x00"), ("agent.resumed", b"x" * 1000)]
                good = json.dumps({"task_id": "appr-1", "approve": True, "by": "ada"}).encode()
                produce(s.kafka.bootstrap_servers, s.kafka.approvals_topic, [(b"appr-1", good, odd_headers)],
                        partition=0)
                await wait_for(lambda: _is(state_of(svc, "appr-1"), "succeeded"), 60,
                               what="the valid approval applied behind the bad ones", service=svc)
                await wait_for(lambda: committed(s.kafka.bootstrap_servers, f"{s.kafka.group_id}.approvals",
                                                 s.kafka.approvals_topic, 1)[0] == len(bad) + 1, 60,
                               what="every record committed")
                assert consumer.alive()
            finally:
                await asyncio.to_thread(consumer.stop)
            skipped = {reason: metric(svc, "agent_approvals_skipped_total", {"reason": reason})
                       for reason in ("task_key", "tombstone", "json", "encoding", "schema", "oversize",
                                      "unknown_task")}
            assert skipped == {"task_key": 1, "tombstone": 1, "json": 2, "encoding": 2, "schema": 1, "oversize": 1,
                               "unknown_task": 1}

    asyncio.run(scenario())
    assert downstream.stats()["effects_by_key"] == {"appr-1/file/1": 1}


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)


class _Applier:
    """Stands for the ledger's side of a decision: records the calls, fails as told."""

    def __init__(self, fail: list[BaseException | None]) -> None:
        self.fail, self.calls = fail, 0
        self.applied: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    async def __call__(self, task_id: str, decision: str, by: str, reason: str) -> None:
        with self.lock:
            self.calls += 1
            error = self.fail.pop(0) if self.fail else None
        if error is not None:
            raise error
        self.applied.append((task_id, decision))


def test_a_stop_during_a_retry_leaves_the_decision_uncommitted(make_settings: Any) -> None:
    s: Settings = make_settings()
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    apply = _Applier([LedgerUnavailable("redis away")] * 1000)

    async def scenario() -> None:
        consumer = ApprovalsConsumer(s, apply, asyncio.get_running_loop(), metrics=Metrics())
        consumer.start()
        try:
            produce(s.kafka.bootstrap_servers, s.kafka.approvals_topic,
                    [(b"t-1", json.dumps({"task_id": "t-1", "approve": True}).encode())], partition=0)
            await wait_for(lambda: apply.calls >= 2, 60, what="the decision retried")
        finally:
            await asyncio.to_thread(consumer.stop)

    asyncio.run(scenario())
    assert apply.applied == []
    offsets = committed(s.kafka.bootstrap_servers, f"{s.kafka.group_id}.approvals", s.kafka.approvals_topic, 1)
    assert offsets[0] < 1  # never applied, never committed: the next consumer applies it


def test_an_unexpected_error_restarts_the_loop_and_the_record_is_applied(
        make_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    s: Settings = make_settings()
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    apply = _Applier([RuntimeError("a bug"), None])

    async def scenario() -> None:
        consumer = ApprovalsConsumer(s, apply, asyncio.get_running_loop(), metrics=Metrics())
        consumer.start()
        try:
            produce(s.kafka.bootstrap_servers, s.kafka.approvals_topic,
                    [(b"t-1", json.dumps({"task_id": "t-1", "approve": True}).encode())], partition=0)
            await wait_for(lambda: apply.applied, 60, what="the decision applied after the loop restarted")
            await wait_for(lambda: committed(s.kafka.bootstrap_servers, f"{s.kafka.group_id}.approvals",
                                             s.kafka.approvals_topic, 1)[0] == 1, 60, what="the offset committed")
            assert consumer.alive()
        finally:
            await asyncio.to_thread(consumer.stop)

    with caplog.at_level(logging.WARNING, logger="service.runtime.parked"):
        asyncio.run(scenario())
    assert apply.applied == [("t-1", "approved")]
    assert "RuntimeError" in caplog.text and "restarting" in caplog.text


# -- a tool call still in flight ------------------------------------------------------------------


class _Steps:
    """What the tool loop needs of the step stage: a real ledger; the model's answers scripted
    (first a call of ``open_ticket``, then the step's output)."""

    def __init__(self, svc: Service, arguments: dict[str, Any]) -> None:
        self.ledger, self.metrics, self.clock, self.worker_id = svc.ledger, svc.metrics, utcnow, "w-test"
        self.arguments = arguments

    async def call_step(self, task: Any, step: Any, task_input: Any, previous: Any, fence: int, attempts: int, *,
                        conversation: Any = None, offer_tools: bool = False,
                        answered: Any = None) -> tuple[Any, int]:
        if not any(m.get("role") == "tool" for m in conversation or ()):
            return [{"id": "call_1", "name": "open_ticket", "arguments": json.dumps(self.arguments)}], attempts + 1
        return {"reply": "filed", "status": "filed"}, attempts + 1

    async def export_audit(self, task_key: str) -> None:
        return None


def _tool(base_url: str, timeout_s: float, settle_s: float | None = None, status_base: str | None = None,
          query: str = "") -> HttpTool:
    tool = HttpTool("open_ticket", f"{base_url}/tickets{query}", parameters=TICKET_PARAMETERS,
                    status_url=f"{status_base or base_url}/tickets/by-key/{{key}}{query}", timeout_s=timeout_s)
    tool.settle_s = settle_s  # how long a call may still act after its caller gave up
    return tool


async def _run_loop(s: Settings, svc: Service, tool: HttpTool, task_id: str, **extra: Any) -> tuple[Any, Any, int]:
    """Run the tool loop of one support task under a fresh claim: (its output, the task, the fence)."""
    record = Record(s.kafka.input_topic, 0, 0, task_id.encode(), ticket(task_id, **extra))
    task, _agent, task_input = decode_record(record, svc.agents, s.max_task_bytes)
    claim = await svc.ledger.claim(task.key, task.fingerprint, "w-test", task.kind)
    assert claim.decision == "claimed"
    step = FileTicket(tool, 100.0, 3600.0)
    loop = ToolLoop(_Steps(svc, NO_REFUND), task, step, task_input, {}, claim.fence, 0, record)
    try:
        return await loop.run(), task, claim.fence
    finally:
        await tool.aclose()


def test_a_not_found_while_the_call_may_still_be_in_flight_does_not_run_it_again(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    """The downstream takes 2 s to create the ticket; the client gives up after 1 s. A status check
    at once would hear 404 and run the call again: it waits until the call has settled."""
    s = settings_for(make_settings, downstream)
    downstream.add_fault(DownstreamFault("delay", match="slow-1/", delay_s=2.0, times=1))

    async def scenario() -> None:
        svc = build(s, llm_base_url=model.base_url)
        try:
            await _run_loop(s, svc, _tool(downstream.base_url, timeout_s=1.0, settle_s=6.0), "slow-1")
            (call,) = (await side_effects(svc.ledger, "slow-1"))["tool_calls"]
            assert call["outcome"] == "reconciled_landed"
            assert call["result"] == downstream.ticket_for("slow-1/file/1")
        finally:
            await svc.aclose()

    asyncio.run(scenario())
    assert downstream.stats()["effects_by_key"] == {"slow-1/file/1": 1}


def test_a_call_journaled_by_a_worker_that_died_is_not_run_again_while_it_may_be_in_flight(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    """A worker journals its intent, sends the call (the downstream takes 2 s) and loses the task;
    the next holder finds the intent: it waits until the call settled, then hears that it landed."""
    s = settings_for(make_settings, downstream, ledger={"lease_ms": 200})
    downstream.add_fault(DownstreamFault("delay", match="died-1/", delay_s=2.0, times=1))
    key = "died-1/file/1"

    async def scenario() -> None:
        svc = build(s, llm_base_url=model.base_url)
        try:
            record = Record(s.kafka.input_topic, 0, 0, b"died-1", ticket("died-1"))
            task, _agent, task_input = decode_record(record, svc.agents, s.max_task_bytes)
            old = await svc.ledger.claim(task.key, task.fingerprint, "old", task.kind)
            effects = svc.ledger.effects
            calls = [{"id": "call_1", "name": "open_ticket", "arguments": json.dumps(NO_REFUND)}]
            assert (await effects.first(task.key, old.fence, "r:file:1", {"calls": calls, "fence": old.fence,
                                                                            "at": iso(utcnow())}))[0] == "ok"
            intent = {"state": "intent", "key": key, "tool": "open_ticket", "arguments": NO_REFUND,
                      "fence": old.fence, "worker": "old", "intent_at": iso(utcnow()), "result": None}
            assert (await effects.first(task.key, old.fence, "c:file:1", intent))[0] == "ok"
            async with httpx.AsyncClient(base_url=downstream.base_url) as c:
                sent = asyncio.create_task(c.post("/tickets", json=NO_REFUND, headers={"Idempotency-Key": key}))
                await asyncio.sleep(0.3)  # the old holder's lease runs out; its call is still downstream
                new = await svc.ledger.claim(task.key, task.fingerprint, "new", task.kind)
                assert new.decision == "claimed" and new.fence > old.fence
                tool = _tool(downstream.base_url, timeout_s=1.0, settle_s=4.0)
                loop = ToolLoop(_Steps(svc, NO_REFUND), task, FileTicket(tool, 100.0, 3600.0), task_input, {},
                                new.fence, 0, record)
                try:
                    await loop.run()
                finally:
                    await tool.aclose()
                assert (await sent).status_code == 201
            (call,) = (await side_effects(svc.ledger, "died-1"))["tool_calls"]
            assert call["outcome"] == "reconciled_landed"
        finally:
            await svc.aclose()

    asyncio.run(scenario())
    assert downstream.stats()["effects_by_key"] == {key: 1}


@pytest.mark.parametrize(("fault", "status"), [("status_error", 409), ("status_accepted", 500), ("status_pending", 500)])
def test_an_in_progress_answer_is_asked_again_and_the_call_never_runs_twice(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream, fault: str, status: int) -> None:
    s = settings_for(make_settings, downstream)
    downstream.add_fault(DownstreamFault("drop_after", match="prog-1/", times=1))
    downstream.add_fault(DownstreamFault(fault, match="prog-1", status=status, times=2))

    async def scenario() -> None:
        svc = build(s, llm_base_url=model.base_url)
        try:
            await _run_loop(s, svc, _tool(downstream.base_url, timeout_s=0.5), "prog-1")
            (call,) = (await side_effects(svc.ledger, "prog-1"))["tool_calls"]
            assert call["outcome"] == "reconciled_landed"
            assert call["result"] == downstream.ticket_for("prog-1/file/1")
        finally:
            await svc.aclose()

    asyncio.run(scenario())
    stats = downstream.stats()
    assert stats["effects_by_key"] == {"prog-1/file/1": 1} and stats["status_checks"] == 3


def test_a_call_in_progress_past_the_tasks_deadline_parks_without_running_again(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    s = settings_for(make_settings, downstream)
    downstream.add_fault(DownstreamFault("drop_after", match="late-1/", times=1))
    downstream.add_fault(DownstreamFault("status_pending", match="late-1"))

    async def scenario() -> None:
        svc = build(s, llm_base_url=model.base_url)
        try:
            with pytest.raises(Parked) as parked:
                await _run_loop(s, svc, _tool(downstream.base_url, timeout_s=0.5), "late-1",
                                deadline=iso(utcnow() + timedelta(seconds=4)))
            assert parked.value.waiting["what"] == "reconcile"
            assert "in progress" in parked.value.waiting["reason"]
        finally:
            await svc.aclose()

    asyncio.run(scenario())
    assert downstream.stats()["effects_by_key"] == {"late-1/file/1": 1}


# -- compensate --rerun ---------------------------------------------------------------------------


def test_a_rerun_whose_record_was_not_produced_is_produced_by_the_sweeper(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    s = settings_for(make_settings, downstream)

    async def failing_send(topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        raise OSError("the broker is away")

    async def scenario() -> None:
        async with running(s, model.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"rr-1", ticket("rr-1"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, 60,
                           what="the task", service=svc)
            with pytest.raises(OSError):
                await compensate(svc.ledger, svc.agents, failing_send, svc.metrics, utcnow, "rr-1", by="ops",
                                 rerun=True)
            # the sweeper's turn, once the retry time has come: the task is produced, runs and ends
            later = utcnow() + timedelta(minutes=5)
            acted = await sweep(svc.ledger, svc.publisher.send, svc.metrics, later)
            assert acted == 1
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 2, 60,
                           what="the rerun", service=svc)
            record = await svc.ledger.get("rr-1")
            assert record is not None and record.state == "succeeded" and record.fields["generation"] == "2"
            assert await svc.ledger.effects.parked(until_ms=later.timestamp() * 1000) == []

    asyncio.run(scenario())


# -- a parked task outlives the ledger's TTL ------------------------------------------------------


def test_a_parked_task_is_kept_until_its_deadline_whatever_the_ledgers_ttl(redis_url: str) -> None:
    async def scenario() -> None:
        client = connect(redis_url)
        try:
            ledger = Ledger(client, keys=Keys("ttl-test"), ttl_s=60)
            claim = await ledger.claim("long-wait", "fp", "w", "support_ticket")
            now_ms = int(utcnow().timestamp() * 1000)
            await ledger.effects.first("long-wait", claim.fence, "r:file:1", {"calls": []}, {"topic": "t"})
            waiting = {"what": "approval", "step": "file", "ordinal": 1, "tool": "open_ticket", "key": "k",
                       "reason": "big", "since_ms": now_ms, "deadline_ms": now_ms + 7 * 24 * 3600 * 1000}
            assert await ledger.effects.park("long-wait", claim.fence, waiting)
            keys = ledger.keys
            for key in (keys.task("long-wait"), keys.tools("long-wait")):
                assert await client.ttl(key) >= 7 * 24 * 3600, key
        finally:
            await close(client)

    asyncio.run(scenario())


# -- secrets in tool URLs -------------------------------------------------------------------------


def test_a_tool_urls_secrets_reach_no_reason_log_or_read_page(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream, caplog: pytest.LogCaptureFixture) -> None:
    s = settings_for(make_settings, downstream, reads_open=True)
    downstream.add_fault(DownstreamFault("drop_after", match="sec-1/", times=1))
    with_secret = downstream.base_url.replace("http://", "http://ops:Hunter2pw@")
    closed = "http://ops:Hunter2pw@127.0.0.1:1"  # the status endpoint cannot be reached
    pages: list[str] = []

    async def scenario() -> None:
        svc = build(s, llm_base_url=model.base_url)
        try:
            tool = _tool(with_secret, timeout_s=0.5, status_base=closed, query="?sig=TOPSECRETSIG")
            with pytest.raises(Parked) as parked:
                await _run_loop(s, svc, tool, "sec-1")
            waiting = parked.value.waiting
            task, _agent, _input = decode_record(Record(s.kafka.input_topic, 0, 0, b"sec-1", ticket("sec-1")),
                                                 svc.agents, s.max_task_bytes)
            record = await svc.ledger.get("sec-1")
            assert record is not None
            await svc.processor._park(task, int(record.fields["fence"]), waiting, "task_id=sec-1")
            record = await svc.ledger.get("sec-1")
            assert record is not None and record.state == "waiting_approval"
            reason = json.loads(record.fields["waiting"])["reason"]
            assert "127.0.0.1:1" in reason  # where it failed is still said
            pages.append(reason)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t") as c:
                for path in ("/parked", "/ui/parked", "/tasks/sec-1"):
                    r = await c.get(path, headers=AUTH if not path.startswith("/ui") else None)
                    assert r.status_code == 200, (path, r.status_code)
                    assert "sec-1" in r.text
                    pages.append(r.text)
                # a reason stored before URLs were cut down is cut down where it is shown
                stored = {**json.loads(record.fields["waiting"]), "reason": f"failed at {with_secret}/x?sig=TOPSECRETSIG"}
                await svc.redis.hset(svc.ledger.keys.task("sec-1"), "waiting", json.dumps(stored))
                for path in ("/parked", "/ui/parked"):
                    r = await c.get(path, headers=AUTH if not path.startswith("/ui") else None)
                    assert r.status_code == 200 and "sec-1" in r.text, (path, r.status_code)
                    pages.append(r.text)
        finally:
            await svc.aclose()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(scenario())
    for text in (*pages, caplog.text):
        for secret in SECRETS:
            assert secret not in text


def test_a_record_that_keeps_failing_the_loop_is_skipped_as_internal_and_the_next_is_applied(
        make_settings: Any) -> None:
    s: Settings = make_settings()
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    apply = _Applier([RuntimeError("a bug")] * 3)
    metrics = Metrics()

    async def scenario() -> None:
        consumer = ApprovalsConsumer(s, apply, asyncio.get_running_loop(), metrics=metrics)
        consumer.start()
        try:
            produce(s.kafka.bootstrap_servers, s.kafka.approvals_topic,
                    [(t.encode(), json.dumps({"task_id": t, "approve": True}).encode()) for t in ("t-1", "t-2")],
                    partition=0)
            await wait_for(lambda: apply.applied, 60, what="the record behind the failing one applied")
            assert consumer.alive()
        finally:
            await asyncio.to_thread(consumer.stop)

    asyncio.run(scenario())
    assert apply.applied == [("t-2", "approved")]
    assert metrics.registry.get_sample_value("agent_approvals_skipped_total", {"reason": "internal"}) == 1


def test_a_task_parked_again_while_its_decision_resumes_it_stays_listed(
        make_settings: Any, model: FakeLLM, downstream: FakeDownstream) -> None:
    """A decision resumes the task, and the task may be claimed and parked again (listed with its new
    deadline) before the decision's own bookkeeping ends: that listing must stay, or the new wait is
    never swept and ends only when its keys expire."""
    from service.pipeline.parking import decide

    s = settings_for(make_settings, downstream)
    downstream.add_fault(DownstreamFault("drop_after", match="again-1/", times=1))
    downstream.add_fault(DownstreamFault("status_error", match="again-1", status=500))
    parked_again_ms = 4_102_444_800_000.0  # the new wait's deadline

    async def scenario() -> list[tuple[str, float]]:
        async with running(s, model.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"again-1", ticket("again-1"))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "parked"}) == 1, 60,
                           what="the task parked", service=svc)
            svc.runner.stop()  # nothing claims the resumed task here: the test parks it again itself

            async def send(topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
                await svc.publisher.send(topic, key, value, headers)
                if topic == s.kafka.input_topic:  # resumed, claimed elsewhere and parked again at once
                    await svc.ledger.effects.relist("again-1", parked_again_ms)

            await decide(svc.ledger, send, svc.metrics, utcnow(), "again-1", "landed", by="ops", reason="seen",
                         result={"id": "t-1"})
            return await svc.ledger.effects.parked()

    listed = asyncio.run(scenario())
    assert ("again-1", parked_again_ms) in listed
