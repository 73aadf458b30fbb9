"""Agents that delegate to agents, run as a user runs them: each deployment a whole service (its
consumer, the sweeper, the approvals and replies consumers) on Apache Kafka and redis-server, the
fault-injecting model behind them.

The kinds are those of :mod:`tests.support.delegation_kinds`: ``dl_orchestrate`` delegates a
``dl_leaf`` and a ``dl_middle`` in parallel, ``dl_middle`` delegates a ``dl_leaf`` again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.agents.registry import AgentRegistry
from service.api.app import create_app
from service.core.settings import Settings
from service.core.tracing import Tracing
from service.devtools.fakellm import FakeLLM, FaultRule
from service.runtime.wiring import Service, ensure_topics
from tests.support import Msg, produce, read_topic, succeeded, task_value, wait_for
from tests.support.delegation_kinds import fleet
from tests.support.fleet import deployment, ending, ledger_of, records, replying_to, serving, states, wait_ended

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
AUTH = {"Authorization": "Bearer s3cret"}


def ids(root: str) -> tuple[str, str, str]:
    """The child ids of a ``dl_orchestrate`` root: its leaf, its middle, and the middle's leaf."""
    return f"{root}/fanout/0", f"{root}/fanout/1", f"{root}/fanout/1/sub/0"


def kinds(*names: str, **options: Any) -> AgentRegistry:
    return AgentRegistry([a for a in fleet(**options) if a.kind in names])


def produce_root(s: Settings, root: str, **extra: Any) -> None:
    produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
            [(root.encode(), task_value("dl_orchestrate", {"text": f"the question of {root}"}, root, **extra),
              [("traceparent", INCOMING.encode())])])


def by_key(messages: list[Msg]) -> dict[str, list[Msg]]:
    out: dict[str, list[Msg]] = {}
    for m in messages:
        out.setdefault((m.key or b"").decode(), []).append(m)
    return out


def one_each(s: Settings, topic: str, expect: int) -> dict[str, dict[str, Any]]:
    """The records of ``topic`` by key (of the results topic: the ``succeeded`` events); a key with
    two different values fails."""
    messages = read_topic(s.kafka.bootstrap_servers, topic, expect=expect)
    found = by_key(succeeded(messages) if topic == s.kafka.results_topic else messages)
    assert all(len({m.value for m in ms}) == 1 for ms in found.values()), "a task has two different outcomes"
    return {k: ms[0].json() for k, ms in found.items()}


def replies(s: Settings, expect: int) -> set[tuple[str, str, int, str, str | None]]:
    """``(parent, task_id, n, state, reason)`` of every reply on the deployment's replies topic."""
    got = read_topic(s.kafka.bootstrap_servers, s.kafka.replies_topic, expect=expect)
    return {(b["parent"], b["task_id"], b["n"], b["state"], b.get("reason")) for b in (m.json() for m in got)}


def header(m: Msg, name: str) -> str:
    return m.headers[name].decode()


def expected_lines(children: list[tuple[str, str, dict[str, Any]]]) -> str:
    """What ``synthesis`` or ``merge`` must have read: every child in declared order."""
    return "\n".join(f"child {n} {cid} ({kind}, succeeded): {json.dumps(result, sort_keys=True)}"
                     for n, (cid, kind, result) in enumerate(children))


def prompt(fake_llm: FakeLLM, key: str) -> str:
    request = fake_llm.last_request(key)
    assert request is not None, f"no model request for {key}"
    content: str = request["messages"][-1]["content"]
    return content


def model_calls(fake_llm: FakeLLM, root: str) -> dict[str, int]:
    return {k: n for k, n in fake_llm.stats()["by_step"].items() if k.startswith(root)}


