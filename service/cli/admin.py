"""``agent-service task show|approve|reject|landed|absent|compensate|parked`` and ``agent-service dlq
list|replay``: the ledger, the tasks that act, and the dead letters."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from consumers.producers import Publisher
from dedup.keys import is_valid_task_key
from dedup.ledger import Ledger
from service.agents.loading import agents_from_settings
from service.cli.base import PROG, open_ledger
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.pipeline.base import utcnow
from service.pipeline.dlq import peek, replay
from service.pipeline.parking import Busy, Compensation, Decided, NotDecidable, compensate, decide, side_effects
from service.pipeline.tree import task_tree

T = TypeVar("T")


def task_show(settings: Settings, args: argparse.Namespace) -> int:
    if not is_valid_task_key(args.task_id):
        print(f"{PROG}: invalid task id {args.task_id!r}", file=sys.stderr)
        return 1

    async def show() -> dict[str, Any] | None:
        async with open_ledger(settings) as ledger:
            record = await ledger.get(args.task_id)
            if record is None:
                return None
            return {**record.to_json(), **await side_effects(ledger, args.task_id),
                    **await task_tree(ledger, args.task_id, record.fields)}

    data = asyncio.run(show())
    if data is None:
        print("unknown task", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


def _clip(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    letters = peek(settings.kafka, args.limit, args.partition)
    if args.json:
        print(json.dumps([d.model_dump(mode="json") for d in letters], indent=2, ensure_ascii=False))
        return 0
    if not letters:
        print(f"no dead letters on {settings.kafka.dlq_topic}")
        return 0
    rows = [
        [str(d.partition), str(d.offset), d.reason or "-", d.task_id or "-",
         "-" if d.attempts is None else str(d.attempts), _clip(d.error, 60) or "-"]
        for d in letters
    ]
    print(format_table(rows, ["PARTITION", "OFFSET", "REASON", "TASK_ID", "ATTEMPTS", "ERROR"]))
    return 0


def dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> Any:
        async with open_ledger(settings) as ledger:
            return await replay(settings.kafka, ledger, args.item, set(args.reason) if args.reason else None,
                                args.limit)

    report = asyncio.run(run())
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0
    print(f"replayed {report.replayed}, already succeeded {report.already_succeeded}, "
          f"not found {report.not_found}, failed {report.failed}")
    for item in report.items:
        extra = " (revived)" if item.revived else ""
        detail = f": {item.detail}" if item.detail else ""
        print(f"  {item.partition}:{item.offset} {item.decision} task_id={item.task_id or '-'}{extra}{detail}")
    return 0


@contextlib.asynccontextmanager
async def _acting(settings: Settings) -> AsyncIterator[tuple[Ledger, Publisher]]:
    """The ledger and a producer: a decision or a compensation resumes the task through its topic."""
    publisher = Publisher(settings.kafka.producer_config())
    try:
        async with open_ledger(settings) as ledger:
            yield ledger, publisher
    finally:
        publisher.close()


def _valid(task_id: str) -> bool:
    if is_valid_task_key(task_id):
        return True
    print(f"{PROG}: invalid task id {task_id!r}", file=sys.stderr)
    return False


def _acted(run: Callable[[], Coroutine[Any, Any, T]], refused: type[Exception]) -> T | None:
    """What ``run`` returns; None when the task is unknown or the action is ``refused`` (said on stderr)."""
    try:
        return asyncio.run(run())
    except KeyError:
        print("unknown task", file=sys.stderr)
    except refused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
    return None


def task_decide(settings: Settings, args: argparse.Namespace) -> int:
    """``task approve`` / ``task reject`` / ``task landed`` / ``task absent``."""
    if not _valid(args.task_id):
        return 1
    result = json.loads(args.result) if getattr(args, "result", None) else None

    async def run() -> Decided:
        async with _acting(settings) as (ledger, publisher):
            return await decide(ledger, publisher.send, Metrics(CollectorRegistry()), utcnow(), args.task_id,
                                args.decision, by=args.by, reason=args.reason, result=result,
                                audit_topic=settings.kafka.audit_topic)

    done = _acted(run, NotDecidable)
    if done is None:
        return 1
    if done.status == "resumed_again":
        print(f"task {done.task_id} was decided before ({done.decision}); its resumption was produced again")
    else:
        print(f"task {done.task_id}: {done.decision}; resuming")
    return 0


def task_compensate(settings: Settings, args: argparse.Namespace) -> int:
    if not _valid(args.task_id):
        return 1

    async def run() -> Compensation:
        async with _acting(settings) as (ledger, publisher):
            return await compensate(ledger, agents_from_settings(settings), publisher.send,
                                    Metrics(CollectorRegistry()), utcnow, args.task_id, by=args.by,
                                    rerun=args.rerun, audit_topic=settings.kafka.audit_topic)

    report = _acted(run, Busy)
    if report is None:
        return 1
    print(json.dumps(vars(report), indent=2, ensure_ascii=False))
    return 2 if report.failed else 0


def task_parked(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> list[list[str]]:
        rows = []
        async with open_ledger(settings) as ledger:
            for task_key, deadline in await ledger.effects.parked(limit=args.limit):
                record = await ledger.get(task_key)
                if record is None or record.state != "waiting_approval":
                    continue
                waiting = json.loads(record.fields.get("waiting", "{}"))
                rows.append([task_key, waiting.get("what", "-"), waiting.get("tool", "-"), waiting.get("key", "-"),
                             _clip(waiting.get("reason"), 50),
                             datetime.fromtimestamp(deadline / 1000, UTC).isoformat(timespec="seconds")])
        return rows

    rows = asyncio.run(run())
    if not rows:
        print("no parked tasks")
        return 0
    print(format_table(rows, ["TASK_ID", "WAITS_FOR", "TOOL", "KEY", "REASON", "DEADLINE"]))
    return 0
