"""Schedules declared in the kinds file beside its kinds (top-level ``schedules``): parsed as
:class:`ScheduleSpec`, every mistake named by file and ``schedules[i].<field>``, refused by whoever
loads the file; merged with ``AGENT_SCHEDULER__SCHEDULES`` with a name declared once, each of a
kind the deployment runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.agents.declared import KindsFileError, load_kinds_file, load_schedules
from service.agents.loading import AgentsNotLoaded, all_schedules, load_agents, schedules_from_settings
from service.core.schedule_spec import ScheduleSpec
from service.core.settings import Settings

KINDS = [{
    "name": "digest", "version": "v1",
    "input_schema": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
    "steps": [{"name": "summary", "prompt": "Summarise: {text}",
               "output_schema": {"type": "object", "properties": {"summary": {"type": "string"}}}}],
}]

TOML = '''
[[kinds]]
name = "digest"
version = "v1"
input_schema = { type = "object", required = ["text"], properties = { text = { type = "string" } } }

[[kinds.steps]]
name = "summary"
prompt = "Summarise: {text}"
output_schema = { type = "object", properties = { summary = { type = "string" } } }

[[schedules]]
name = "nightly-report"
kind = "digest"
cron = "0 2 * * *"
timezone = "Europe/Paris"
input = { text = "Summarise the day before {slot_date}" }
jitter_s = 300
catch_up = "all"
max_catch_up = 24

[[schedules]]
name = "heartbeat"
kind = "summarize"
every_s = 600
'''


def write(tmp_path: Path, data: Any, name: str = "kinds.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_a_toml_kinds_file_declares_schedules_beside_its_kinds(tmp_path: Path) -> None:
    path = write(tmp_path, TOML, "kinds.toml")
    assert [a.kind for a in load_kinds_file(path)] == ["digest"]  # the kinds load as before
    nightly, heartbeat = load_schedules(path)
    assert nightly == ScheduleSpec(name="nightly-report", kind="digest", cron="0 2 * * *", timezone="Europe/Paris",
                                   input={"text": "Summarise the day before {slot_date}"}, jitter_s=300,
                                   catch_up="all", max_catch_up=24)
    assert (heartbeat.name, heartbeat.every_s, heartbeat.kind) == ("heartbeat", 600, "summarize")


def test_a_kinds_file_without_schedules_has_none(tmp_path: Path) -> None:
    path = write(tmp_path, {"kinds": KINDS})
    assert load_schedules(path) == [] and len(load_kinds_file(path)) == 1
    assert load_schedules(write(tmp_path, {"kinds": KINDS, "schedules": []})) == []


BAD: list[tuple[str, Any, str]] = [
    ("not a list", {"every_s": 60}, "kinds.yaml: schedules: expected a list of schedules"),
    ("an entry not a table", ["nightly"], "kinds.yaml: schedules[0]: expected a table"),
    ("a cron refused", [{"name": "n", "kind": "digest", "cron": "0 25 * * *"}],
     "kinds.yaml: schedules[0].cron: schedule 'n': cron: '0 25 * * *'"),
    ("an unknown field", [{"name": "n", "kind": "digest", "every_s": 60, "evry": 1}],
     "kinds.yaml: schedules[0].evry: Extra inputs are not permitted"),
    ("an unknown placeholder", [{"name": "n", "kind": "digest", "every_s": 60, "input": {"t": "{today}"}}],
     "kinds.yaml: schedules[0].input: schedule 'n': input.t: the placeholder {today} is not one of"),
    ("no clock", [{"name": "n", "kind": "digest"}], "kinds.yaml: schedules[0]: schedule 'n': cron, every_s: exactly one"),
    ("a name twice", [{"name": "n", "kind": "digest", "every_s": 60}, {"name": "n", "kind": "digest", "every_s": 5}],
     "kinds.yaml: schedules[1].name: 'n' is declared twice (schedules[0] and schedules[1])"),
]


@pytest.mark.parametrize(("schedules", "expected"), [(s, e) for _, s, e in BAD], ids=[i for i, _, _ in BAD])
def test_a_schedule_the_service_cannot_run_refuses_the_file_naming_the_entry_and_field(
        tmp_path: Path, schedules: Any, expected: str) -> None:
    path = write(tmp_path, {"kinds": KINDS, "schedules": schedules})
    for load in (load_schedules, load_kinds_file):  # whoever loads the file
        with pytest.raises(KindsFileError) as caught:
            load(path)
        assert expected in str(caught.value)
    with pytest.raises(AgentsNotLoaded, match=r"kinds.yaml: schedules"):  # and the service does not start
        load_agents(kinds_file=path, entry_points=False)


def test_a_toml_date_in_the_input_is_refused_as_not_json(tmp_path: Path) -> None:
    path = write(tmp_path, TOML + "input = { day = 2026-12-06 }\n", "kinds.toml")
    with pytest.raises(KindsFileError, match=r"schedules\[1\]\.input: schedule 'heartbeat': input\.day: a date is not"):
        load_schedules(path)


@pytest.mark.parametrize("data", [{"schedules": []}, {"kinds": KINDS, "jobs": []}, ["kinds"]])
def test_other_top_level_keys_are_still_refused(tmp_path: Path, data: Any) -> None:
    path = write(tmp_path, data)
    for load in (load_schedules, load_kinds_file):
        with pytest.raises(KindsFileError, match="expected the top-level key kinds"):
            load(path)


def settings_with(monkeypatch: pytest.MonkeyPatch, schedules: list[dict[str, Any]], kinds_file: Path | None) -> Settings:
    monkeypatch.setenv("AGENT_SCHEDULER__SCHEDULES", json.dumps(schedules))
    if kinds_file is None:
        monkeypatch.delenv("AGENT_KINDS_FILE", raising=False)
    else:
        monkeypatch.setenv("AGENT_KINDS_FILE", str(kinds_file))
    return Settings()


def test_the_settings_and_the_kinds_file_schedules_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, TOML, "kinds.toml")
    settings = settings_with(monkeypatch, [{"name": "hourly", "kind": "classify", "cron": "0 * * * *"}], path)
    registry = load_agents(kinds_file=path, entry_points=False)
    names = [s.name for s in schedules_from_settings(settings, registry)]
    assert names == ["hourly", "nightly-report", "heartbeat"]
    alone = settings_with(monkeypatch, [{"name": "hourly", "kind": "classify", "cron": "0 * * * *"}], None)
    assert [s.name for s in schedules_from_settings(alone, load_agents(entry_points=False))] == ["hourly"]


def test_a_name_declared_in_the_settings_and_the_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, TOML, "kinds.toml")
    settings = settings_with(monkeypatch, [{"name": "heartbeat", "kind": "classify", "every_s": 60}], path)
    with pytest.raises(AgentsNotLoaded, match=r"schedule 'heartbeat' is declared twice \(AGENT_SCHEDULER__SCHEDULES "
                                              r"and kinds file .*kinds\.toml\)"):
        all_schedules(settings, load_schedules(path))
    twice = settings_with(monkeypatch, [{"name": "a", "kind": "classify", "every_s": 60},
                                        {"name": "a", "kind": "extract", "every_s": 60}], None)
    with pytest.raises(AgentsNotLoaded, match="schedule 'a' is declared twice"):
        all_schedules(twice, [])


def test_a_schedule_of_a_kind_the_deployment_does_not_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_with(monkeypatch, [{"name": "orphan", "kind": "translate", "every_s": 60}], None)
    with pytest.raises(AgentsNotLoaded, match="schedule 'orphan': kind 'translate' is not a kind this deployment runs"):
        schedules_from_settings(settings, load_agents(entry_points=False))