@contextlib.asynccontextmanager
async def api(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
        yield client


def test_three_levels_run_once_each_in_one_trace_and_the_synthesis_reads_children_in_declared_order(
        make_settings: Any, fake_llm: FakeLLM) -> None:
    """The first child is slow, so the second (two hops deep) finishes first; the synthesis reads
    them in the order they were declared. Every hop carries the root's trace."""
    a = deployment(make_settings, "a", llm={"timeout_s": 30})
    root = "tr-root"
    leaf, middle, grandchild = ids(root)
    fake_llm.add_fault(FaultRule("latency", match=f"{leaf}:", delay_s=4))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def scenario() -> dict[str, Any]:
        async with serving(a, fake_llm.base_url, agents=kinds("dl_orchestrate", "dl_middle", "dl_leaf"),
                           tracing=Tracing(provider)) as svc:
            produce_root(a, root)
            await wait_ended(svc.ledger, [root, leaf, middle, grandchild])
            async with api(svc) as client:
                shown = (await client.get(f"/tasks/{root}", headers=AUTH)).json()
            return {"records": {t: r.to_json() if r else None for t, r in
                                (await records(svc.ledger, [root, leaf, middle, grandchild])).items()},
                    "shown": shown}

    seen = asyncio.run(scenario())
    recs = seen["records"]
    assert {t: r["state"] for t, r in recs.items()} == dict.fromkeys(recs, "succeeded")
    assert recs[middle]["completed_at_ms"] < recs[leaf]["completed_at_ms"], "the children did not finish reversed"
    results = one_each(a, a.kafka.results_topic, expect=4)
    assert set(results) == {root, leaf, middle, grandchild}
    assert prompt(fake_llm, f"{root}:synthesis") == expected_lines([(leaf, "dl_leaf", results[leaf]["result"]),
                                                                    (middle, "dl_middle", results[middle]["result"])])
    assert prompt(fake_llm, f"{middle}:merge") == expected_lines([(grandchild, "dl_leaf",
                                                                   results[grandchild]["result"])])
    assert model_calls(fake_llm, root) == {f"{root}:synthesis": 1, f"{leaf}:answer": 1, f"{middle}:merge": 1,
                                           f"{grandchild}:answer": 1}
    # the wire: each child keyed by its id, naming its parent, step, place, depth and path
    sent = by_key(read_topic(a.kafka.bootstrap_servers, a.kafka.input_topic, expect=5))
    assert set(sent) == {root, leaf, middle, grandchild}
    for cid, parent, step, n, depth, path in ((leaf, root, "fanout", "0", "1", "dl_orchestrate"),
                                              (middle, root, "fanout", "1", "1", "dl_orchestrate"),
                                              (grandchild, middle, "sub", "0", "2", "dl_orchestrate,dl_middle")):
        for m in sent[cid]:
            assert (header(m, "agent.parent"), header(m, "agent.parent_step"), header(m, "agent.child"),
                    header(m, "agent.depth"), header(m, "agent.path")) == (parent, step, n, depth, path)
            assert header(m, "agent.reply_to") == a.kafka.replies_topic
            assert header(m, "traceparent").split("-")[1] == TRACE_ID
    assert replies(a, expect=3) == {(root, leaf, 0, "succeeded", None), (root, middle, 1, "succeeded", None),
                                    (middle, grandchild, 0, "succeeded", None)}
    # one trace from the producer of the root through every hop, the resumed runs included
    spans = [sp for sp in exporter.get_finished_spans() if sp.name.startswith("agent.task ")]
    keyed = {str((sp.attributes or {}).get("agent.task.key")) for sp in spans}
    assert {root, leaf, middle, grandchild} <= keyed
    assert {format(sp.context.trace_id, "032x") for sp in spans} == {TRACE_ID}
    assert all(format(sp.context.trace_id, "032x") == TRACE_ID for sp in exporter.get_finished_spans())
    # what `task show` shows: the tree
    shown = seen["shown"]
    assert [(c["id"], c["kind"], c["state"]) for c in shown["children"]] == [
        (leaf, "dl_leaf", "succeeded"), (middle, "dl_middle", "succeeded")]


def test_two_deployments_delegate_across_each_on_its_own_topics_and_group(
        make_settings: Any, fake_llm: FakeLLM) -> None:
    """Team A's orchestrator delegates its middle to team B's topic; B's middle delegates its leaf
    back to A's. Each deployment folds the replies for its own parents from its own replies topic."""
    team_a, team_b = deployment(make_settings, "a"), deployment(make_settings, "b")
    a, b = replying_to(team_a, team_b), replying_to(team_b, team_a)  # each replies to the other's parents
    root = "x-root"
    leaf, middle, grandchild = ids(root)

    async def scenario() -> None:
        async with (serving(a, fake_llm.base_url, agents=kinds("dl_orchestrate", "dl_leaf",
                                                                topics={"dl_middle": b.kafka.input_topic})) as sa,
                    serving(b, fake_llm.base_url, agents=kinds("dl_middle", grandchild_topic=a.kafka.input_topic))
                    as sb):
            produce_root(a, root)
            await wait_ended(sa.ledger, [root, leaf, grandchild])
            await wait_ended(sb.ledger, [middle])
            assert set((await states(sa.ledger, [root, leaf, grandchild])).values()) == {"succeeded"}
            assert (await states(sb.ledger, [middle])) == {middle: "succeeded"}
            assert (await states(sa.ledger, [middle])) == {middle: "missing"}  # B's task, in B's ledger

    asyncio.run(scenario())
    at_a = by_key(read_topic(a.kafka.bootstrap_servers, a.kafka.input_topic, expect=4))
    at_b = by_key(read_topic(b.kafka.bootstrap_servers, b.kafka.input_topic, expect=1))
    assert set(at_a) == {root, leaf, grandchild} and set(at_b) == {middle}
    assert {header(m, "agent.reply_to") for m in at_b[middle]} == {a.kafka.replies_topic}
    assert {header(m, "agent.reply_to") for m in at_a[grandchild]} == {b.kafka.replies_topic}
    assert {header(m, "traceparent").split("-")[1] for m in at_b[middle] + at_a[grandchild]} == {TRACE_ID}
    assert replies(a, expect=2) == {(root, leaf, 0, "succeeded", None), (root, middle, 1, "succeeded", None)}
    assert replies(b, expect=1) == {(middle, grandchild, 0, "succeeded", None)}
    results_a = one_each(a, a.kafka.results_topic, expect=3)
    results_b = one_each(b, b.kafka.results_topic, expect=1)
    assert set(results_a) == {root, leaf, grandchild} and set(results_b) == {middle}
    assert prompt(fake_llm, f"{root}:synthesis") == expected_lines([
        (leaf, "dl_leaf", results_a[leaf]["result"]), (middle, "dl_middle", results_b[middle]["result"])])
    assert model_calls(fake_llm, root) == {f"{root}:synthesis": 1, f"{leaf}:answer": 1, f"{middle}:merge": 1,
                                           f"{grandchild}:answer": 1}


def test_a_grandchild_reached_after_the_roots_deadline_expires_without_a_model_call(
        make_settings: Any, fake_llm: FakeLLM) -> None:
    """A root with a 3 s deadline; its grandchild goes to team C, whose workers are behind (they start
    once the root has given up). The deadline travelled two hops: C ends the grandchild ``expired``
    without calling the model, and the parents that waited for it expired at that deadline."""
    a = deployment(make_settings, "a")
    c = replying_to(deployment(make_settings, "c"), a)
    root = "dl-root"
    leaf, middle, grandchild = ids(root)
    deadline = datetime.now(UTC) + timedelta(seconds=3)
    ensure_topics(c)  # team C is deployed; its workers are behind

    async def scenario() -> None:
        async with serving(a, fake_llm.base_url, agents=kinds("dl_orchestrate", "dl_middle", "dl_leaf",
                                                               grandchild_topic=c.kafka.input_topic)) as sa:
            produce_root(a, root, deadline=deadline.isoformat())
            await wait_ended(sa.ledger, [root, leaf, middle], what="the root and its children to end")
            async with serving(c, fake_llm.base_url, agents=kinds("dl_leaf")), ledger_of(c) as at_c:
                await wait_ended(at_c, [grandchild], what="team C to reach the grandchild")
                (gc,) = (await records(at_c, [grandchild])).values()
                assert ending(gc) == "expired"
                # its reply reaches A, whose parent had already expired: nothing resumes
                await wait_for(lambda: asyncio.to_thread(lambda: len(replies(a, expect=3)) == 3), 90,
                               interval_s=1.0, what="the grandchild's reply")
            got = await records(sa.ledger, [root, leaf, middle])
            assert {t: ending(r) for t, r in got.items()} == {root: "expired", leaf: "succeeded", middle: "expired"}

    asyncio.run(scenario())
    assert fake_llm.calls_for(grandchild) == 0
    assert model_calls(fake_llm, root) == {f"{leaf}:answer": 1}  # no synthesis, no merge
    (sent,) = read_topic(c.kafka.bootstrap_servers, c.kafka.input_topic, expect=1)
    travelled = datetime.fromisoformat(sent.json()["deadline"])
    assert abs(travelled - deadline) < timedelta(milliseconds=1)  # the root's, two hops on
    assert header(sent, "agent.depth") == "2"
    (dead,) = read_topic(c.kafka.bootstrap_servers, c.kafka.dlq_topic, expect=1)
    assert (dead.key, header(dead, "dlq.reason")) == (grandchild.encode(), "expired")
    at_a = {(m.key or b"").decode(): header(m, "dlq.reason")
            for m in read_topic(a.kafka.bootstrap_servers, a.kafka.dlq_topic, expect=2)}
    assert at_a == {root: "expired", middle: "expired"}
    assert replies(a, expect=3) == {(root, leaf, 0, "succeeded", None), (root, middle, 1, "dead", "expired"),
                                    (middle, grandchild, 0, "dead", "expired")}
    assert one_each(a, a.kafka.results_topic, expect=1).keys() == {leaf}


def test_an_expired_parent_cancels_its_children_not_started(make_settings: Any, fake_llm: FakeLLM) -> None:
    """A root with a 3 s deadline: its leaf succeeds, its middle waits in a second lane of the same
    deployment (another input topic and group, the same ledger) whose workers start only once the
    root was dead-lettered ``expired``. The middle ends ``cancelled`` without a model call and
    delegates nothing; the leaf that had finished keeps its result."""
    a = deployment(make_settings, "a")
    lane = replying_to(deployment(make_settings, "lane", key_prefix=a.redis.key_prefix), a)
    root = "cx-root"
    leaf, middle, grandchild = ids(root)
    ensure_topics(lane)  # the lane is deployed; its workers are not running yet

    async def scenario() -> None:
        async with serving(a, fake_llm.base_url, agents=kinds("dl_orchestrate", "dl_leaf",
                                                               topics={"dl_middle": lane.kafka.input_topic})) as sa:
            produce_root(a, root, deadline=(datetime.now(UTC) + timedelta(seconds=3)).isoformat())
            await wait_ended(sa.ledger, [root, leaf], what="the root to be dead-lettered")
        async with serving(lane, fake_llm.base_url, agents=kinds("dl_middle", "dl_leaf")) as sl:
            await wait_ended(sl.ledger, [middle], what="the lane to reach the middle")
            got = await records(sl.ledger, [root, leaf, middle, grandchild])
            assert {t: ending(r) for t, r in got.items()} == {
                root: "expired", leaf: "succeeded", middle: "dead(cancelled)", grandchild: None}

    asyncio.run(scenario())
    assert fake_llm.calls_for(middle) == 0  # the middle, and any grandchild of it
    assert model_calls(fake_llm, root) == {f"{leaf}:answer": 1}  # the root never reached its synthesis
    (root_dead,) = read_topic(a.kafka.bootstrap_servers, a.kafka.dlq_topic, expect=1)
    assert (root_dead.key, header(root_dead, "dlq.reason")) == (root.encode(), "expired")
    (cancelled,) = read_topic(lane.kafka.bootstrap_servers, lane.kafka.dlq_topic, expect=1)
    assert (cancelled.key, header(cancelled, "dlq.reason")) == (middle.encode(), "cancelled")
    assert set(by_key(read_topic(lane.kafka.bootstrap_servers, lane.kafka.input_topic, expect=1))) == {middle}
    assert replies(a, expect=2) == {(root, leaf, 0, "succeeded", None), (root, middle, 1, "dead", "cancelled")}


def test_the_built_in_review_panel_delegates_and_writes_the_review_even_without_one_part(
        make_settings: Any, fake_llm: FakeLLM) -> None:
    """``review_panel`` as the service loads it: three children of kinds of their own, a synthesis
    that reads them in declared order; a child that fails leaves the review degraded, not dead."""
    a = deployment(make_settings, "rp")
    document = {"document": "Kafka delivers at least once; the ledger makes each task run once.",
                "audience": "an engineer"}
    fake_llm.add_fault(FaultRule("schema_violation", match="rp-2/panel/2:"))  # rp-2's critique never answers well
    tasks = ["rp-1", "rp-2"]
    children = [f"{t}/panel/{n}" for t in tasks for n in range(3)]

    async def scenario() -> None:
        async with serving(a, fake_llm.base_url) as svc:  # the built-in kinds, loaded as usual
            produce(a.kafka.bootstrap_servers, a.kafka.input_topic,
                    [(t.encode(), task_value("review_panel", document, t)) for t in tasks])
            await wait_ended(svc.ledger, tasks + children)
            got = await records(svc.ledger, tasks + children)
            assert {t: ending(r) for t, r in got.items()} == {
                **dict.fromkeys(tasks + children, "succeeded"), "rp-2/panel/2": "dead(invalid_output)"}

    asyncio.run(scenario())
    results = one_each(a, a.kafka.results_topic, expect=7)
    assert set(results) == set(tasks + children) - {"rp-2/panel/2"}
    assert [results[f"rp-1/panel/{n}"]["kind"] for n in range(3)] == ["review_research", "review_summary",
                                                                      "review_critique"]
    assert set(results["rp-1"]["result"]) == {"assessment", "recommendations"}
    assert not results["rp-1"].get("degraded") and results["rp-2"].get("degraded") is True
    full, partial = prompt(fake_llm, "rp-1:synthesis"), prompt(fake_llm, "rp-2:synthesis")
    research, summary, critique = (json.dumps(results[f"rp-1/panel/{n}"]["result"], sort_keys=True) for n in range(3))
    assert full.endswith(f"research:\n{research}\n\nsummary:\n{summary}\n\ncritique:\n{critique}")
    assert partial.endswith("critique: missing (invalid_output)")
    assert fake_llm.stats()["by_step"]["rp-1/panel/0:research"] == 1
