"""Three levels of delegation with workers SIGKILLed throughout: every task, root or child, ends with
exactly one result; every child id is the one planned, run by one claim at a time, and calls the
model again only when the worker that called it died; each synthesis reads its children in the
declared order while the first child (slowed down) finishes after the second.

The kinds are those of :mod:`tests.support.delegation_kinds`, loaded by each worker through
``AGENT_AGENTS``: ``dl_orchestrate`` delegates a ``dl_leaf`` and a ``dl_middle`` in parallel,
``dl_middle`` a ``dl_leaf`` again. Run with ``-s`` for the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dedup.ledger import Ledger
from dedup.records import TaskRecord
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from service.runtime.wiring import ensure_topics
from tests.support import kill_worker, produce, read_topic, spawn_worker, stop_workers, succeeded, task_value
from tests.support.delegation_kinds import children_lines
from tests.support.fleet import deployment, ledger_of, records, wait_ended

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

ROOTS = int(os.environ.get("DELEGATION_CHAOS_ROOTS", "40"))
WORKERS = 3
KILLS = 6


def tree(root: str) -> dict[str, str]:
    """Every task of a root's tree and the step that calls the model in it."""
    return {root: "synthesis", f"{root}/fanout/0": "answer", f"{root}/fanout/1": "merge",
            f"{root}/fanout/1/sub/0": "answer"}


def read_lines(children: list[tuple[str, str, Any]]) -> str:
    return children_lines({"children": [{"n": n, "id": cid, "kind": kind, "state": "succeeded", "result": result}
                                        for n, (cid, kind, result) in enumerate(children)]})


def kill_throughout(s: Settings, tmp_path: Path, workers: list[Any], later: list[tuple[bytes, bytes]],
                    ledger_done: Any, fake_llm: FakeLLM) -> int:
    """SIGKILL a random worker every 1.5 to 3 s (once a model call is open, so that kills land inside
    tasks), a new one in its place, ``KILLS`` times or until every task ended; the ``later`` roots
    are produced after the first kill."""
    rng = random.Random(27)
    kills = 0
    started = time.monotonic()
    while kills < KILLS and time.monotonic() - started < 120 and not ledger_done():
        time.sleep(rng.uniform(1.5, 3.0))
        calls_open_by = time.monotonic() + 10
        while fake_llm.stats()["open"] == 0 and time.monotonic() < calls_open_by:
            time.sleep(0.05)
        victim = rng.randrange(len(workers))
        kill_worker(workers[victim])
        kills += 1
        workers[victim] = spawn_worker(s, str(tmp_path / f"w{victim}-{kills}.log"))
        if kills == 1:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, later)
    return kills


async def settle(s: Settings, ids: list[str]) -> dict[str, TaskRecord]:
    async with ledger_of(s) as ledger:
        await wait_ended(ledger, ids, timeout_s=300, what="every root and child to end")
        got = await records(ledger, ids)
    assert all(r is not None for r in got.values())
    return {t: r for t, r in got.items() if r is not None}


async def all_ended(ledger: Ledger, ids: list[str]) -> bool:
    got = await records(ledger, ids)
    return all(r is not None and r.state in ("succeeded", "dead") for r in got.values())


def ended_now(s: Settings, ids: list[str]) -> bool:
    async def check() -> bool:
        async with ledger_of(s) as ledger:
            return await all_ended(ledger, ids)

    return asyncio.run(check())


def parent_wait_ms(parent: TaskRecord, children: list[TaskRecord]) -> int:
    """From the parent's park (or its first child's creation) to the end of its last child."""
    waiting = parent.to_json()["waiting"] or {}
    since = waiting.get("since_ms") or min(c.to_json()["created_at_ms"] or 0 for c in children)
    return max(c.to_json()["completed_at_ms"] or 0 for c in children) - int(since)


