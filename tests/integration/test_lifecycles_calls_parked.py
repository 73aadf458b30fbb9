"""Every move of a tool call's and a parked task's tables, made by the code that makes it (the tool
loop, the journal's scripts, decide, sweep, compensate) against a real Redis; the moves the tables
do not list are refused there, and a journal written before approvals and reconcile answers had a
field each is resumed as it was."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from consumers.records import Record
from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from dedup.lifecycles import IllegalTransition, Lifecycle
from dedup.lifecycles.parked import PARKED
from dedup.lifecycles.tool_call import TOOL_CALL, call_state
from service.agents.base import Agent, Step
from service.agents.helpers import system_message, user_message
from service.agents.registry import AgentRegistry
from service.agents.tools import FunctionTool, Reconciled, ToolCall, ToolError, ToolUnknown
from service.core.metrics import Metrics
from service.pipeline.base import Parked, ToDeadLetter, utcnow
from service.pipeline.parking import Busy, Decided, NotDecidable, compensate, decide, sweep
from service.pipeline.tools import ToolLoop, source_of

pytestmark = [pytest.mark.integration]

KIND = "walk"


class In(BaseModel):
    amount: float = 0


class Out(BaseModel):
    reply: str


class Downstream:
    """The tool's far side: what it did (by key), the faults of the next runs, whether it can tell."""

    def __init__(self) -> None:
        self.effects: dict[str, dict[str, Any]] = {}
        self.runs: list[str] = []
        self.faults: list[str] = []  # refuse | landed_unknown | absent_unknown, one per run
        self.blind = False
        self.undone: list[str] = []

    def run(self, call: ToolCall) -> Any:
        self.runs.append(call.key)
        fault = self.faults.pop(0) if self.faults else ""
        if fault == "refuse":
            raise ToolError("the downstream refuses it")
        if fault == "absent_unknown":
            raise ToolUnknown("the connection dropped before it was sent")
        self.effects[call.key] = {"id": call.key, "amount": call.arguments.get("amount")}
        if fault == "landed_unknown":
            raise ToolUnknown("the connection dropped after it was applied")
        return self.effects[call.key]

    def reconcile(self, call: ToolCall) -> Reconciled:
        if self.blind:
            return Reconciled.unknown("the status lookup fails")
        found = self.effects.get(call.key)
        return Reconciled.landed(found) if found is not None else Reconciled.absent()

    def undo(self, call: ToolCall, result: Any) -> Any:
        self.undone.append(call.key)
        return {"undone": call.key}


class Act(Step):
    name, prompt_version, output_model = "act", "walk-v1", Out
    max_tool_rounds, max_tool_calls = 2, 2

    def __init__(self, downstream: Downstream, approval_timeout_s: float = 3600.0) -> None:
        self.tools = (FunctionTool("pay", downstream.run, reconcile=downstream.reconcile, undo=downstream.undo,
                                   parameters={"type": "object", "properties": {"amount": {"type": "number"}},
                                               "required": ["amount"]}, timeout_s=1.0, settle_s=0.0),)
        self.approval_timeout_s = approval_timeout_s

    def messages(self, task_input: BaseModel, previous: Any) -> Any:
        return [system_message("Pay what is asked."), user_message("pay")]

    def approval(self, task_input: BaseModel, call: ToolCall) -> str | None:
        amount = call.arguments.get("amount", 0)
        return "a big amount" if isinstance(amount, int | float) and amount > 100 else None


class Model:
    """The step stage as the loop sees it: the real ledger; the model asks for ``arguments`` once,
    then answers."""

    def __init__(self, ledger: Ledger, arguments: str) -> None:
        self.ledger, self.metrics, self.clock, self.worker_id = ledger, Metrics(), utcnow, "w-walk"
        self.arguments = arguments

    async def call_step(self, task: Any, step: Any, task_input: Any, previous: Any, fence: int, attempts: int, *,
                        conversation: Any = None, offer_tools: bool = False,
                        answered: Any = None) -> tuple[Any, int]:
        if not any(m.get("role") == "tool" for m in conversation or ()):
            return [{"id": "call_1", "name": "pay", "arguments": self.arguments}], attempts + 1
        return {"reply": "paid"}, attempts + 1

    async def export_audit(self, task_key: str) -> None:
        return None


