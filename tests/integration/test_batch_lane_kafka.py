"""The batch lane on the broker, Redis and the fake model's Batch API: a batch kind's tasks are
parked (offsets committed), answered by one batch submitted once, and each published once through
the normal completion path without a chat call; a failed, expired or cancelled batch, a line
invalid for the schema, and a wait past the task's share of its deadline send the call online; a
worker that dies between the provider's answer and the journal does not submit the batch twice; the
console shows the tasks waiting for a batch, and the batches waiting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from dedup.batches import Batches
from service.api.app import create_app
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.pipeline.base import iso, utcnow
from service.runtime.parked import sweep_forever
from service.runtime.wiring import Service
from tests.support import committed, metric, produce, read_topic, running, succeeded, task_value, wait_for
from tests.support.batch_kinds import KIND, LABELS, registry

pytestmark = [pytest.mark.integration]


def batch_settings(make_settings: Any, **batch: Any) -> Settings:
    s: Settings = make_settings(tools={"sweep_interval_s": 0.2},
                                batch={"max_age_s": 0.3, "lease_s": 5, **batch}, kafka={"topic_partitions": 2})
    return s


@contextlib.asynccontextmanager
async def lane(s: Settings, fake: FakeLLM) -> AsyncIterator[Service]:
    """The service with its sweeper (whose turn is the batch lane's poller)."""
    async with running(s, fake.base_url, agents=registry()) as svc:
        sweeper = asyncio.create_task(sweep_forever(svc.ledger, svc.publisher.send, svc.metrics, s))
        try:
            yield svc
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)


def tasks(s: Settings, ids: list[str], **extra: Any) -> None:
    produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
            [(t.encode(), task_value(KIND, {"text": f"text of {t}", "labels": LABELS}, t, **extra)) for t in ids])


def one_result_each(s: Settings, ids: list[str]) -> list[dict[str, Any]]:
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids), timeout_s=90))
    by_id = Counter(m.key.decode() for m in results if m.key is not None)
    assert by_id == Counter({t: 1 for t in ids}), f"not one result each: {by_id}"
    bodies = [json.loads(m.value or b"{}") for m in results]
    assert all(b["result"]["label"] in LABELS for b in bodies)
    return bodies


async def all_ended(svc: Service, ids: list[str]) -> bool:
    records = [await svc.ledger.get(t) for t in ids]
    return all(r is not None and r.state == "succeeded" for r in records)


def test_a_batch_kinds_tasks_complete_through_one_batch_with_one_result_each(make_settings: Any,
                                                                           fake_llm: FakeLLM) -> None:
    s = batch_settings(make_settings)
    ids = [f"b-{i}" for i in range(6)]

    async def main() -> None:
        async with lane(s, fake_llm) as svc:
            tasks(s, ids)
            await wait_for(lambda: metric(svc, "agent_batch_tasks_total", {"state": "queued"}) == len(ids),
                           60, what="every call queued", service=svc)
            await wait_for(lambda: all_ended(svc, ids), 90, what="every task succeeded", service=svc)
            assert metric(svc, "agent_batch_tasks_total", {"state": "done"}) == len(ids)
            assert metric(svc, "agent_batch_tasks_total", {"state": "online"}) == 0
            await wait_for(lambda: metric(svc, "agent_batches_total", {"status": "completed"}) >= 1, 30,
                           what="the batch ended", service=svc)
            assert metric(svc, "agent_tasks_total", {"outcome": "parked"}) == len(ids)

    asyncio.run(main())
    one_result_each(s, ids)
    stats = fake_llm.batches.stats()
    assert stats["created_by_name"] and all(n == 1 for n in stats["created_by_name"].values()), stats
    assert sum(stats["answered_by_id"].values()) == len(ids), "each call answered once by its batch"
    assert fake_llm.stats()["requests"] == 0, "a batch kind's call went online"
    offsets = committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic, 2)
    assert sum(o for o in offsets.values() if o > 0) >= len(ids), "the parked tasks' offsets were committed"


@pytest.mark.parametrize("mode", ["fail", "expire", "cancel"])
def test_a_batch_that_ends_without_answers_sends_its_calls_online(make_settings: Any, fake_llm: FakeLLM,
                                                                  mode: str) -> None:
    s = batch_settings(make_settings)
    fake_llm.batches.set_faults(mode=mode)
    ids = [f"f-{i}" for i in range(4)]

    async def main() -> None:
        async with lane(s, fake_llm) as svc:
            tasks(s, ids)
            await wait_for(lambda: all_ended(svc, ids), 90, what="every task succeeded online", service=svc)
            assert metric(svc, "agent_batch_tasks_total", {"state": "online"}) == len(ids)
            assert metric(svc, "agent_batch_tasks_total", {"state": "done"}) == 0

    asyncio.run(main())
    one_result_each(s, ids)
    assert fake_llm.stats()["requests"] == len(ids), "each call went online once"


def test_a_line_invalid_for_the_schema_goes_online_and_the_valid_ones_do_not(make_settings: Any,
                                                                           fake_llm: FakeLLM) -> None:
    s = batch_settings(make_settings, max_size=4, max_age_s=30)
    fake_llm.batches.set_faults(invalid=1)
    ids = [f"i-{i}" for i in range(4)]

    async def main() -> None:
        async with lane(s, fake_llm) as svc:
            tasks(s, ids)
            await wait_for(lambda: all_ended(svc, ids), 90, what="every task succeeded", service=svc)
            assert metric(svc, "agent_batch_tasks_total", {"state": "invalid"}) == 1
            assert metric(svc, "agent_batch_tasks_total", {"state": "done"}) == 3

    asyncio.run(main())
    one_result_each(s, ids)
    assert fake_llm.stats()["requests"] == 1, "only the invalid line's call went online"


