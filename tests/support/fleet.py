"""Helpers of the delegation tests: a deployment's settings, a service run as ``agent-service run``
runs it (consumer, sweeper, approvals and replies consumers), and the ledger read from outside."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from dedup.records import TaskRecord
from service.core.settings import Settings
from service.runtime.wiring import Service, build, ensure_topics
from tests.support import wait_for

# where a task ends: a task whose deadline passed before it started (or before its resumption) is
# released ``failed`` with its dead letter ``expired``, so the same work sent again later may run
ENDED = ("succeeded", "dead", "failed")


def deployment(make_settings: Any, name: str, *, key_prefix: str | None = None, **overrides: Any) -> Settings:
    """A deployment of its own: input, results, dead-letter, audit, approvals and replies topics, a
    consumer group and (unless ``key_prefix`` shares another's) a ledger prefix."""
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    kafka = {"group_id": f"g-{tag}", "input_topic": f"t-{tag}.tasks", "results_topic": f"t-{tag}.results",
             "dlq_topic": f"t-{tag}.dlq", "audit_topic": f"t-{tag}.audit", "approvals_topic": f"t-{tag}.approvals",
             "replies_topic": f"t-{tag}.replies", **overrides.pop("kafka", {})}
    redis = {"key_prefix": key_prefix or f"t{tag}", **overrides.pop("redis", {})}
    tools = {"sweep_interval_s": 0.5, **overrides.pop("tools", {})}
    s: Settings = make_settings(kafka=kafka, redis=redis, tools=tools, worker_id=f"w-{tag}", **overrides)
    return s


def replying_to(s: Settings, *parents: Settings) -> Settings:
    """``s`` allowed to reply to the parents' deployments (``AGENT_DELEGATION__REPLY_TOPICS``): a child
    replies only to its own deployment's replies topic or one named there."""
    topics = tuple(p.kafka.replies_topic for p in parents)
    return s.model_copy(update={"delegation": s.delegation.model_copy(update={"reply_topics": topics})})


@contextlib.asynccontextmanager
async def serving(settings: Settings, llm_base_url: str, **kwargs: Any) -> AsyncIterator[Service]:
    """``Service.run`` in this process, as the CLI runs it, until the block ends (then it drains)."""
    await asyncio.to_thread(ensure_topics, settings)
    service = build(settings, llm_base_url=llm_base_url, **kwargs)
    task = asyncio.create_task(service.run(http=False))
    try:
        await wait_for(lambda: service.runner.assignment or task.done(), 60, what="partition assignment")
        if task.done():
            task.result()
        yield service
    finally:
        service.runner.stop()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def ledger_of(settings: Settings) -> AsyncIterator[Ledger]:
    client = connect(settings.redis.url.get_secret_value())
    try:
        yield Ledger(client, keys=Keys(settings.redis.key_prefix), lease_ms=settings.ledger.lease_ms)
    finally:
        await close(client)


async def records(ledger: Ledger, ids: Iterable[str]) -> dict[str, TaskRecord | None]:
    return {t: await ledger.get(t) for t in ids}


async def states(ledger: Ledger, ids: Iterable[str]) -> dict[str, str]:
    return {t: (r.state if r is not None else "missing") for t, r in (await records(ledger, ids)).items()}


async def wait_ended(ledger: Ledger, ids: list[str], timeout_s: float = 90.0, what: str = "every task") -> None:
    async def ended() -> bool:
        return all(state in ENDED for state in (await states(ledger, ids)).values())

    try:
        await wait_for(ended, timeout_s, interval_s=0.2, what=what)
    except AssertionError as exc:  # say where each task stands
        raise AssertionError(f"{exc}: {await states(ledger, ids)}") from None


def dead_reason(record: TaskRecord | None) -> str | None:
    return None if record is None else record.fields.get("dead_reason")


def ending(record: TaskRecord | None) -> str | None:
    """``succeeded``, ``dead(<reason>)``, ``expired`` (released ``failed`` past its deadline) or the state."""
    if record is None:
        return None
    if record.state == "dead":
        return f"dead({dead_reason(record)})"
    if record.state == "failed" and "deadline passed" in (record.fields.get("error") or ""):
        return "expired"
    return record.state