class Sent:
    """The producer of resumptions: what it produced, failing while ``failing``."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None]] = []
        self.failing = False

    async def __call__(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        if self.failing:
            raise OSError("the broker is away")
        self.records.append((topic, key))


class Walk:
    """One task of kind ``walk`` in the ledger: claims, runs its tool loop, parks, reads its states."""

    def __init__(self, ledger: Ledger, task_id: str, amount: float = 5, arguments: str | None = None,
                 approval_timeout_s: float = 3600.0) -> None:
        self.ledger, self.task_id = ledger, task_id
        self.downstream = Downstream()
        self.step = Act(self.downstream, approval_timeout_s)
        self.arguments = arguments if arguments is not None else f'{{"amount": {amount}}}'
        self.sent = Sent()
        self.agents = AgentRegistry([Agent(KIND, In, (self.step,))])

    async def claim(self) -> int:
        claim = await self.ledger.claim(self.task_id, "fp", "w-walk", KIND)
        assert claim.decision == "claimed", claim
        return claim.fence

    async def run(self, fence: int | None = None) -> Any:
        fence = fence if fence is not None else await self.claim()
        task = SimpleNamespace(key=self.task_id, deadline=None, kind=KIND, traceparent=None)
        record = Record("walk-in", 0, 7, self.task_id.encode(), b"{}")
        loop = ToolLoop(Model(self.ledger, self.arguments), task, self.step, In(), {}, fence, 0,  # type: ignore[arg-type]
                        record)
        return await loop.run()

    async def park(self) -> dict[str, Any]:
        """Run until the loop parks, and park the task as the processor does."""
        fence = await self.claim()
        with pytest.raises(Parked) as parked:
            await self.run(fence)
        assert await self.ledger.effects.park(self.task_id, fence, parked.value.waiting)
        return parked.value.waiting

    async def end(self) -> None:
        """Run to the end and release the task (failed: an ended state compensation may undo)."""
        fence = await self.claim()
        assert await self.run(fence) == {"reply": "paid"}
        assert await self.ledger.fail(self.task_id, fence, "released by the test")

    async def call(self) -> str:
        journal = await self.ledger.effects.journal(self.task_id)
        return call_state(journal.get("c:act:1"), journal.get("u:act:1"))

    async def state(self) -> str | None:
        record = await self.ledger.get(self.task_id)
        return record.state if record is not None else None

    async def decide(self, decision: str, **extra: Any) -> str:
        return (await self.decided(decision, **extra)).status

    async def decided(self, decision: str, **extra: Any) -> Decided:
        return await decide(self.ledger, self.sent, Metrics(), utcnow(), self.task_id, decision, by="ops", **extra)

    async def compensate(self, rerun: bool = False) -> Any:
        return await compensate(self.ledger, self.agents, self.sent, Metrics(), utcnow, self.task_id, by="ops",
                                rerun=rerun)


@pytest.fixture
def walked(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, set[tuple[str, str]]]]:
    """Every move the code asks a table for and is given: lifecycle name -> {(source, event)}."""
    seen: dict[str, set[tuple[str, str]]] = {}
    original = Lifecycle.transition

    def spy(self: Lifecycle, source: str, event: str) -> Any:
        found = original(self, source, event)
        seen.setdefault(self.name, set()).add((source, event))
        return found

    monkeypatch.setattr(Lifecycle, "transition", spy)
    yield seen


def _run(redis_url: str, scenario: Callable[[Ledger], Awaitable[None]]) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await scenario(Ledger(client, keys=Keys(f"walk-{uuid.uuid4().hex[:8]}")))
        finally:
            await close(client)

    asyncio.run(main())


def _all(machine: Lifecycle) -> set[tuple[str, str]]:
    return {(t.source, t.event) for t in machine.transitions}


# -- every move ------------------------------------------------------------------------------------


async def _tool_call_moves(ledger: Ledger) -> None:
    # asked -> intended -> executed -> undone
    w = Walk(ledger, "run-1")
    await w.end()
    assert await w.call() == "executed" and w.downstream.runs == ["run-1/act/1"]
    assert (await w.compensate()).undone == ["run-1/act/1"]
    assert await w.call() == "undone"
    # asked -> refused (arguments that fail the tool's schema): nothing runs
    w = Walk(ledger, "invalid-1", arguments='{"amount": "much"}')
    await w.end()
    assert await w.call() == "refused" and w.downstream.runs == []
    # intended -> refused (the tool refuses it)
    w = Walk(ledger, "refused-1")
    w.downstream.faults = ["refuse"]
    await w.end()
    assert await w.call() == "refused" and len(w.downstream.runs) == 1
    # intended -> unknown -> reconciled (it landed) -> undone
    w = Walk(ledger, "landed-1")
    w.downstream.faults = ["landed_unknown"]
    await w.end()
    assert await w.call() == "reconciled" and len(w.downstream.runs) == 1
    assert (await w.compensate()).undone == ["landed-1/act/1"]
    # intended -> unknown -> intended (it did not land) -> executed, with the same key
    w = Walk(ledger, "absent-1")
    w.downstream.faults = ["absent_unknown"]
    await w.end()
    assert await w.call() == "executed" and w.downstream.runs == ["absent-1/act/1"] * 2
    # intended (by a worker that died) -> unknown -> reconciled, by the next holder
    w = Walk(ledger, "died-1")
    old = await w.claim()
    await ledger.effects.first("died-1", old, "r:act:1", {"calls": [
        {"id": "call_1", "name": "pay", "arguments": w.arguments}], "fence": old, "at": "x"})
    await ledger.effects.first("died-1", old, "c:act:1", {"state": "intent", "key": "died-1/act/1", "tool": "pay",
                                                          "arguments": {"amount": 5}, "fence": old, "result": None})
    w.downstream.effects["died-1/act/1"] = {"id": "died-1/act/1"}
    assert await ledger.fail("died-1", old, "the worker died")
    await w.end()
    assert await w.call() == "reconciled" and w.downstream.runs == []


def test_every_move_of_a_tool_calls_table_is_made_by_the_code(
        redis_url: str, walked: dict[str, set[tuple[str, str]]]) -> None:
    _run(redis_url, _tool_call_moves)
    assert walked[TOOL_CALL.name] == _all(TOOL_CALL)


async def _parked_moves(ledger: Ledger) -> None:
    # approval: approved -> resumed -> runs; a second decision resumes it again
    w = Walk(ledger, "appr-1", amount=500)
    waiting = await w.park()
    assert waiting["what"] == "approval" and await w.state() == "waiting_approval" and w.downstream.runs == []
    assert await w.decide("approved") == "decided"
    assert await w.state() == "resuming" and len(w.sent.records) == 1
    assert await ledger.effects.listed_at("appr-1") is None
    assert await w.decide("rejected") == "resumed_again" and len(w.sent.records) == 2
    await w.end()
    assert await w.call() == "executed"
    # approval: rejected -> the resumed task ends as a dead letter, nothing ran
    w = Walk(ledger, "appr-2", amount=500)
    await w.park()
    assert await w.decide("rejected") == "decided"
    with pytest.raises(ToDeadLetter) as dead:
        await w.run()
    assert dead.value.reason == "rejected" and w.downstream.runs == []
    # approval: its deadline passes -> the sweeper expires it and produces it -> dead letter
    w = Walk(ledger, "appr-3", amount=500, approval_timeout_s=0.0)
    await w.park()
    assert await sweep(ledger, w.sent, Metrics(), utcnow() + timedelta(seconds=1)) == 1
    assert await w.state() == "resuming" and len(w.sent.records) == 1
    with pytest.raises(ToDeadLetter) as dead:
        await w.run()
    assert dead.value.reason == "expired"
    # reconcile: nobody can tell -> an operator says it landed -> reconciled with that result
    w = Walk(ledger, "blind-1")
    w.downstream.faults, w.downstream.blind = ["landed_unknown"], True
    waiting = await w.park()
    assert waiting["what"] == "reconcile"
    assert await w.decide("landed", result={"id": "by hand"}) == "decided"
    await w.end()
    assert (await ledger.effects.journal("blind-1"))["c:act:1"]["result"] == {"id": "by hand"}
    # reconcile: absent -> it runs again with the same key; the producer fails first: the sweeper
    # produces the decided task
    w = Walk(ledger, "blind-2")
    w.downstream.faults, w.downstream.blind = ["absent_unknown"], True
    await w.park()
    w.sent.failing = True
    with pytest.raises(OSError):
        await w.decide("absent")
    w.sent.failing = False
    assert await sweep(ledger, w.sent, Metrics(), utcnow() + timedelta(minutes=5)) == 1
    assert len(w.sent.records) == 1
    w.downstream.blind = False
    await w.end()
    assert await w.call() == "executed" and w.downstream.runs == ["blind-2/act/1"] * 2
    # reconcile: its deadline passes -> expired -> dead letter
    w = Walk(ledger, "blind-3", approval_timeout_s=0.0)
    w.downstream.faults, w.downstream.blind = ["landed_unknown"], True
    await w.park()
    assert await sweep(ledger, w.sent, Metrics(), utcnow() + timedelta(seconds=1)) == 1
    with pytest.raises(ToDeadLetter) as dead:
        await w.run()
    assert dead.value.reason == "expired"
    # an ended task compensated and set to run again: decided (listed), then produced
    w = Walk(ledger, "rerun-1")
    await w.end()
    report = await w.compensate(rerun=True)
    assert report.rerun and await w.state() == "resuming" and len(w.sent.records) == 1


async def _children_moves(ledger: Ledger) -> None:
    """A parent waiting for its children: parked by its holder, decided by the fold of its last
    child's reply, or expired by the sweeper; the resumption produced by whoever decided it."""
    sent = Sent()
    record = Record("walk-in", 0, 9, b"parent", b"{}")
    for parent, ends in (("kids-1", "replies"), ("kids-2", "deadline")):
        claim = await ledger.claim(parent, "fp", "w-walk", KIND)
        plan = [{"n": n, "id": f"{parent}/gather/{n}", "kind": "research", "topic": "walk-in"} for n in range(2)]
        await ledger.children.plan(parent, claim.fence, "gather", plan, source=source_of(record))
        now = int(utcnow().timestamp() * 1000)
        wait = {"what": "children", "step": "gather", "since_ms": now, "deadline_ms": now + 1000,
                "reason": "waiting for 2 children", "fence": claim.fence, "pending": [0, 1]}
        assert await ledger.children.park(parent, claim.fence, "gather", wait) == "parked"
        assert await Walk(ledger, parent).state() == "waiting_children"
        if ends == "replies":
            for n in (1, 0):
                status, source = await ledger.children.fold(parent, "gather", n, {"task_id": f"{parent}/gather/{n}",
                                                                                 "n": n, "state": "succeeded"})
            assert status == "folded" and json.loads(source)["offset"] == 9
            assert await ledger.effects.listed_at(parent) is not None  # decided: listed until produced
            # nobody produced it (the replies consumer failed): the sweeper does, once it is due
            assert await sweep(ledger, sent, Metrics(), utcnow() + timedelta(seconds=2)) == 1
        else:  # its deadline passed: decided expired (the script the sweeper's decide runs), then produced
            stored = await ledger.get(parent)
            assert stored is not None
            decided, _ = await ledger.effects.resolve(parent, stored.fields["waiting"], {
                "decision": "expired", "by": "deadline"}, {"task_id": parent, "outcome": "children:expired"})
            assert decided == "ok"
            assert await sweep(ledger, sent, Metrics(), utcnow() + timedelta(seconds=2)) == 1
            journal = await ledger.effects.journal(parent)
            assert journal["w:gather:0"]["decision"] == "expired"
        assert await Walk(ledger, parent).state() == "resuming" and await ledger.effects.listed_at(parent) is None
    assert [key for _topic, key in sent.records] == [b"parent", b"parent"]


