"""The replies consumer, the sweeper of waiting parents and the operator's view of a delegation tree,
on a real broker and a real redis-server.

A parent is set up in the ledger as a delegating step leaves it (claimed, its plan journaled, parked
``waiting_children``); its record, produced again on resumption, goes to the input topic, which no
worker reads here, so each resumption can be counted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from consumers.producers import Publisher
from dedup.client import close
from dedup.ledger import Ledger, LedgerUnavailable
from service.agents.registry import AgentRegistry
from service.api.app import create_app
from service.cli.admin import task_show
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.pipeline.base import utcnow
from service.pipeline.parking import sweep
from service.runtime.replies import Folded, Reply, ReplyConsumer, ReplyFolding
from service.runtime.wiring import ensure_topics, ledger_of, redis_client
from tests.support import committed, read_topic, wait_for

pytestmark = [pytest.mark.integration]

AUTH = {"Authorization": "Bearer s3cret"}
STEP = "gather"


@dataclass
class Rig:
    settings: Settings
    ledger: Ledger
    publisher: Publisher
    metrics: Metrics

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return float(self.metrics.registry.get_sample_value(name, labels or {}) or 0.0)

    def replies(self, records: Sequence[tuple[bytes | None, bytes | None]]) -> None:
        from tests.support import produce

        produce(self.settings.kafka.bootstrap_servers, self.settings.kafka.replies_topic, records, partition=0)

    def committed(self) -> int:
        k = self.settings.kafka
        return committed(k.bootstrap_servers, f"{k.group_id}.replies", k.replies_topic, 1)[0]

    def resumed(self, timeout_s: float = 20.0) -> list[Any]:
        """The parents' records produced again (the input topic), read from the start."""
        k = self.settings.kafka
        return read_topic(k.bootstrap_servers, k.input_topic, timeout_s=timeout_s)


@contextlib.asynccontextmanager
async def rig(make_settings: Any) -> AsyncIterator[Rig]:
    s: Settings = make_settings(kafka={"replies_topic": f"r-{uuid.uuid4().hex[:10]}.replies"})
    await asyncio.to_thread(ensure_topics, s)
    client = redis_client(s)
    publisher = Publisher(s.kafka.producer_config())
    try:
        yield Rig(s, ledger_of(s, client), publisher, Metrics())
    finally:
        publisher.close()
        await close(client)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def waiting_parent(r: Rig, parent: str, children: int = 3, deadline_ms: float | None = None) -> list[str]:
    """Claim ``parent``, journal a plan of ``children`` and park it waiting for them; their ids."""
    ledger = r.ledger
    claim = await ledger.claim(parent, f"fp-{parent}", "w-test", "orchestrate")
    assert claim.decision == "claimed"
    ids = [f"{parent}/{STEP}/{n}" for n in range(children)]
    topic = r.settings.kafka.input_topic
    source = {"topic": topic, "partition": 0, "offset": 0, "key": b64(parent.encode()),
              "value": b64(json.dumps({"task_id": parent, "kind": "orchestrate", "input": {}}).encode()),
              "headers": [["tenant", b64(b"acme")]]}
    await ledger.children.plan(parent, claim.fence, STEP, [{"n": n, "id": cid, "kind": "research", "topic": topic}
                                                            for n, cid in enumerate(ids)], source=source)
    now_ms = time.time() * 1000
    status = await ledger.children.park(parent, claim.fence, STEP, {
        "what": "children", "step": STEP, "ordinal": 0, "key": f"{parent}/{STEP}", "tool": "",
        "reason": f"{children} children of step {STEP}", "since_ms": now_ms,
        "deadline_ms": deadline_ms if deadline_ms is not None else now_ms + 3_600_000})
    assert status == "parked"
    return ids


def reply(parent: str, n: int, state: str = "succeeded", **over: Any) -> tuple[bytes, bytes]:
    value: dict[str, Any] = {"parent": parent, "step": STEP, "n": n, "task_id": f"{parent}/{STEP}/{n}",
                             "kind": "research", "state": state}
    value.update({"result": {"answer": f"child {n}"}} if state == "succeeded" else
                 {"reason": "expired", "error": "its deadline passed"})
    value.update(over)
    return parent.encode(), json.dumps(value).encode()


async def state_of(ledger: Ledger, task_id: str) -> str | None:
    record = await ledger.get(task_id)
    return record.state if record is not None else None


