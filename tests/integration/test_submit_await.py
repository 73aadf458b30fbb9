"""Submit and await (``service.sdk.client``) against a running service on Apache Kafka, a real
redis-server and the fake model: 200 tasks, some failing, each awaited over the results topic and
over the HTTP API; every outcome one event on the results topic; the submit-only token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from service.agents.base import Agent, Messages, Previous
from service.agents.kinds import ClassifyInput, ClassifyStep
from service.agents.registry import AgentRegistry, default_agents
from service.api.app import create_app
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from service.pipeline import dlq
from service.runtime.wiring import Service
from service.sdk.client import HttpClient, Outcome, ResultTimeout, TopicClient
from tests.support import failed, metric, produce, read_topic, running, wait_for

pytestmark = [pytest.mark.integration]

LABELS = ["complaint", "praise", "question"]
N = 200
ADMIN, READ, SUBMIT = "s3cret", "r3ad", "subm1t"


def task_ids(prefix: str) -> list[str]:
    """Every seventh task fails for good (the fake model answers 400: ``permanent``)."""
    return [f"{prefix}-fail-{i}" if i % 7 == 0 else f"{prefix}-ok-{i}" for i in range(N)]


def check_outcomes(outcomes: dict[str, Outcome], ids: list[str]) -> None:
    assert set(outcomes) == set(ids)
    for task_id, outcome in outcomes.items():
        assert outcome.task_id == task_id
        if "-fail-" in task_id:
            assert (outcome.outcome, outcome.reason, outcome.attempts) == ("failed", "permanent", 1), outcome
            assert outcome.result is None
        else:
            assert outcome.succeeded and outcome.result["label"] in LABELS, outcome


@contextlib.asynccontextmanager
async def served(svc: Service) -> AsyncIterator[str]:
    """The service's HTTP app on a free loopback port, in this event loop (the ledger's)."""
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started or task.done(), 30, what="uvicorn")
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def submit_all(client: TopicClient | HttpClient, ids: list[str]) -> None:
    gate = asyncio.Semaphore(16)

    async def one(task_id: str) -> None:
        async with gate:
            assert await client.asubmit("classify", {"text": f"text of {task_id}", "labels": LABELS},
                                        task_id) == task_id

    await asyncio.gather(*(one(t) for t in ids))


def test_200_tasks_awaited_over_the_results_topic_each_one_event_failures_naming_their_dead_letter(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    s: Settings = make_settings()
    fake_llm.add_fault(FaultRule("error", match="-fail-", status=400))
    ids = task_ids("tp")
    k = s.kafka

    async def scenario() -> dict[str, Outcome]:
        async with running(s, fake_llm.base_url):
            client = TopicClient(k.bootstrap_servers, input_topic=k.input_topic, results_topic=k.results_topic)
            async with client:
                with pytest.raises(ResultTimeout):
                    await client.aresult("tp-never-sent", timeout=0.5)
                await submit_all(client, ids[:-3])
                outcomes = dict(zip(ids[:-3], await asyncio.gather(*(client.aresult(t, 120) for t in ids[:-3])),
                                    strict=True))
                for task_id in ids[-3:]:  # the blocking calls, from a thread
                    assert await asyncio.to_thread(client.submit, "classify", {"text": "t", "labels": LABELS},
                                                   task_id) == task_id
                    outcomes[task_id] = await asyncio.to_thread(client.result, task_id, 120)
                return outcomes

    outcomes = asyncio.run(scenario())
    check_outcomes(outcomes, ids)
    failing = [t for t in ids if "-fail-" in t]
    events = read_topic(k.bootstrap_servers, k.results_topic, expect=N)
    assert sorted(m.json()["task_id"] for m in events) == sorted(ids), "a task without one event, or with two"
    assert sorted(m.json()["task_id"] for m in failed(events)) == sorted(failing)
    letters = {m.headers["dlq.task_id"].decode(): m for m in read_topic(k.bootstrap_servers, k.dlq_topic,
                                                                        expect=len(failing))}
    assert sorted(letters) == sorted(failing)
    for task_id in failing:  # the event names the dead letter that holds the original record
        letter = letters[task_id]
        assert outcomes[task_id].dead_letter == {"topic": k.dlq_topic, "partition": letter.partition,
                                                 "offset": letter.offset, "id": letter.headers["dlq.id"].decode()}
        assert json.loads(letter.value or b"{}")["task_id"] == task_id


def test_a_replayed_dead_letter_that_succeeds_has_a_second_event_and_the_latest_is_its_outcome(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    s: Settings = make_settings()
    fake_llm.add_fault(FaultRule("error", match="rp-fail-1", status=400, times=1))
    k = s.kafka

    async def scenario() -> tuple[Outcome, Outcome]:
        async with running(s, fake_llm.base_url) as svc, TopicClient(
                k.bootstrap_servers, input_topic=k.input_topic, results_topic=k.results_topic) as client:
            task_id = await client.asubmit("classify", {"text": "t", "labels": LABELS}, "rp-fail-1")
            first = await client.aresult(task_id, 60)
            assert first.outcome == "failed" and first.dead_letter is not None
            report = await dlq.replay(k, svc.ledger, [(first.dead_letter["partition"],
                                                       first.dead_letter["offset"])], None)
            assert report.replayed == 1, report
            await wait_for(lambda: client.result(task_id, 0).succeeded, 60,
                           what="the replayed task's succeeded event")
            return first, await client.aresult(task_id, 1)

    first, latest = asyncio.run(scenario())
    assert first.reason == "permanent" and latest.succeeded and latest.result["label"] in LABELS
    events = [m.json() for m in read_topic(k.bootstrap_servers, k.results_topic, expect=2) if m.key == b"rp-fail-1"]
    assert [e["outcome"] for e in events] == ["failed", "succeeded"]


def test_200_tasks_awaited_over_http_and_the_submit_token_only_submits(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(admin_token=ADMIN, read_token=READ, submit_token=SUBMIT)
    fake_llm.add_fault(FaultRule("error", match="-fail-", status=400))
    fake_llm.add_fault(FaultRule("latency", match="hp-wait-slow-3", delay_s=3))
    ids = task_ids("hp")

    async def scenario() -> dict[str, Outcome]:
        async with running(s, fake_llm.base_url) as svc, served(svc) as url:
            await refusals(url)
            client = HttpClient(url, submit_token=SUBMIT, read_token=READ, poll_s=5)
            await submit_all(client, ids[:-3])
            outcomes = dict(zip(ids[:-3], await asyncio.gather(*(client.aresult(t, 120) for t in ids[:-3])),
                                strict=True))
            for task_id in ids[-3:]:
                await asyncio.to_thread(client.submit, "classify", {"text": "t", "labels": LABELS}, task_id)
                outcomes[task_id] = await asyncio.to_thread(client.result, task_id, 120)
            await waits(url)
            return outcomes

    outcomes = asyncio.run(scenario())
    check_outcomes(outcomes, ids)
    assert all(o.event["state"] == ("dead" if "-fail-" in t else "succeeded") for t, o in outcomes.items())
    extra = ["hp-token-1", "hp-wait-1", "hp-wait-fail-2", "hp-wait-slow-3"]  # the refused ones never ran
    events = read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=N + len(extra))
    assert sorted(m.json()["task_id"] for m in events) == sorted(ids + extra)
    assert sorted(m.json()["task_id"] for m in failed(events)) == sorted(
        [t for t in ids if "-fail-" in t] + ["hp-wait-fail-2"])


async def refusals(url: str) -> None:
    """The submit token produces a task; it reads nothing, replays nothing, and cannot wait."""
    submit = {"Authorization": f"Bearer {SUBMIT}"}
    task = {"task_id": "hp-token-1", "kind": "classify", "input": {"text": "t", "labels": LABELS}}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/tasks", json=task, headers=submit)
        assert r.status_code == 202 and r.json()["task_id"] == "hp-token-1", r.text
        assert (await http.get("/tasks/hp-token-1", headers=submit)).status_code == 401
        assert (await http.get("/dlq", headers=submit)).status_code == 401
        r = await http.post("/dlq/replay", json={"reason": "permanent"}, headers=submit)
        assert r.status_code == 401
        r = await http.post("/tasks", params={"wait": 1}, json={**task, "task_id": "hp-token-2"}, headers=submit)
        assert r.status_code == 403, r.text
        read = {"Authorization": f"Bearer {READ}"}
        assert (await http.post("/tasks", json={**task, "task_id": "hp-token-3"}, headers=read)).status_code == 401
        r = await http.post("/tasks", json={**task, "task_id": "hp-token-4"}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 401


async def waits(url: str) -> None:
    """``POST /tasks?wait=`` answers 200 with the ended record; a wait that runs out answers 202."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    task = {"task_id": "hp-wait-1", "kind": "classify", "input": {"text": "t", "labels": LABELS}}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        r = await http.post("/tasks", params={"wait": 30}, json=task, headers=admin)
        assert r.status_code == 200 and r.json()["outcome"] == "succeeded" and r.json()["result"]["label"] in LABELS
        r = await http.get("/tasks/hp-wait-1", params={"wait": 5}, headers=admin)
        assert r.status_code == 200 and r.json()["outcome"] == "succeeded"
        r = await http.post("/tasks", params={"wait": 30}, json={**task, "task_id": "hp-wait-fail-2"}, headers=admin)
        assert r.status_code == 200 and (r.json()["outcome"], r.json()["dead_reason"]) == ("failed", "permanent")
        r = await http.get("/tasks/hp-never-sent", params={"wait": 0.5}, headers=admin)
        assert r.status_code == 404
        r = await http.post("/tasks", params={"wait": 0.5}, json={**task, "task_id": "hp-wait-slow-3"}, headers=admin)
        assert r.status_code == 202 and r.json()["task_id"] == "hp-wait-slow-3"  # not ended yet
        r = await http.get("/tasks/hp-wait-slow-3", params={"wait": 30}, headers=admin)
        assert r.status_code == 200 and r.json()["outcome"] == "succeeded"