async def _batch_moves(ledger: Ledger) -> None:
    """A call waiting for its batch: parked by its holder, decided by the batch lane's poller (done or
    failed) or expired by the sweeper; each resumes the task with its record."""
    sent = Sent()
    record = Record("walk-in", 0, 11, b"batched", b"{}")
    for task_id, ends in (("batch-1", "batch_done"), ("batch-2", "batch_failed"), ("batch-3", "expired")):
        claim = await ledger.claim(task_id, "fp", "w-walk", KIND)
        assert (await ledger.effects.first(task_id, claim.fence, "q:answer:0", {"custom_id": "c"},
                                           source_of(record)))[0] == "ok"
        now = int(utcnow().timestamp() * 1000)
        wait = {"what": "batch", "step": "answer", "ordinal": 0, "key": "c", "tool": "", "reason": "its batch",
                "since_ms": now, "deadline_ms": now + 1000}
        assert await ledger.effects.park(task_id, claim.fence, wait)
        assert await Walk(ledger, task_id).state() == "waiting_approval"
        if ends == "expired":
            assert await sweep(ledger, sent, Metrics(), utcnow() + timedelta(seconds=2)) == 1
        else:
            line = {"status": 200, "body": {}} if ends == "batch_done" else None
            assert (await decide(ledger, sent, Metrics(), utcnow(), task_id, ends, by="batch b-1",
                                 result=line)).status == "decided"
        journal = await ledger.effects.journal(task_id)
        assert journal["b:answer:0"]["decision"] == ends
        assert await Walk(ledger, task_id).state() == "resuming"
    assert [key for _topic, key in sent.records] == [b"batched"] * 3


