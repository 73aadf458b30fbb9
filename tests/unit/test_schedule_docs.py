"""docs/AGENTS.md's "Schedules" section says what the code does: its kinds-file schedule is the one in
docs/examples/kinds.toml (and kinds.yaml), its settings JSON declares the same schedule, the task it
shows is the one that slot becomes, its Python kind accepts the input its schedule renders, and the
catch-up table is what one tick selects."""

from __future__ import annotations

import json
import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from service.agents.declared import load_schedules
from service.agents.registry import default_agents
from service.core.schedule_spec import ScheduleSpec, due, parse_slot

REPO = Path(__file__).resolve().parents[2]
AGENTS_MD = REPO / "docs" / "AGENTS.md"
EXAMPLES = REPO / "docs" / "examples"


def section() -> str:
    text = AGENTS_MD.read_text()
    start = text.index("\n## Schedules\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), re.S)


def settings_json(name: str) -> dict[str, Any]:
    for found in re.findall(r"AGENT_SCHEDULER__SCHEDULES='(\[.*?\])'", section()):
        for spec in json.loads(found):
            if spec["name"] == name:
                return dict(spec)
    raise AssertionError(f"no AGENT_SCHEDULER__SCHEDULES of {name} in the Schedules section")


def test_the_kinds_file_example_and_the_settings_json_declare_the_same_schedule() -> None:
    (from_toml,) = load_schedules(EXAMPLES / "kinds.toml")
    (from_yaml,) = load_schedules(EXAMPLES / "kinds.yaml")
    (shown,) = tomllib.loads(blocks("toml")[0])["schedules"]
    assert from_toml == from_yaml == ScheduleSpec.model_validate(shown)
    assert ScheduleSpec.model_validate(settings_json(from_toml.name)) == from_toml
    assert blocks("toml")[0].strip() in (EXAMPLES / "kinds.toml").read_text()


def test_the_task_shown_is_the_one_the_slot_becomes_and_its_kind_accepts_it() -> None:
    (spec,) = load_schedules(EXAMPLES / "kinds.toml")
    task = next(json.loads(b) for b in blocks("json") if '"task_id"' in b and '"deadline"' in b)
    slot = parse_slot(task["task_id"].partition("@")[2])
    assert json.loads(spec.task_value(slot, slot)) == task
    assert task["task_id"] == "nightly-report@2026-12-06T01:00:00Z"
    assert slot.astimezone(ZoneInfo(spec.timezone)).hour == 2
    default_agents().get(spec.kind).parse_input(task["input"])
    jitter = spec.jitter_ms(slot)
    assert f"the delay is {jitter / 1000:g} s" in section()


def test_the_python_kind_accepts_what_its_schedule_renders() -> None:
    (code,) = blocks("python")
    scope: dict[str, Any] = {"__name__": "digest_agents"}
    exec(compile(code, "docs/AGENTS.md", "exec"), scope)  # noqa: S102 - the documented example, as written
    (agent,) = scope["agents"]()
    spec = ScheduleSpec.model_validate(settings_json("support-digest"))
    assert agent.kind == spec.kind == "team_digest"
    slot = spec.next_slot(datetime(2026, 12, 4, 8, tzinfo=UTC))
    assert slot is not None
    parsed = agent.parse_input(spec.render(slot))
    assert (parsed.team, parsed.day, parsed.slot) == ("support", "2026-12-07", "2026-12-07T07:00:00Z")


def test_the_catch_up_table_is_what_a_tick_selects() -> None:
    last, now = datetime(2026, 12, 6, 1, tzinfo=UTC), datetime(2026, 12, 6, 6, 20, tzinfo=UTC)
    rows = {}
    for policy in ("all", "latest", "none"):
        spec = ScheduleSpec(name="h", kind="summarize", every_s=3600, catch_up=policy, max_catch_up=3)
        chosen = due(spec, last, now)
        rows[policy] = ([s.strftime("%H:%M") for s in chosen.produce], chosen.skipped)
    assert rows == {"all": (["04:00", "05:00", "06:00"], 2), "latest": (["06:00"], 4), "none": ([], 5)}
    assert "down from 01:10 to 06:20" in section()