class _BuggyStep(ClassifyStep):
    """A step whose own code raises what no step should: a bug of the service, dead letter ``internal``."""

    def messages(self, task_input: ClassifyInput, previous: Previous) -> Messages:
        raise ZeroDivisionError("a bug in the step")


def test_an_internal_failure_ends_the_task_so_a_wait_answers_at_once_with_it(
    make_settings: Any, fake_llm: FakeLLM
) -> None:
    """The ``internal`` dead letter moves the ledger record to ``dead`` as every other reason does:
    ``GET /tasks/{id}?wait=`` answers 200 with the failure, not 202 with the record left ``running``
    (each internal retry waits out the record's own lease first: a few seconds here)."""
    s: Settings = make_settings(admin_token=ADMIN)
    agents = default_agents()
    buggy = AgentRegistry([Agent("buggy", ClassifyInput, (_BuggyStep(),)), *(agents.get(k) for k in agents.kinds())])
    k = s.kafka

    async def scenario() -> tuple[httpx.Response, Outcome]:
        async with running(s, fake_llm.base_url, agents=buggy) as svc, served(svc) as url, TopicClient(
                k.bootstrap_servers, input_topic=k.input_topic, results_topic=k.results_topic) as client:
            svc.processor.config = dataclasses.replace(svc.processor.config, internal_backoff_s=0.01)
            produce(k.bootstrap_servers, k.input_topic,
                    [(b"bug-1", json.dumps({"task_id": "bug-1", "kind": "buggy",
                                            "input": {"text": "t", "labels": LABELS}}).encode())])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "internal"}) == 1, 120,
                           what="the internal dead letter")
            async with httpx.AsyncClient(base_url=url, timeout=60,
                                         headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                response = await http.get("/tasks/bug-1", params={"wait": 10})
            assert metric(svc, "agent_internal_errors_total") == svc.processor.config.internal_retries + 1
            return response, await client.aresult("bug-1", 60)

    response, outcome = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["state"], body["outcome"], body["dead_reason"]) == ("dead", "failed", "internal"), body
    assert "ZeroDivisionError" in body["error"]
    assert (outcome.outcome, outcome.reason, outcome.kind) == ("failed", "internal", "buggy")
    events = [m.json() for m in read_topic(k.bootstrap_servers, k.results_topic, expect=1)]
    assert [(e["task_id"], e["outcome"], e["reason"]) for e in events] == [("bug-1", "failed", "internal")]
    letters = read_topic(k.bootstrap_servers, k.dlq_topic, expect=1)
    assert [(m.headers["dlq.task_id"], m.headers["dlq.reason"]) for m in letters] == [(b"bug-1", b"internal")]
    assert outcome.dead_letter is not None and outcome.dead_letter["offset"] == letters[0].offset