def test_every_move_of_a_parked_tasks_table_is_made_by_the_code(
        redis_url: str, walked: dict[str, set[tuple[str, str]]]) -> None:
    _run(redis_url, _parked_moves)
    _run(redis_url, _children_moves)
    _run(redis_url, _batch_moves)
    assert walked[PARKED.name] == _all(PARKED)


# -- the moves the tables do not list ---------------------------------------------------------------


async def _refused_parked(ledger: Ledger) -> None:
    w = Walk(ledger, "appr-x", amount=500)
    await w.park()
    # a reconcile answer to an approval, through decide and through the journal's script itself
    with pytest.raises(NotDecidable, match="the decision is one of approved, rejected, expired"):
        await w.decide("landed")
    record = await ledger.get("appr-x")
    assert record is not None
    with pytest.raises(IllegalTransition):
        await ledger.effects.resolve("appr-x", record.fields["waiting"], {"decision": "landed"}, {})
    assert await w.state() == "waiting_approval"
    journal = await ledger.effects.journal("appr-x")
    assert not any(name[:2] in ("a:", "o:") for name in journal)
    # waiting: not to be compensated (the script refuses an undo too)
    with pytest.raises(Busy):
        await w.compensate()
    assert await ledger.effects.undo("appr-x", "u:act:1", {"state": "intent"}, None) == "busy"
    # a running task is not waiting: no decision is taken
    r = Walk(ledger, "run-x")
    fence = await r.claim()
    with pytest.raises(NotDecidable, match="not waiting"):
        await r.decide("approved")
    assert await ledger.effects.resolve("run-x", '{"what": "approval", "step": "act", "ordinal": 1}',
                                        {"decision": "approved"}, {}) == ("not_waiting", "running")
    # a wait the table does not know is not parked (nor listed)
    with pytest.raises(IllegalTransition):
        await ledger.effects.park("run-x", fence, {"what": "lunch", "deadline_ms": 1, "since_ms": 1})
    assert await r.state() == "running" and await ledger.effects.listed_at("run-x") is None
    # a running task is not run again as a new generation
    assert await ledger.effects.rerun("run-x", 1) == ("not_ended", "running")
    # a parent waiting for its children: no person's decision, no compensation, no second park
    kids = Walk(ledger, "kids-x")
    fence = await kids.claim()
    await ledger.children.plan("kids-x", fence, "gather", [{"n": 0, "id": "kids-x/gather/0", "kind": "k",
                                                            "topic": "t"}])
    wait = {"what": "children", "step": "gather", "since_ms": 1, "deadline_ms": 2, "reason": "r", "pending": [0]}
    assert await ledger.children.park("kids-x", fence, "gather", wait) == "parked"
    record = await ledger.get("kids-x")
    assert record is not None
    for decision in ("approved", "landed", "resume"):
        with pytest.raises(IllegalTransition):
            await ledger.effects.resolve("kids-x", record.fields["waiting"], {"decision": decision}, {})
    with pytest.raises(Busy):
        await kids.compensate()
    assert await ledger.children.park("kids-x", fence, "gather", wait) == "stale"
    assert (await ledger.claim("kids-x", "fp", "w-walk", KIND)).decision == "parked"
    assert await kids.state() == "waiting_children"
    # a running parent's children all replied: it is not moved (it goes on under its holder)
    assert await ledger.children.fold("run-x", "gather", 0, {"task_id": "run-x/gather/0"}) == ("unplanned", "")


