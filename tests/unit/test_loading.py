"""The service's registry: built-in kinds, entry points, AGENT_AGENTS and a kinds file, each kind with
its source; whatever cannot load stops the start with a message naming where it came from."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.agents import loading
from service.agents.declared import DeclaredAgent
from service.agents.loading import AgentsNotLoaded, describe, load_agents
from service.cli.main import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "kinds.toml"
BUILT_IN = {"classify", "extract", "prior_auth", "review", "review_critique", "review_panel", "review_research",
            "review_summary", "summarize", "summarize_long"}

USER_MODULE = '''
from typing import Any
from pydantic import BaseModel
from service.sdk import Agent, Step, StrictInput, system_message, user_message


class In(StrictInput):
    text: str


class Out(BaseModel):
    answer: str


class Answer(Step):
    name, prompt_version, output_model = "answer", "answer-v1", Out

    def messages(self, task_input: Any, previous: Any) -> Any:
        return [system_message("Answer."), user_message(task_input.text)]


class Loop(Step):
    name, prompt_version, output_model, needs = "loop", "loop-v1", Out, ("answer",)


one = Agent("echo_one", In, (Answer(),))
several = [Agent("echo_a", In, (Answer(),)), Agent("echo_b", In, (Answer(),))]


def made() -> Agent:
    return Agent("echo_made", In, (Answer(),))


def cyclic() -> Agent:
    looping = Answer()
    looping.needs = ("loop",)
    return Agent("echo_cycle", In, (looping, Loop()))


def raising() -> Agent:
    raise RuntimeError("no database")


clash = Agent("classify", In, (Answer(),))
not_an_agent = 42
mixed = [one, "echo"]
bad_name = Agent("Echo", In, (Answer(),))
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"user_agents_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / f"{name}_broken.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, f"{name}_broken"):
        sys.modules.pop(mod, None)


def test_the_built_in_kinds_and_the_installed_entry_point() -> None:
    registry = load_agents()
    assert BUILT_IN | {"ticket_triage"} <= set(registry.kinds())
    assert registry.source("classify") == "built-in"
    source = registry.source("ticket_triage")
    assert source.startswith("entry point ticket_triage = sample_agents:agents of sample-agents ")
    triage = registry.get("ticket_triage")
    assert [s.name for s in triage.steps] == ["summarize", "route"] and triage.graph["route"] == ("summarize",)


@pytest.mark.parametrize(("attribute", "kinds"), [
    ("one", ["echo_one"]), ("several", ["echo_a", "echo_b"]), ("made", ["echo_made"]),
])
def test_agent_agents_takes_an_agent_an_iterable_or_a_callable(user_module: str, attribute: str,
                                                                kinds: list[str]) -> None:
    registry = load_agents(spec=f"{user_module}:{attribute}", entry_points=False)
    assert set(registry.kinds()) == BUILT_IN | set(kinds)
    assert all(registry.source(k) == f"AGENT_AGENTS {user_module}:{attribute}" for k in kinds)


def test_several_specs_separated_by_commas(user_module: str) -> None:
    registry = load_agents(spec=f"{user_module}:one, {user_module}:made", entry_points=False)
    assert {"echo_one", "echo_made"} <= set(registry.kinds())


@pytest.mark.parametrize(("attribute", "message"), [
    ("cyclic", "AGENT_AGENTS {m}:cyclic: agent 'echo_cycle': its steps form a cycle"),
    ("raising", "AGENT_AGENTS {m}:raising: calling it raised RuntimeError: no database"),
    ("clash", "kind 'classify' is registered twice: by built-in and by AGENT_AGENTS {m}:clash"),
    ("not_an_agent", "AGENT_AGENTS {m}:not_an_agent: expected an Agent, an iterable of Agents or a callable "
                     "returning either, got int"),
    ("mixed", "AGENT_AGENTS {m}:mixed: expected an Agent, got str"),
    ("bad_name", "AGENT_AGENTS {m}:bad_name: kind 'Echo' is not a kind name"),
    ("absent", "AGENT_AGENTS {m}:absent: {m} has no attribute absent"),
])
def test_an_agent_agents_error_names_its_source(user_module: str, attribute: str, message: str) -> None:
    with pytest.raises(AgentsNotLoaded) as err:
        load_agents(spec=f"{user_module}:{attribute}", entry_points=False)
    assert message.format(m=user_module) in str(err.value)


def test_a_module_that_does_not_import(user_module: str) -> None:
    with pytest.raises(AgentsNotLoaded, match=f"AGENT_AGENTS {user_module}_broken:x: cannot import "
                                              f"{user_module}_broken: ModuleNotFoundError"):
        load_agents(spec=f"{user_module}_broken:x", entry_points=False)


def test_a_spec_without_an_attribute() -> None:
    with pytest.raises(AgentsNotLoaded, match="AGENT_AGENTS mypkg.agents: expected package.module:attribute"):
        load_agents(spec="mypkg.agents", entry_points=False)


def _entry_points(monkeypatch: pytest.MonkeyPatch, *values: str) -> None:
    eps = [importlib.metadata.EntryPoint(name=f"ep{i}", value=v, group=loading.ENTRY_POINT_GROUP)
           for i, v in enumerate(values)]
    monkeypatch.setattr(loading.importlib.metadata, "entry_points", lambda group: eps)


def test_an_entry_point_that_does_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, "no_such_package_here.agents:all")
    with pytest.raises(AgentsNotLoaded, match="entry point ep0 = no_such_package_here.agents:all: cannot load it: "
                                              "ModuleNotFoundError"):
        load_agents()


def test_two_entry_points_with_one_kind_name_both(user_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, f"{user_module}:one", f"{user_module}:one")
    with pytest.raises(AgentsNotLoaded, match=f"kind 'echo_one' is registered twice: by entry point ep0 = "
                                              f"{user_module}:one and by entry point ep1 = {user_module}:one"):
        load_agents()


def test_a_kinds_file_loads_after_the_rest_and_its_errors_name_the_file(tmp_path: Path) -> None:
    registry = load_agents(kinds_file=EXAMPLE)
    assert isinstance(registry.get("support_reply"), DeclaredAgent)
    assert registry.source("support_reply") == f"kinds file {EXAMPLE}"
    broken = tmp_path / "kinds.toml"
    broken.write_text(EXAMPLE.read_text().replace('version = "v1"', 'version = ""'))
    with pytest.raises(AgentsNotLoaded, match=f"{broken}: kind 'support_reply': version: '' is not a version"):
        load_agents(kinds_file=broken)
    clash = tmp_path / "clash.toml"
    clash.write_text(EXAMPLE.read_text().replace('name = "support_reply"', 'name = "ticket_triage"'))
    with pytest.raises(AgentsNotLoaded, match=f"kind 'ticket_triage' is registered twice: by entry point "
                                              f"ticket_triage = sample_agents:agents of sample-agents .* and by "
                                              f"kinds file {clash}"):
        load_agents(kinds_file=clash)


# ---------------------------------------------------------------------------- agent-service kinds


def _settings_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for name in ("AGENT_AGENTS", "AGENT_KINDS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_kinds_prints_every_kind_with_source_steps_versions_and_input_schema(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _settings_env(monkeypatch, AGENT_KINDS_FILE=str(EXAMPLE))
    assert main(["kinds"]) == 0
    out = capsys.readouterr().out
    blocks = {block.split()[0]: block for block in out.strip().split("\n\n")}
    assert BUILT_IN | {"ticket_triage", "support_reply"} == set(blocks)
    triage = blocks["ticket_triage"].splitlines()
    assert triage[0].startswith("ticket_triage  (entry point ticket_triage = sample_agents:agents")
    assert triage[2].split() == ["summarize", "needs:", "-", "prompt:", "triage-summarize-v1"]
    assert triage[3].split() == ["route", "needs:", "summarize", "prompt:", "triage-route-v1", "temperature:", "0.0"]
    assert triage[4] == "  input schema:" and '"subject"' in blocks["ticket_triage"]
    reply = blocks["support_reply"].splitlines()
    assert reply[0] == f"support_reply  (kinds file {EXAMPLE})  version v1"
    assert reply[3].split()[:5] == ["reply", "needs:", "facts", "prompt:", "v1"]


def test_kinds_json_is_machine_readable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _settings_env(monkeypatch, AGENT_KINDS_FILE=str(EXAMPLE))
    assert main(["kinds", "--json"]) == 0
    items = {item["kind"]: item for item in json.loads(capsys.readouterr().out)}
    reply: dict[str, Any] = items["support_reply"]
    assert reply["source"] == f"kinds file {EXAMPLE}" and reply["version"] == "v1"
    assert reply["definition_digest"].startswith("sha256:")
    assert reply["prompt_version"] == "facts@v1+reply@v1"
    assert reply["steps"] == [
        {"name": "facts", "needs": [], "prompt_version": "v1", "temperature": 0.0},
        {"name": "reply", "needs": ["facts"], "prompt_version": "v1", "temperature": 0.4},
    ]
    assert reply["input_schema"]["required"] == ["customer", "message", "product"]
    assert items["classify"]["source"] == "built-in"
    assert items["classify"]["input_schema"]["properties"]["labels"]["type"] == "array"
    assert items == {i["kind"]: i for i in describe(load_agents(kinds_file=EXAMPLE))}


def test_kinds_with_an_agent_that_cannot_load_exits_2_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "kinds.yaml"
    broken.write_text("kinds:\n  - name: x\n    version: v1\n")
    _settings_env(monkeypatch, AGENT_KINDS_FILE=str(broken))
    assert main(["kinds"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"agent-service: agents not loaded: {broken}: kind 'x': input_schema: ")
