"""Agents as step graphs, on the broker: branches run concurrently, a join sees its inputs in the order
it names them whatever order they finished in, and a crash between branches resumes from the journal."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.agents.review import ReviewInput, SynthesisStep
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
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

BRANCHES = ("research", "summarise", "critique")


def review(task_id: str, document: str) -> bytes:
    return task_value("review", {"document": document}, task_id)


def test_branches_finish_in_any_order_and_the_join_reads_them_in_its_own(make_settings: Any,
                                                                          fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()
    # research and summarise are slow half of the time: the branches finish in varying orders
    fake_llm.add_fault(FaultRule("latency", match=":research", probability=0.5, delay_s=0.3))
    fake_llm.add_fault(FaultRule("latency", match=":summarise", probability=0.5, delay_s=0.15))
    ids = [f"rev-{i}" for i in range(20)]
    journals: dict[str, dict[str, Any]] = {}

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(t.encode(), review(t, f"document {t}")) for t in ids])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == len(ids), 60,
                           what="every review", service=svc)
            for t in ids:
                journals[t] = await svc.ledger.steps(t)

    asyncio.run(scenario())
    results = {m.key.decode(): m.json() for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic,
                                                            expect=len(ids))) if m.key is not None}
    for t in ids:
        journal = journals[t]
        assert set(journal) == {*BRANCHES, "synthesis"}
        for step in (*BRANCHES, "synthesis"):
            assert fake_llm.calls_for(f"{t}:{step}") == 1, (t, step)
        # the join's request, byte for byte what the step makes of the journaled branch outputs in its order
        previous = {name: journal[name]["output"] for name in BRANCHES}
        expected = SynthesisStep().messages(ReviewInput(document=f"document {t}"), previous)
        sent = fake_llm.last_request(f"{t}:synthesis")
        assert sent is not None and sent["messages"] == expected
        assert list(previous) == list(BRANCHES)
        assert results[t]["result"] == journal["synthesis"]["output"]


@pytest.mark.evicts_killed_members
def test_a_crash_after_two_of_three_branches_resumes_with_the_third(make_settings: Any, fake_llm: FakeLLM,
                                                                    tmp_path: Path) -> None:
    """SIGKILL while research and summarise are journaled and critique is still at the model: the
    next worker calls the model for critique and synthesis only."""
    s: Settings = make_settings(ledger={"lease_ms": 2000}, llm={"timeout_s": 60})
    fake_llm.add_fault(FaultRule("latency", match="crash-rev:critique", times=1, delay_s=60))
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    worker = spawn_worker(s, str(tmp_path / "worker.log"))
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"crash-rev", review("crash-rev", "a long report"))])

        async def two_branches_journaled() -> None:
            client = connect(s.redis.url.get_secret_value())
            ledger = Ledger(client, keys=Keys(s.redis.key_prefix), lease_ms=s.ledger.lease_ms, ttl_s=600)
            try:
                await wait_for(lambda: fake_llm.calls_for("crash-rev:critique") == 1, 60,
                               what="critique at the model")

                async def journaled() -> bool:
                    return {"research", "summarise"} <= set(await ledger.steps("crash-rev"))

                await wait_for(journaled, 30, interval_s=0.2, what="research and summarise journaled")
            finally:
                await close(client)

        asyncio.run(two_branches_journaled())
        kill_worker(worker)
    finally:
        kill_worker(worker)
    before = {step: fake_llm.calls_for(f"crash-rev:{step}") for step in (*BRANCHES, "synthesis")}
    assert before == {"research": 1, "summarise": 1, "critique": 1, "synthesis": 0}

    async def take_over() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as svc:
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, 60,
                           what="the review finished by the next worker", service=svc)
            assert metric(svc, "agent_steps_reused_total") == 2
            record = await svc.ledger.get("crash-rev")
            assert record is not None
            return record.to_json()

    record = asyncio.run(take_over())
    after = {step: fake_llm.calls_for(f"crash-rev:{step}") for step in (*BRANCHES, "synthesis")}
    assert after == {"research": 1, "summarise": 1, "critique": 2, "synthesis": 1}
    assert record["state"] == "succeeded" and record["fence"] == 2
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert len(results) == 1 and results[0].json()["result"] == record["result"]


@pytest.mark.evicts_killed_members
def test_a_document_too_long_for_the_window_is_summarised_in_journaled_pieces_across_a_kill(
    make_settings: Any, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """20 paragraphs, one per piece at this window: SIGKILL while piece 11 is at the model; the next
    worker re-uses pieces 1-10 from the journal, then combines all 20 in order."""
    from service.agents.kinds import SummarizeInput, SummarizeLongStep

    # a paragraph (about 2,200 bytes with the prompt) fits with the answer, two do not
    s: Settings = make_settings(ledger={"lease_ms": 2000}, llm={"timeout_s": 60, "context_tokens": 3072,
                                                                  "max_tokens": 256})
    paragraphs = [f"Paragraph {i}. " + " ".join(f"w{i}x{j}" for j in range(250)) for i in range(1, 21)]
    task_input = {"text": "\n\n".join(paragraphs), "max_words": 50}
    fake_llm.add_fault(FaultRule("latency", match="md-1:summarize-part-011", times=1, delay_s=60))
    from service.runtime.wiring import ensure_topics

    ensure_topics(s)
    worker = spawn_worker(s, str(tmp_path / "worker.log"))
    try:
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                [(b"md-1", task_value("summarize_long", task_input, "md-1"))])

        async def at_piece_11() -> None:
            await wait_for(lambda: fake_llm.calls_for("md-1:summarize-part-011") == 1, 60, what="piece 11 at the model")

        asyncio.run(at_piece_11())
        kill_worker(worker)
    finally:
        kill_worker(worker)

    async def take_over() -> dict[str, Any]:
        async with running(s, fake_llm.base_url) as svc:
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, 60,
                           what="the summary finished by the next worker", service=svc)
            assert metric(svc, "agent_steps_reused_total") == 10
            return await svc.ledger.steps("md-1")

    journal = asyncio.run(take_over())
    parts = [f"summarize-part-{i:03d}" for i in range(1, 21)]
    assert sorted(journal) == sorted([*parts, "summarize"])  # one journal entry per piece, and the result
    calls = fake_llm.stats()["by_step"]
    assert {p: calls.get(f"md-1:{p}") for p in parts} == {p: 2 if p.endswith("011") else 1 for p in parts}
    assert calls.get("md-1:summarize") == 1
    expected = SummarizeLongStep().reduce_messages(SummarizeInput(**task_input),
                                                   [journal[p]["output"] for p in parts])
    sent = fake_llm.last_request("md-1:summarize")
    assert sent is not None and sent["messages"] == expected  # the pieces combined in document order
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert len(results) == 1 and results[0].json()["result"] == journal["summarize"]["output"]