def test_a_parked_task_refuses_the_moves_its_table_does_not_list(redis_url: str) -> None:
    _run(redis_url, _refused_parked)


async def _refused_calls(ledger: Ledger) -> None:
    w = Walk(ledger, "call-x")
    fence = await w.claim()
    record = {"state": "done", "key": "call-x/act/1", "tool": "pay", "outcome": "executed", "result": {}}
    # a result for a call never intended: nothing is written
    with pytest.raises(IllegalTransition):
        await ledger.effects.done("call-x", fence, "c:act:1", record, {"outcome": "executed"})
    assert "c:act:1" not in await ledger.effects.journal("call-x")
    # its audit entry says what happened, and that the journal did not take it
    assert (await ledger.effects.audit("call-x"))[-1]["accepted"] is False
    # a result over a result: the first stays
    assert await w.run(fence) == {"reply": "paid"}
    with pytest.raises(IllegalTransition):
        await ledger.effects.done("call-x", fence, "c:act:1", {**record, "outcome": "reconciled_landed"},
                                  {"outcome": "reconciled_landed"})
    assert await w.call() == "executed"
    assert (await ledger.effects.audit("call-x"))[-1]["accepted"] is False
    # the loop itself: a call only asked cannot land, an executed one cannot run again
    loop = ToolLoop(Model(ledger, w.arguments), SimpleNamespace(key="call-x", deadline=None, traceparent=None),  # type: ignore[arg-type]
                    w.step, In(), {}, fence, 0, None)
    with pytest.raises(IllegalTransition):
        loop._move("c:act:2", "land")
    loop.journal = await ledger.effects.journal("call-x")
    with pytest.raises(IllegalTransition):
        loop._move("c:act:1", "run")
    # a refused call has nothing to undo: compensation skips it (no undo is written)
    v = Walk(ledger, "refused-x")
    v.downstream.faults = ["refuse"]
    await v.end()
    assert (await v.compensate()).undone == [] and await v.call() == "refused"
    assert v.downstream.undone == []