@contextlib.asynccontextmanager
async def consuming(r: Rig, folding: ReplyFolding | None = None, **kwargs: Any) -> AsyncIterator[ReplyConsumer]:
    folding = folding or ReplyFolding(r.ledger, r.ledger.children, r.publisher.send)
    consumer = ReplyConsumer(r.settings, folding, asyncio.get_running_loop(), r.metrics, **kwargs)
    consumer.start()
    try:
        yield consumer
    finally:
        await asyncio.to_thread(consumer.stop)


# -- folding -------------------------------------------------------------------------------------


def test_each_reply_is_folded_once_and_the_parent_resumes_exactly_when_its_last_child_replied(
        make_settings: Any) -> None:
    async def scenario() -> None:
        async with rig(make_settings) as r, consuming(r) as consumer:
            await waiting_parent(r, "p-1")
            first = [reply("p-1", 2), reply("p-1", 2, result={"answer": "a second run"}),
                     reply("p-1", 0), reply("p-1", 0)]
            r.replies(first)
            await wait_for(lambda: r.committed() == len(first), 60, what="the first replies committed")
            assert await state_of(r.ledger, "p-1") == "waiting_children"
            assert r.resumed(timeout_s=3) == []  # produced before the commit, had it been
            r.replies([reply("p-1", 1, "dead"), reply("p-1", 1), reply("p-1", 2)])
            await wait_for(lambda: r.committed() == len(first) + 3, 60, what="every reply committed")
            assert consumer.alive()
            assert await state_of(r.ledger, "p-1") == "resuming"
            assert await r.ledger.effects.listed_at("p-1") is None  # produced: no longer the sweeper's
            outcomes = await r.ledger.children.outcomes("p-1", STEP)
            assert [(n, o["state"]) for n, o in outcomes.items()] == [(0, "succeeded"), (1, "dead"), (2, "succeeded")]
            assert outcomes[2]["result"] == {"answer": "child 2"}  # the first reply of a child stands
            assert outcomes[1]["reason"] == "expired"
            resumed = r.resumed()
            assert len(resumed) == 1, resumed
            assert resumed[0].key == b"p-1" and resumed[0].headers["agent.resumed"] == b"children"
            assert resumed[0].headers["tenant"] == b"acme"
            assert {s: r.value("agent_replies_total", {"state": s}) for s in ("succeeded", "dead", "duplicate")} == {
                "succeeded": 2, "dead": 1, "duplicate": 4}

    asyncio.run(scenario())


HOSTILE: list[tuple[str, bytes | None]] = [
    ("tombstone", None),
    ("json", b"not json at all"),
    ("json", b"[" * 50_000),  # nested too deep to parse
    ("json", b'{"parent": "p-2", "step": "gather", "n": 0, "task_id": "p-2/gather/0", "kind": "research", '
             b'"state": "succeeded", "result": ' + b"9" * 5000 + b"}"),  # an integer too long to read
    ("json", b'{"parent": "p-2", "step": "gather", "n": 0, "task_id": "p-2/gather/0", "kind": "research", '
             b'"state": "succeeded", "result": NaN}'),
    ("encoding", b"\xff\xfe\x00 not UTF-8"),
    ("encoding", b'{"parent": "p-2", "step": "gather", "n": 0, "task_id": "p-2/gather/0", "kind": "\\ud800", '
                 b'"state": "succeeded"}'),  # a lone surrogate
    ("encoding", b'{"parent": "p-2", "step": "gather", "n": 0, "task_id": "p-2/gather/0", "kind": "research", '
                 b'"state": "succeeded", "result": {"text": "\\udfff"}}'),
    ("schema", b"[1, 2, 3]"),
    ("schema", json.dumps({"parent": "p-2", "step": STEP, "n": 10**30, "task_id": "p-2/gather/0", "kind": "r",
                           "state": "succeeded"}).encode()),
    ("schema", json.dumps({"parent": "p-2", "step": STEP, "n": True, "task_id": "p-2/gather/1", "kind": "r",
                           "state": "succeeded"}).encode()),
    ("schema", reply("p-2", 0, state="maybe")[1]),
    ("schema", reply("p-2", 0, kind="k" * 5000)[1]),
    ("schema", reply("p-2", 0, kind=None)[1]),
    ("task_key", reply("p 2", 0, task_id="p 2/gather/0")[1]),
    ("mismatch", reply("p-2", 0, task_id="someone-else/gather/0")[1]),
    ("mismatch", reply("p-2", 0, task_id="p-2/gather/1")[1]),
    ("unknown_parent", reply("nobody", 0)[1]),
    ("unplanned", reply("p-2", 7)[1]),  # no child 7 in the plan
    ("unplanned", reply("p-2", 0, task_id="p-2/g1/gather/0")[1]),  # the child of another generation
    ("oversize", reply("p-2", 0, result={"text": "x" * 100_000})[1]),
]