def test_a_call_whose_batch_is_slower_than_its_share_of_the_deadline_goes_online(make_settings: Any,
                                                                               fake_llm: FakeLLM) -> None:
    s = batch_settings(make_settings, deadline_share=0.1)
    fake_llm.batches.set_faults(delay_s=600)
    ids = ["d-0", "d-1"]

    async def main() -> None:
        async with lane(s, fake_llm) as svc:
            tasks(s, ids, deadline=iso(utcnow() + timedelta(seconds=40)))  # parked for about 4 s
            await wait_for(lambda: all_ended(svc, ids), 90, what="every task succeeded online", service=svc)
            assert metric(svc, "agent_batch_tasks_total", {"state": "online"}) == len(ids)

    asyncio.run(main())
    one_result_each(s, ids)
    assert fake_llm.stats()["requests"] == len(ids)


def test_a_worker_dead_between_the_providers_answer_and_the_journal_does_not_submit_twice(
        make_settings: Any, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    s = batch_settings(make_settings)
    journal = Batches.submitted
    lost: list[str] = []

    async def dies_once(self: Batches, group: str, n: int, batch_id: str, file_id: str) -> str:
        if not lost:  # the provider made the batch; the worker dies before the journal has its id
            lost.append(batch_id)
            raise ConnectionError("the worker died here")
        return await journal(self, group, n, batch_id, file_id)

    monkeypatch.setattr(Batches, "submitted", dies_once)
    ids = [f"k-{i}" for i in range(3)]

    async def main() -> None:
        async with lane(s, fake_llm) as svc:
            tasks(s, ids)
            await wait_for(lambda: all_ended(svc, ids), 90, what="every task succeeded", service=svc)

    asyncio.run(main())
    one_result_each(s, ids)
    stats = fake_llm.batches.stats()
    assert lost and stats["batches"] == 1 and list(stats["created_by_name"].values()) == [1], stats
    assert fake_llm.stats()["requests"] == 0


def test_the_console_shows_the_tasks_waiting_for_a_batch_and_the_batch(make_settings: Any,
                                                                      fake_llm: FakeLLM) -> None:
    s = batch_settings(make_settings, max_size=3, max_age_s=30)  # one batch, sealed when full
    fake_llm.batches.set_faults(delay_s=600)  # submitted, in progress for the whole test
    ids = [f"c-{i}" for i in range(3)]

    async def main() -> None:
        async with lane(s, fake_llm) as svc:
            tasks(s, ids)
            await wait_for(lambda: metric(svc, "agent_batches_total", {"status": "submitted"}) == 1, 60,
                           what="the batch submitted", service=svc)
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "parked"}) == len(ids), 60,
                           what="every task parked", service=svc)
            (name,) = fake_llm.batches.stats()["created_by_name"]
            group = name.rsplit(":", 1)[0]
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                         base_url="http://t") as http:
                page = await http.get("/ui/login")
                csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
                assert csrf is not None
                login = await http.post("/ui/login", data={"csrf": csrf.group(1), "token": "s3cret"})
                assert login.status_code == 303
                html = (await http.get("/ui/parked")).text
        for t in ids:
            assert f'href="/ui/tasks/{t}"' in html
        assert html.count('class="batch"') == len(ids)
        assert html.count(f"<code>{group}</code> batch 1 <code>batch-") == len(ids), html
        assert "(submitted)" in html and "resumes when its batch has answered" in html
        assert 'name="decision"' not in html  # no person decides a batch's wait
        table = html.split('id="batches"', 1)[1]
        row = re.search(r'<tr id="batch-1">(.*?)</tr>', table, re.S)
        assert row is not None
        cells = re.findall(r"<td>(.*?)</td>", row.group(1), re.S)
        assert cells[0] == f"<code>{group}</code>" and cells[1] == "1" and cells[3] == "submitted"
        assert (cells[4], cells[5]) == (str(len(ids)), str(len(ids)))

    asyncio.run(main())


def test_a_poller_dead_between_a_decision_and_its_resumption_has_the_task_resumed_by_the_next_turn(
        make_settings: Any, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision is recorded, then the worker dies before the task's record is produced again (so
    neither the produce nor the relist after a failed produce happens): the next poller turn finds
    the call decided and must produce the task's record, not take the decision for its resumption."""
    from dedup.effects import Effects
    from service.pipeline import parking

    s = batch_settings(make_settings)
    produce_again, relist = parking.resume, Effects.relist
    died: list[str] = []

    async def dies_once(send: Any, source: dict[str, Any], why: str) -> None:
        if not died:
            died.append(why)
            raise ConnectionError("the worker died here")
        await produce_again(send, source, why)

    async def lost_with_the_worker(self: Effects, task_key: str, at_ms: float, *, keep: bool = False) -> None:
        if len(died) == 1 and not keep:
            died.append("relist lost")
            return
        await relist(self, task_key, at_ms, keep=keep)

    monkeypatch.setattr(parking, "resume", dies_once)
    monkeypatch.setattr(Effects, "relist", lost_with_the_worker)
    ids = [f"r-{i}" for i in range(3)]

    async def main() -> None:
        async with lane(s, fake_llm) as svc:
            tasks(s, ids)
            await wait_for(lambda: all_ended(svc, ids), 60, what="every task succeeded", service=svc)

    asyncio.run(main())
    assert died == ["batch_done", "relist lost"]
    one_result_each(s, ids)
    assert fake_llm.stats()["requests"] == 0, "a call went online"