def test_a_tool_call_refuses_the_moves_its_table_does_not_list(redis_url: str) -> None:
    _run(redis_url, _refused_calls)


# -- a journal written before approvals and reconcile answers had a field each ----------------------


async def _old_layout(ledger: Ledger) -> None:
    """The previous version stored an operator's reconcile answer at ``a:<step>:<ordinal>``, over
    the call's approval; a task it parked and decided resumes as it would have."""
    client, keys = ledger.client, ledger.keys

    async def decided_the_old_way(task_id: str, decision: dict[str, Any]) -> None:
        await client.hset(keys.tools(task_id), "a:act:1", json.dumps(decision))
        await client.hset(keys.task(task_id), "state", "resuming")
        await client.hdel(keys.task(task_id), "waiting")

    # approved, run, outcome unknown, parked for reconcile; the operator said "landed" (at a:)
    w = Walk(ledger, "old-landed", amount=500)
    await w.park()
    await decided_the_old_way("old-landed", {"decision": "approved", "by": "ada", "at": "1"})
    w.downstream.faults, w.downstream.blind = ["landed_unknown"], True
    assert (await w.park())["what"] == "reconcile"
    await decided_the_old_way("old-landed", {"decision": "landed", "by": "ops", "at": "2", "result": {"id": "x"}})
    again = await w.decided("approved")  # decided before: the old answer is the latest decision
    assert (again.status, again.decision) == ("resumed_again", "landed")
    await w.end()
    journal = await ledger.effects.journal("old-landed")
    assert journal["c:act:1"]["outcome"] == "reconciled_landed" and journal["c:act:1"]["result"] == {"id": "x"}
    assert len(w.downstream.runs) == 1  # asked nobody again: the operator's answer stood
    # the operator said "absent" (at a:): it runs again at once with its key, nobody asked
    w = Walk(ledger, "old-absent")
    w.downstream.faults, w.downstream.blind = ["absent_unknown"], True
    await w.park()
    await decided_the_old_way("old-absent", {"decision": "absent", "by": "ops", "at": "2"})
    await w.end()
    assert await w.call() == "executed" and w.downstream.runs == ["old-absent/act/1"] * 2
    # nobody answered in time (expired, at a:): a dead letter; a redrive drops the answer
    w = Walk(ledger, "old-expired")
    w.downstream.faults, w.downstream.blind = ["landed_unknown"], True
    await w.park()
    await decided_the_old_way("old-expired", {"decision": "expired", "by": "deadline", "at": "2"})
    fence = await w.claim()
    with pytest.raises(ToDeadLetter) as dead:
        await w.run(fence)
    assert dead.value.reason == "expired"
    assert await ledger.fail("old-expired", fence, "expired", dead_reason="expired")
    assert await ledger.revive("old-expired")
    assert "a:act:1" not in await ledger.effects.journal("old-expired")
    # an approval at a: (the old layout and the new one agree there)
    w = Walk(ledger, "old-approved", amount=500)
    await w.park()
    await decided_the_old_way("old-approved", {"decision": "approved", "by": "ada", "at": "1"})
    await w.end()
    assert await w.call() == "executed"