@pytest.mark.evicts_killed_members
def test_three_levels_under_sigkills_one_result_per_task_children_once_in_declared_order(
        make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    s = deployment(make_settings, "kill", agents="tests.support.delegation_kinds:agents",
                   # kills land inside the slow first child's call: more than the 3 deaths that end a
                   # task `crashed` can fall on one task, and this run is about once-each, not that cap
                   ledger={"lease_ms": 2000, "max_deaths": KILLS + 1}, llm={"timeout_s": 60})
    fake_llm.latency_s = 0.05
    fake_llm.add_fault(FaultRule("latency", match="/fanout/0:", delay_s=3))  # every root's first child
    roots = [f"kr-{i:03d}" for i in range(ROOTS)]
    steps = {t: step for r in roots for t, step in tree(r).items()}
    ids = list(steps)
    ensure_topics(s)
    workers = [spawn_worker(s, str(tmp_path / f"w{i}.log")) for i in range(WORKERS)]
    try:
        records = [(r.encode(), task_value("dl_orchestrate", {"text": f"question {r}"}, r)) for r in roots]
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, records[: len(records) // 2])
        kills = kill_throughout(s, tmp_path, workers, records[len(records) // 2:], lambda: ended_now(s, ids),
                                fake_llm)
        recs = asyncio.run(settle(s, ids))
    finally:
        stop_workers(workers, grace_s=30)
    why = {t: (r.fields.get("dead_reason"), str(r.fields.get("error"))[:200]) for t, r in recs.items()
           if r.state != "succeeded"}
    assert {t: r.state for t, r in recs.items()} == dict.fromkeys(ids, "succeeded"), why

    # exactly one result per task (a re-emission of the same bytes after a crash is the same result)
    values: dict[str, set[bytes | None]] = {}
    for m in succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=len(ids), timeout_s=90, idle_s=3)):
        values.setdefault((m.key or b"").decode(), set()).add(m.value)
    assert set(values) == set(ids), "a task has no result, or a result under an id nobody planned"
    assert {t: len(v) for t, v in values.items() if len(v) > 1} == {}, "a task has two different results"
    results = {t: json.loads(next(iter(v)) or b"null")["result"] for t, v in values.items()}

    # every child id is one planned, sent again only by a parent resumed after a crash
    sent = Counter((m.key or b"").decode() for m in read_topic(s.kafka.bootstrap_servers, s.kafka.input_topic,
                                                                expect=len(ids), timeout_s=90, idle_s=3))
    assert set(sent) == set(ids)
    assert kills >= 1

    # the model once per task, again only where the worker that asked it died (a later claim)
    calls = fake_llm.stats()["by_step"]
    per_task = {t: calls.get(f"{t}:{step}", 0) for t, step in steps.items()}
    assert all(n >= 1 for n in per_task.values())
    deaths = {t: r.to_json()["deaths"] for t, r in recs.items()}  # claims that took over from a dead worker
    assert {t: n for t, n in per_task.items() if n > 1 and not deaths[t]} == {}, "the model asked twice " \
        "for a task no worker death interrupted"
    assert set(calls) <= {f"{t}:{step}" for t, step in steps.items()}, "a model call for a task nobody planned"

    # each synthesis read its children in declared order, whichever finished first
    reversed_roots = 0
    for r in roots:
        leaf, middle, grandchild = f"{r}/fanout/0", f"{r}/fanout/1", f"{r}/fanout/1/sub/0"
        request = fake_llm.last_request(f"{r}:synthesis")
        assert request is not None
        assert request["messages"][-1]["content"] == read_lines([(leaf, "dl_leaf", results[leaf]),
                                                                 (middle, "dl_middle", results[middle])])
        merge = fake_llm.last_request(f"{middle}:merge")
        assert merge is not None
        assert merge["messages"][-1]["content"] == read_lines([(grandchild, "dl_leaf", results[grandchild])])
        reversed_roots += int(recs[middle].to_json()["completed_at_ms"] < recs[leaf].to_json()["completed_at_ms"])
    assert reversed_roots >= 1, "no root saw its children finish in reverse order"

    children = [t for t in ids if "/" in t]
    waits = [parent_wait_ms(recs[r], [recs[f"{r}/fanout/0"], recs[f"{r}/fanout/1"]]) for r in roots]
    waits += [parent_wait_ms(recs[f"{r}/fanout/1"], [recs[f"{r}/fanout/1/sub/0"]]) for r in roots]
    taken_over = sum(1 for t in ids if deaths[t])
    print(f"\ndelegation chaos: {len(ids)} tasks ({len(roots)} roots, {len(children)} children over 2 levels), "
          f"{kills} SIGKILLs of {WORKERS} workers; model calls per child: "
          f"{dict(sorted(Counter(per_task[t] for t in children).items()))} (per root: "
          f"{dict(sorted(Counter(per_task[r] for r in roots).items()))}); records per child id on the input topic "
          f"(a middle's own resumption included): "
          f"{dict(sorted(Counter(sent[t] for t in children).items()))}; {taken_over} tasks taken over from a killed "
          f"worker; children finished in reverse order under {reversed_roots}/{len(roots)} roots; longest parent "
          f"wait {max(waits) / 1000:.1f}s")