def test_hostile_replies_are_skipped_and_counted_and_the_good_ones_behind_them_folded(make_settings: Any) -> None:
    async def scenario() -> None:
        async with rig(make_settings) as r, consuming(r, max_bytes=64 * 1024) as consumer:
            await waiting_parent(r, "p-2", children=2)
            records: list[tuple[bytes | None, bytes | None]] = []
            for i, (_, value) in enumerate(HOSTILE):
                records.append((b"p-2", value))
                if i == len(HOSTILE) // 2:
                    records.append(reply("p-2", 0))  # a good one in the middle
            records.append(reply("p-2", 1, "dead"))
            r.replies(records)
            await wait_for(lambda: r.committed() == len(records), 90, what="every record committed")
            assert consumer.alive()
            expected: dict[str, int] = {}
            for reason, _ in HOSTILE:
                expected[reason] = expected.get(reason, 0) + 1
            skipped = {reason: r.value("agent_replies_skipped_total", {"reason": reason}) for reason in expected}
            assert skipped == expected
            assert await state_of(r.ledger, "p-2") == "resuming"
            outcomes = await r.ledger.children.outcomes("p-2", STEP)
            assert [(n, o["state"]) for n, o in outcomes.items()] == [(0, "succeeded"), (1, "dead")]
            assert len(r.resumed()) == 1

    asyncio.run(scenario())


class Folding(ReplyFolding):
    """The real folding, recording what the ledger answered; told to, it hangs after the fold (the
    process dies there: the fold is in Redis, the offset not committed, the parent not produced) or
    raises an outage before it."""

    def __init__(self, r: Rig, *, hang_after_fold: bool = False, outages: int = 0) -> None:
        super().__init__(r.ledger, r.ledger.children, r.publisher.send)
        self.statuses: list[str] = []
        self.hang_after_fold, self.outages, self.calls = hang_after_fold, outages, 0

    async def fold(self, reply: Reply) -> Folded:
        self.calls += 1
        if self.outages > 0:
            self.outages -= 1
            raise LedgerUnavailable("redis away")
        folded = await super().fold(reply)
        self.statuses.append(folded.status)
        if self.hang_after_fold:
            await asyncio.Event().wait()
        return folded


def test_a_consumer_killed_between_the_fold_and_the_commit_resumes_the_parent_without_a_second_fold(
        make_settings: Any) -> None:
    async def scenario() -> None:
        async with rig(make_settings) as r:
            await waiting_parent(r, "p-3", children=1)
            dying = Folding(r, hang_after_fold=True)
            async with consuming(r, dying):
                r.replies([reply("p-3", 0)])
                await wait_for(lambda: dying.statuses == ["folded"], 60, what="the reply folded")
            assert r.committed() < 1  # stopped before the commit
            assert await state_of(r.ledger, "p-3") == "resuming"  # its last child folded: decided
            assert r.resumed(timeout_s=3) == []  # and its record never produced
            again = Folding(r)
            async with consuming(r, again):
                await wait_for(lambda: r.committed() == 1, 60, what="the reply read again and committed")
            assert again.statuses == ["again"]
            assert r.value("agent_replies_total", {"state": "duplicate"}) == 1
            resumed = r.resumed()
            assert [m.key for m in resumed] == [b"p-3"]
            assert await r.ledger.effects.listed_at("p-3") is None

    asyncio.run(scenario())


def test_redis_not_answering_is_retried_and_the_reply_never_skipped(make_settings: Any) -> None:
    async def scenario() -> None:
        async with rig(make_settings) as r:
            await waiting_parent(r, "p-4", children=1)
            folding = Folding(r, outages=3)
            async with consuming(r, folding):
                r.replies([reply("p-4", 0)])
                await wait_for(lambda: r.committed() == 1, 90, what="the reply folded after the outage")
            assert folding.calls == 4 and folding.statuses == ["folded"]
            assert sum(r.value("agent_replies_skipped_total", {"reason": reason})
                       for reason in ("internal", "refused", "unplanned")) == 0
            assert await state_of(r.ledger, "p-4") == "resuming"
            assert len(r.resumed()) == 1

    asyncio.run(scenario())


# -- the sweeper ---------------------------------------------------------------------------------


