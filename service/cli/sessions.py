"""``agent-service session list|show|delete``: the sessions the ledger keeps (docs/SESSIONS.md).

``list`` prints the most recently changed sessions; ``show`` one session as ``GET /sessions/{id}``
shows it (:func:`service.api.sessions.session_view`), with all its turns; ``delete`` erases it (every
key and its listing), as ``DELETE /sessions/{id}`` does. An id the ledger's keys refuse exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from dedup.keys import is_valid_task_key
from dedup.sessions import SessionRecord
from service.api.sessions import ListedView, SessionView, listed_views, session_view
from service.cli.admin import format_table
from service.cli.base import PROG, open_ledger
from service.core.settings import Settings

__all__ = ["session_delete", "session_list", "session_show"]


def _valid(session_id: str) -> bool:
    if is_valid_task_key(session_id):
        return True
    print(f"{PROG}: invalid session id {session_id[:80]!r}", file=sys.stderr)
    return False


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def session_list(settings: Settings, args: argparse.Namespace) -> int:
    async def read() -> list[ListedView]:
        async with open_ledger(settings) as ledger:
            return await listed_views(ledger, args.limit)

    views = asyncio.run(read())
    if args.json:
        print(json.dumps([v.model_dump(mode="json") for v in views], indent=2, ensure_ascii=False))
    elif not views:
        print("no sessions")
    else:
        print(format_table([[v.id, v.updated] for v in views], ["ID", "UPDATED"]))
    return 0


def _print(view: SessionView) -> None:
    holder = f"{view.holder} (fence {view.holder_fence}, lease until {view.holder_until})" if view.holder else "-"
    summary = f"turns [0, {view.summary.upto}): {view.summary.text}" if view.summary else "-"
    for key, value in (("id", view.id), ("kind", view.kind), ("version", view.version), ("holder", holder),
                       ("queue", " ".join(view.queue) or "-"), ("ttl_s", view.ttl_s), ("summary", summary),
                       ("state", "-" if view.state is None else _json(view.state)), ("turns", view.turns_total)):
        print(f"{key:<8} {value}")
    for number, turn in enumerate(view.turns, start=view.turns_offset):
        print(f"  #{number} {turn.get('task_id', '-')}  at {turn.get('at', '-')}")
        for part in ("input", "result"):
            if part in turn:
                print(f"      {part:<6} {_json(turn[part])}")


def session_show(settings: Settings, args: argparse.Namespace) -> int:
    if not _valid(args.session_id):
        return 1

    async def read() -> SessionRecord | None:
        async with open_ledger(settings) as ledger:
            return await ledger.sessions.get(args.session_id)

    record = asyncio.run(read())
    if record is None:
        print("unknown session", file=sys.stderr)
        return 1
    view = session_view(record)
    if args.json:
        print(view.model_dump_json(indent=2))
    else:
        _print(view)
    return 0


def session_delete(settings: Settings, args: argparse.Namespace) -> int:
    if not _valid(args.session_id):
        return 1

    async def erase() -> bool:
        async with open_ledger(settings) as ledger:
            return await ledger.sessions.delete(args.session_id)

    if not asyncio.run(erase()):
        print("unknown session", file=sys.stderr)
        return 1
    print(f"session {args.session_id} erased: its state, turns, queue and listing")
    return 0
