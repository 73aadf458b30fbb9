"""``POST /tasks`` and ``GET /tasks/{id}`` with ``?wait=`` and the submit-only token, without a broker:
a ledger whose task ends after a few reads, a publisher that keeps what it was sent. The SDK client's
outcome parsing of both sources (a results event, an API record)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from dedup.records import TaskRecord
from service.agents.registry import default_agents
from service.api.app import create_app
from service.core.settings import Settings
from service.sdk.client import Outcome, task_event

ADMIN, READ, SUBMIT = "adm1n", "r3ad", "subm1t"
TASK = {"task_id": "w-1", "kind": "classify", "input": {"text": "t", "labels": ["a", "b"]}}


class Effects:
    async def journal(self, task_id: str) -> dict[str, Any]:
        return {}

    async def audit(self, task_id: str) -> list[Any]:
        return []


class EndingLedger:
    """Knows no task for ``unknown`` reads, then has it running, and ended (``state``) from the
    ``ends_at``-th read on (never, with None)."""

    def __init__(self, state: str = "succeeded", ends_at: int | None = 4, unknown: int = 1) -> None:
        self.state, self.ends_at, self.unknown = state, ends_at, unknown
        self.reads = 0
        self.effects = Effects()

    async def get(self, task_id: str) -> TaskRecord | None:
        self.reads += 1
        if self.reads <= self.unknown:
            return None
        ended = self.ends_at is not None and self.reads >= self.ends_at
        fields = {"state": self.state if ended else "running", "fence": "1", "attempts": "1", "kind": "classify",
                  "fingerprint": "f"}
        if ended and self.state == "succeeded":
            fields["result"] = json.dumps({"label": "a"})
        if ended and self.state == "dead":
            fields.update(dead_reason="permanent", error="refused")
        return TaskRecord.read(task_id, fields, {})


def client(ledger: EndingLedger, sent: list[Any], **settings: Any) -> httpx.AsyncClient:
    s = Settings(**{"admin_token": ADMIN, "read_token": READ, "submit_token": SUBMIT, "reads_open": False,
                    **settings})

    async def send(*record: Any) -> None:
        sent.append(record)

    service = SimpleNamespace(settings=s, ledger=ledger, agents=default_agents(), publisher=SimpleNamespace(send=send),
                              metrics=None)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)),  # type: ignore[arg-type]
                             base_url="http://t", timeout=30)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_post_with_wait_answers_200_with_the_ended_record_once_the_task_ended() -> None:
    async def scenario() -> None:
        sent: list[Any] = []
        ledger = EndingLedger("succeeded", ends_at=4)
        async with client(ledger, sent) as c:
            r = await c.post("/tasks", params={"wait": 10}, json=TASK, headers=bearer(ADMIN))
        assert r.status_code == 200, r.text
        assert (r.json()["outcome"], r.json()["result"]) == ("succeeded", {"label": "a"})
        assert ledger.reads >= 4 and [record[1] for record in sent] == [b"w-1"]

    asyncio.run(scenario())


def test_a_wait_that_runs_out_answers_202_and_a_dead_task_is_failed() -> None:
    async def scenario() -> None:
        async with client(EndingLedger(ends_at=None), []) as c:
            r = await c.post("/tasks", params={"wait": 0.3}, json=TASK, headers=bearer(ADMIN))
            assert r.status_code == 202 and r.json() == {"task_id": "w-1", "topic": "agent.tasks"}
        async with client(EndingLedger(ends_at=None, unknown=0), []) as c:
            r = await c.get("/tasks/w-1", params={"wait": 0.3}, headers=bearer(READ))
            assert r.status_code == 202 and r.json()["state"] == "running" and r.json()["outcome"] is None
        async with client(EndingLedger("dead", ends_at=3), []) as c:
            r = await c.get("/tasks/w-1", params={"wait": 10}, headers=bearer(READ))
            assert r.status_code == 200 and (r.json()["outcome"], r.json()["dead_reason"]) == ("failed", "permanent")
        async with client(EndingLedger(unknown=100), []) as c:
            r = await c.get("/tasks/w-1", params={"wait": 0.3}, headers=bearer(READ))
            assert r.status_code == 404
            r = await c.get("/tasks/w-1", params={"wait": 1000}, headers=bearer(READ))
            assert r.status_code == 422  # at most MAX_WAIT_S

    asyncio.run(scenario())


def test_the_submit_token_produces_and_nothing_else() -> None:
    async def scenario() -> None:
        sent: list[Any] = []
        async with client(EndingLedger(), sent) as c:
            r = await c.post("/tasks", json=TASK, headers=bearer(SUBMIT))
            assert r.status_code == 202 and r.json()["task_id"] == "w-1"
            assert (await c.post("/tasks", params={"wait": 5}, json=TASK, headers=bearer(SUBMIT))).status_code == 403
            assert (await c.get("/tasks/w-1", headers=bearer(SUBMIT))).status_code == 401
            assert (await c.get("/dlq", headers=bearer(SUBMIT))).status_code == 401
            r = await c.post("/dlq/replay", json={"reason": "permanent"}, headers=bearer(SUBMIT))
            assert r.status_code == 401
            assert (await c.post("/tasks", json=TASK, headers=bearer(READ))).status_code == 401
            assert (await c.post("/tasks", json=TASK)).status_code == 401
            r = await c.post("/tasks", params={"wait": 5}, json=TASK, headers=bearer(READ))
            assert r.status_code == 401  # the read token may wait, but not produce
        assert len(sent) == 1
        async with client(EndingLedger(), [], admin_token=None, submit_token=None) as c:
            assert (await c.post("/tasks", json=TASK, headers=bearer(SUBMIT))).status_code == 403
        async with client(EndingLedger(), [], admin_token=None) as c:  # the submit token alone suffices
            assert (await c.post("/tasks", json=TASK, headers=bearer(SUBMIT))).status_code == 202

    asyncio.run(scenario())


def test_an_outcome_reads_a_results_event_or_an_api_record() -> None:
    failed = Outcome.from_event({"task_id": "t", "kind": "classify", "outcome": "failed", "reason": "permanent",
                                 "error": "e", "attempts": 1,
                                 "dead_letter": {"topic": "dlq", "partition": 2, "offset": 9, "id": "x"}})
    assert not failed.succeeded and failed.dead_letter == {"topic": "dlq", "partition": 2, "offset": 9, "id": "x"}
    older = Outcome.from_event({"task_id": "t", "kind": "classify", "status": "succeeded", "result": {"a": 1}})
    assert older.succeeded and older.result == {"a": 1}  # an event from before `outcome` existed
    record = Outcome.from_record({"task_id": "t", "state": "dead", "outcome": "failed", "dead_reason": "exhausted",
                                  "error": "e", "attempts": 3})
    assert (record.outcome, record.reason, record.attempts, record.dead_letter) == ("failed", "exhausted", 3, None)
    with pytest.raises(ValueError):
        Outcome.from_event({"task_id": "t", "outcome": "running"})
    assert task_event("classify", {"x": 1}, "t", deadline=None, priority=3, tenant=None) == {
        "task_id": "t", "kind": "classify", "input": {"x": 1}, "priority": 3}