def test_a_journal_of_the_previous_version_resumes_as_it_did(redis_url: str) -> None:
    _run(redis_url, _old_layout)


async def _new_layout(ledger: Ledger) -> None:
    w = Walk(ledger, "new-1", amount=500)
    await w.park()
    await w.decide("approved")
    w.downstream.faults, w.downstream.blind = ["landed_unknown"], True
    await w.park()
    await w.decide("landed", result={"id": "y"})
    journal = await ledger.effects.journal("new-1")
    assert journal["a:act:1"]["decision"] == "approved" and journal["o:act:1"]["decision"] == "landed"
    await w.end()
    assert await w.call() == "reconciled"
    # expired answers are dropped on a redrive, from their own field
    v = Walk(ledger, "new-2")
    v.downstream.faults, v.downstream.blind = ["landed_unknown"], True
    await v.park()
    assert await sweep(ledger, v.sent, Metrics(), utcnow() + timedelta(days=2)) == 1
    fence = await v.claim()
    with pytest.raises(ToDeadLetter):
        await v.run(fence)
    assert await ledger.fail("new-2", fence, "expired", dead_reason="expired")
    assert await ledger.revive("new-2")
    assert "o:act:1" not in await ledger.effects.journal("new-2")


def test_an_approval_and_a_reconcile_answer_are_kept_in_a_field_each(redis_url: str) -> None:
    _run(redis_url, _new_layout)
