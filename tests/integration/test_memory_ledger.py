"""The in-memory ledger of ``service.sdk.testing`` answers as the Redis ledger's scripts do, for every
operation a run of a step graph uses: the same calls, in the same order, against a real
redis-server and against the stand-in, give the same answers, the same journals and the same audit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import AttemptsExhausted, Ledger, StaleFence
from dedup.lifecycles import IllegalTransition
from service.runtime.memory_ledger import MemoryLedger

pytestmark = pytest.mark.integration

KEY = "task-1"


async def outcome(call: Callable[[], Awaitable[Any]]) -> Any:
    """What a call answered, or the exception it raised (its type and what it carries)."""
    try:
        return await call()
    except AttemptsExhausted as exc:
        return ("AttemptsExhausted", exc.total)
    except (StaleFence, IllegalTransition) as exc:
        return (type(exc).__name__,)


def call_record(state: str, outcome_: str | None = None, result: Any = None) -> dict[str, Any]:
    record: dict[str, Any] = {"state": state, "key": f"{KEY}/file/1", "tool": "open_ticket", "fence": 1,
                              "arguments": {"title": "x"}, "result": result}
    if outcome_ is not None:
        record["outcome"] = outcome_
    return record


async def script(ledger: Any, fence: int) -> list[Any]:
    """Every operation the pipeline's graph, call loop and tool loop use, the holder's and a stale fence's."""
    stale = fence + 1
    effects = ledger.effects
    audit = {"task_id": KEY, "tool": "open_ticket", "outcome": "executed"}
    trace: list[Any] = [await ledger.generation(KEY), await ledger.steps(KEY), await effects.journal(KEY)]
    for op in (
        lambda: ledger.begin_attempt(KEY, fence, "summarize", 2),
        lambda: ledger.end_attempt(KEY, fence, "summarize"),
        lambda: ledger.begin_attempt(KEY, fence, "summarize", 2),
        lambda: ledger.begin_attempt(KEY, fence, "summarize", 2),  # the step's attempts are used up
        lambda: ledger.begin_attempt(KEY, fence, "file", 3),
        lambda: ledger.refund_attempt(KEY, fence, "file"),  # the endpoint's fault: given back
        lambda: ledger.refund_attempt(KEY, fence, "file"),  # once only
        lambda: ledger.begin_attempt(KEY, fence, "file", 3),
        lambda: ledger.record_step(KEY, fence, "summarize", {"output": {"summary": "s"}, "digest": "d1"}),
        lambda: ledger.refund_attempt(KEY, fence, "summarize"),  # answered: nothing to give back
        lambda: ledger.begin_attempt(KEY, stale, "file", 3),
        lambda: ledger.end_attempt(KEY, stale, "file"),
        lambda: ledger.refund_attempt(KEY, stale, "file"),
        lambda: ledger.record_step(KEY, stale, "route", {"output": {}}),
        lambda: ledger.heartbeat(KEY, fence),
        lambda: ledger.heartbeat(KEY, stale),
        lambda: effects.first(KEY, fence, "r:file:1", {"calls": [{"id": "c1"}], "fence": fence}, {"topic": "t"}),
        lambda: effects.first(KEY, fence, "r:file:1", {"calls": [], "fence": fence}),  # the first one stays
        lambda: effects.first(KEY, fence, "c:file:1", call_record("intent")),
        lambda: effects.first(KEY, fence, "c:file:2", call_record("invalid", result={"error": "no"})),
        lambda: effects.first(KEY, stale, "c:file:3", call_record("intent")),
        lambda: effects.done(KEY, stale, "c:file:1", call_record("done", "executed", {"id": 1}), audit),
        lambda: effects.done(KEY, fence, "c:file:1", call_record("done", "executed", {"id": 1}), audit),
        lambda: effects.done(KEY, fence, "c:file:1", call_record("done", "executed", {"id": 2}), audit),
    ):
        trace.append(await outcome(op))
    trace += [await ledger.steps(KEY), await effects.journal(KEY), await effects.audit(KEY),
              await effects.audit(KEY, 2)]
    return trace


def test_the_stand_in_answers_as_the_redis_ledger(redis_url: str) -> None:
    async def on_redis() -> list[Any]:
        client = connect(redis_url)
        try:
            ledger = Ledger(client, keys=Keys(f"m{uuid.uuid4().hex[:8]}"), lease_ms=60_000, ttl_s=600)
            claim = await ledger.claim(KEY, "sha256:fp", "w1", "support_ticket")
            assert (claim.decision, claim.fence) == ("claimed", 1)
            return await script(ledger, claim.fence)
        finally:
            await close(client)

    async def in_memory() -> list[Any]:
        ledger = MemoryLedger()
        return await script(ledger, ledger.claim(KEY))

    redis_trace, memory_trace = asyncio.run(on_redis()), asyncio.run(in_memory())

    assert memory_trace == redis_trace
    # and the script exercised what it says: exhaustion, a refund, a stale fence, an illegal move
    assert ("AttemptsExhausted", 2) in redis_trace and ("StaleFence",) in redis_trace
    assert ("IllegalTransition",) in redis_trace
    assert [entry["accepted"] for entry in redis_trace[-2]] == [False, True, False]
