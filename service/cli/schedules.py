"""``agent-service schedule list|show``: the deployment's schedules and where each stands in the ledger.

The schedules are the ones this process's settings declare (``AGENT_SCHEDULER__SCHEDULES`` and the
kinds file's, each of a kind the settings load); each is read from the ledger the way
``GET /schedules`` reads it (:func:`service.api.schedules.schedule_view`): its last slot, the
slots produced and skipped, the next slot and its fire time, and how late that slot is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime

from service.agents.loading import AgentsNotLoaded, agents_from_settings, schedules_from_settings
from service.api.schedules import ScheduleView, schedule_views
from service.cli.admin import format_table
from service.cli.base import PROG, open_ledger
from service.core.schedule_spec import ScheduleSpec
from service.core.settings import Settings

HEADER = ["NAME", "KIND", "WHEN", "CATCH_UP", "LAST", "PRODUCED", "SKIPPED", "NEXT_FIRE", "LATE_S", "HOLDER"]


def _views(settings: Settings, specs: list[ScheduleSpec]) -> list[ScheduleView]:
    async def read() -> list[ScheduleView]:
        async with open_ledger(settings) as ledger:
            return await schedule_views(ledger, specs, datetime.now(UTC))

    return asyncio.run(read())


def _when(view: ScheduleView) -> str:
    clock = f"every {view.every_s}s" if view.every_s is not None else f"{view.cron} {view.timezone}"
    return clock + (f" ~{view.jitter_s:g}s" if view.jitter_s else "")


def _row(view: ScheduleView) -> list[str]:
    catch_up = f"all<={view.max_catch_up}" if view.catch_up == "all" else view.catch_up
    return [view.name, view.kind, _when(view), catch_up, view.last or "-", str(view.produced), str(view.skipped),
            view.next_fire or "-", f"{view.late_s:g}", view.holder or "-"]


def _declared(settings: Settings) -> list[ScheduleSpec] | None:
    try:
        return schedules_from_settings(settings, agents_from_settings(settings))
    except AgentsNotLoaded as exc:
        print(f"{PROG}: schedules not loaded: {exc}", file=sys.stderr)
        return None


def schedule_list(settings: Settings, args: argparse.Namespace) -> int:
    specs = _declared(settings)
    if specs is None:
        return 2
    views = _views(settings, specs)
    if args.json:
        print(json.dumps([v.model_dump(mode="json") for v in views], indent=2, ensure_ascii=False))
        return 0
    if not views:
        print("no schedules (declare them in the kinds file or AGENT_SCHEDULER__SCHEDULES)")
        return 0
    print(format_table([_row(v) for v in views], HEADER))
    return 0


def schedule_show(settings: Settings, args: argparse.Namespace) -> int:
    specs = _declared(settings)
    if specs is None:
        return 2
    chosen = [s for s in specs if s.name == args.name]
    if not chosen:
        print(f"unknown schedule {args.name!r}", file=sys.stderr)
        return 1
    view = _views(settings, chosen)[0]
    if args.json:
        print(view.model_dump_json(indent=2))
        return 0
    data = view.model_dump(mode="json")
    width = max(len(k) for k in data)
    for key, value in data.items():
        print(f"{key.ljust(width)}  {'-' if value is None else value}")
    return 0