def test_the_sweeper_expires_a_parent_whose_children_did_not_all_reply_by_its_deadline(make_settings: Any) -> None:
    async def scenario() -> None:
        async with rig(make_settings) as r:
            await waiting_parent(r, "p-5", children=2, deadline_ms=time.time() * 1000 + 1500)
            await waiting_parent(r, "p-6", children=1)  # waits an hour
            await r.ledger.children.fold("p-5", STEP, 0, json.loads(reply("p-5", 0)[1]))
            send: Callable[..., Awaitable[None]] = r.publisher.send
            assert await sweep(r.ledger, send, r.metrics, utcnow()) == 0  # not due yet
            assert r.value("agent_waiting_parents") == 2

            async def expired() -> bool:
                await sweep(r.ledger, send, r.metrics, utcnow())
                return await state_of(r.ledger, "p-5") == "resuming"

            await wait_for(expired, 30, interval_s=0.3, what="the parent expired")
            journal = await r.ledger.effects.journal("p-5")
            assert journal[f"w:{STEP}:0"]["decision"] == "expired" and journal[f"w:{STEP}:0"]["by"] == "deadline"
            assert r.value("agent_wait_decisions_total", {"decision": "expired"}) == 1
            resumed = r.resumed()
            assert [(m.key, m.headers["agent.resumed"]) for m in resumed] == [(b"p-5", b"expired")]
            assert await r.ledger.effects.listed_at("p-5") is None
            assert r.value("agent_waiting_parents") == 1  # p-6 waits on
            assert await state_of(r.ledger, "p-6") == "waiting_children"
            # a late reply is folded (the parent's resumed run reads it), and resumes nothing more
            status, source = await r.ledger.children.fold("p-5", STEP, 1, json.loads(reply("p-5", 1)[1]))
            assert (status, source) == ("folded", "")

    asyncio.run(scenario())


# -- the operator's view -------------------------------------------------------------------------


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def test_the_api_the_console_and_task_show_show_the_tree(make_settings: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    used: list[Settings] = []

    async def scenario() -> None:
        async with rig(make_settings) as r:
            used.append(r.settings)
            ids = await waiting_parent(r, "p-7", children=3)
            await r.ledger.children.fold("p-7", STEP, 0, json.loads(reply("p-7", 0)[1]))
            await r.ledger.children.fold("p-7", STEP, 2, json.loads(reply("p-7", 2, "dead")[1]))
            claim = await r.ledger.claim(ids[1], "fp-child", "w-test", "research")  # child 1 runs
            assert claim.decision == "claimed"
            service = SimpleNamespace(settings=r.settings, ledger=r.ledger, publisher=r.publisher,
                                      metrics=r.metrics, agents=AgentRegistry())
            app = create_app(service)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
                view = (await http.get("/tasks/p-7", headers=AUTH)).json()
                assert view["state"] == "waiting_children" and view["parent"] is None
                assert [(c["n"], c["id"], c["kind"], c["state"]) for c in view["children"]] == [
                    (0, ids[0], "research", "succeeded"), (1, ids[1], "research", "running"),
                    (2, ids[2], "research", "dead")]
                assert view["children"][0]["result"] == {"answer": "child 0"}
                assert view["children"][2]["reason"] == "expired"
                parked = (await http.get("/parked", headers=AUTH)).json()
                assert [(p["task_id"], p["waiting"]["what"], p["waiting"]["step"]) for p in parked] == [
                    ("p-7", "children", STEP)]
                child = (await http.get(f"/tasks/{ids[1]}", headers=AUTH)).json()
                assert child["parent"] == {"id": "p-7", "step": STEP} and child["children"] == []
                page = await http.get("/ui/login")
                assert (await http.post("/ui/login", data={"csrf": csrf_of(page.text), "token": "s3cret"})
                        ).status_code == 303
                html = (await http.get("/ui/tasks/p-7")).text
                assert 'id="children"' in html and "its children of step gather" in html
                for child in ids:
                    assert f'href="/ui/tasks/{child}"' in html
                assert html.count('class="child"') == 3
                html = (await http.get("/ui/parked")).text
                assert 'href="/ui/tasks/p-7"' in html and "resumes when its children have replied" in html
                assert 'name="decision"' not in html  # no person decides a wait for children
                html = (await http.get(f"/ui/tasks/{ids[1]}")).text
                assert 'id="parent"' in html and 'href="/ui/tasks/p-7"' in html

    asyncio.run(scenario())
    capsys.readouterr()
    assert task_show(used[0], argparse.Namespace(task_id="p-7")) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(c["n"], c["state"]) for c in shown["children"]] == [(0, "succeeded"), (1, "running"), (2, "dead")]
    assert shown["parent"] is None
