"""Kinds declared in a file: every mistake named by file, kind and field; TOML and YAML alike; the
example in docs/examples loads; a declared kind's steps render, check and refuse like any other."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.agents.base import Agent
from service.agents.declared import DeclaredAgent, DeclaredStep, KindsFileError, load_kinds_file
from service.core.errors import InvalidOutput, PoisonError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_TOML = REPO / "docs" / "examples" / "kinds.toml"
EXAMPLE_YAML = REPO / "docs" / "examples" / "kinds.yaml"

OBJECT = {"type": "object", "required": ["summary"], "properties": {"summary": {"type": "string"}}}
VALID: dict[str, Any] = {"kinds": [{
    "name": "triage",
    "version": "v1",
    "input_schema": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
    "steps": [
        {"name": "summary", "prompt": "Summarise: {text}", "output_schema": OBJECT},
        {"name": "label", "prompt": "Label this summary: {summary}", "needs": ["summary"],
         "output_schema": {"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
                           "required": ["label"]},
         "model": "small", "temperature": 0.2},
    ],
}]}


def write(tmp_path: Path, data: Any, name: str = "kinds.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    edit(data["kinds"][0])
    return data


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets ``a.b.0.c`` in a kind (``value`` ... deletes it)."""
    def edit(kind: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = kind
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is ...:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return edit


ERRORS = [
    ("unknown placeholder", _set("steps.1.prompt", "Label {summary} as {topic}"),
     "kinds.yaml: kind 'triage': steps[1].prompt: placeholder {topic} is neither an input field nor a needed step"),
    ("placeholder of a step not needed", _set("steps.1.needs", []),
     "kind 'triage': steps[1].prompt: placeholder {summary} is neither an input field nor a needed step "
     "(add it to steps[1].needs)"),
    ("placeholder in the system prompt", _set("steps.0.system", "You are {role}."),
     "kind 'triage': steps[0].system: placeholder {role} is neither"),
    ("placeholder with a conversion", _set("steps.0.prompt", "Summarise {text!r}"),
     "kind 'triage': steps[0].prompt: placeholder {text!r} is not a name"),
    ("placeholder with an attribute", _set("steps.0.prompt", "Summarise {text.upper}"),
     "kind 'triage': steps[0].prompt: placeholder {text.upper} is not a name"),
    ("unbalanced brace", _set("steps.0.prompt", "Summarise {text"),
     "kind 'triage': steps[0].prompt: "),
    ("empty prompt", _set("steps.0.prompt", " "), "kind 'triage': steps[0].prompt: expected a non-empty string"),
    ("missing prompt", _set("steps.0.prompt", ...), "kind 'triage': steps[0].prompt: expected a non-empty string"),
    ("invalid output schema", _set("steps.0.output_schema", {"type": "objekt"}),
     "kind 'triage': steps[0].output_schema: not a valid JSON Schema"),
    ("output schema of a string", _set("steps.0.output_schema", {"type": "string"}),
     "kind 'triage': steps[0].output_schema: must have \"type\": \"object\" (found 'string')"),
    ("missing output schema", _set("steps.1.output_schema", ...),
     "kind 'triage': steps[1].output_schema: missing or not a table"),
    ("invalid input schema", _set("input_schema", {"type": "object", "properties": {"text": {"type": 5}}}),
     "kind 'triage': input_schema: not a valid JSON Schema"),
    ("input schema not of an object", _set("input_schema", {"type": "array"}),
     "kind 'triage': input_schema: must have \"type\": \"object\""),
    ("unknown need", _set("steps.1.needs", ["summary", "nope"]), "kind 'triage': steps[1].needs: unknown step 'nope'"),
    ("needs not a list", _set("steps.1.needs", "summary"), "kind 'triage': steps[1].needs: expected a list"),
    ("a cycle", _set("steps.0.needs", ["label"]),
     "kind 'triage': needs: its steps form a cycle: "),
    ("version missing", _set("version", ...), "kind 'triage': version: missing"),
    ("version not a string", _set("version", 1), "kind 'triage': version: 1 is not a version"),
    ("version with a brace", _set("version", "v{1}"), "kind 'triage': version: 'v{1}' is not a version"),
    ("temperature too high", _set("steps.1.temperature", 3), "kind 'triage': steps[1].temperature: 3 is not a number "
                                                              "from 0 to 2"),
    ("temperature negative", _set("steps.1.temperature", -0.1), "steps[1].temperature: -0.1 is not a number"),
    ("temperature a string", _set("steps.1.temperature", "hot"), "steps[1].temperature: 'hot' is not a number"),
    ("model empty", _set("steps.1.model", ""), "kind 'triage': steps[1].model: expected a model name"),
    ("unknown step field", _set("steps.0.promt", "x"), "kind 'triage': steps[0].promt: unknown field"),
    ("unknown kind field", _set("inputs", {}), "kind 'triage': inputs: unknown field"),
    ("a step named twice", _set("steps.1.name", "summary"), "kind 'triage': steps[1].name: step 'summary' is declared "
                                                            "twice"),
    ("a step named like an input field", _set("steps.0.name", "text"),
     "kind 'triage': steps[0].name: 'text' is also an input field"),
    ("a step name with a space", _set("steps.0.name", "sum up"), "kind 'triage': steps[0].name: 'sum up' is not a "
                                                                 "step name"),
    ("no steps", _set("steps", []), "kind 'triage': steps: expected a non-empty list"),
    ("a kind name in capitals", _set("name", "Triage"), "kinds.yaml: kinds[0]: name: 'Triage' is not a kind name"),
]


@pytest.mark.parametrize(("case", "edit", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_each_error_names_the_file_the_kind_and_the_field(
    tmp_path: Path, case: str, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    path = write(tmp_path, changed(edit))
    with pytest.raises(KindsFileError) as err:
        load_kinds_file(path)
    assert str(err.value).startswith(str(path) + ": ")
    assert message in str(err.value)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("kinds.toml", "[[kinds]\nname = 1", "kinds.toml: not valid TOML: "),
    ("kinds.yaml", "kinds: [", "kinds.yaml: not valid YAML: "),
    ("kinds.json", "{}", "kinds.json: unknown format .json: name it .toml, .yaml or .yml"),
    ("kinds.yaml", "kind: []", "kinds.yaml: expected the top-level key kinds"),
    ("kinds.yaml", "kinds: []", "kinds.yaml: kinds: expected a non-empty list"),
    ("kinds.yaml", "kinds: [3]", "kinds.yaml: kinds[0]: kind: expected a table"),
])
def test_a_file_that_is_not_a_kinds_file(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(KindsFileError, match="^" + str(tmp_path).replace("\\", "\\\\")) as err:
        load_kinds_file(write(tmp_path, text, name))
    assert message in str(err.value)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KindsFileError, match="cannot read"):
        load_kinds_file(tmp_path / "absent.toml")


def test_a_kind_declared_twice(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["kinds"].append(copy.deepcopy(data["kinds"][0]))
    with pytest.raises(KindsFileError, match=r"kind 'triage' is declared twice \(kinds\[0\] and kinds\[1\]\)"):
        load_kinds_file(write(tmp_path, data))


def test_a_new_version_in_rollout_becomes_the_candidate_of_the_current_one(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    new = copy.deepcopy(data["kinds"][0])
    new["version"], new["rollout_share"] = "v2", 0.25
    data["kinds"].insert(0, new)  # in any order
    (agent,) = load_kinds_file(write(tmp_path, data))
    assert isinstance(agent, DeclaredAgent) and agent.version == "v1" and agent.candidate_share == 0.25
    assert isinstance(agent.candidate, DeclaredAgent) and agent.candidate.version == "v2"
    keys = [f"t-{i}" for i in range(4000)]
    share = sum(agent.version_for(k) is agent.candidate for k in keys) / len(keys)
    assert 0.22 < share < 0.28


@pytest.mark.parametrize(("change", "message"), [
    ({"rollout_share": 1.5}, r"rollout_share: expected a number within 0\.\.1"),
    ({"rollout_share": 0.5, "name": "other"}, "no current version of the kind is declared"),
    ({"rollout_share": 0.5, "version": "v1"}, "must differ from the current one"),
])
def test_a_broken_rollout_in_a_file(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    data = copy.deepcopy(VALID)
    new = copy.deepcopy(data["kinds"][0])
    new.setdefault("version", "v2")
    new["version"] = "v2"
    new.update(change)
    data["kinds"].append(new)
    with pytest.raises(KindsFileError, match=message):
        load_kinds_file(write(tmp_path, data))


VALID_TOML = '''
[[kinds]]
name = "triage"
version = "v1"
input_schema = { type = "object", required = ["text"], properties = { text = { type = "string" } } }

[[kinds.steps]]
name = "summary"
prompt = "Summarise: {text}"
output_schema = { type = "object", required = ["summary"], properties = { summary = { type = "string" } } }

[[kinds.steps]]
name = "label"
prompt = "Label this summary: {summary}"
needs = ["summary"]
model = "small"
temperature = 0.2
[kinds.steps.output_schema]
type = "object"
required = ["label"]
properties.label = { type = "string", enum = ["a", "b"] }
'''


def shape(agent: Agent) -> Any:
    assert isinstance(agent, DeclaredAgent)
    steps = []
    for s in agent.steps:
        assert isinstance(s, DeclaredStep)
        steps.append((s.name, s.prompt_version, s.prompt, s.system, s.output_schema, s.needs, s.model, s.temperature))
    return (agent.kind, agent.version, agent.input_schema, dict(agent.graph), steps, agent.definition_digest,
            agent.unavailable)


def test_toml_and_equivalent_yaml_load_the_same_agents(tmp_path: Path) -> None:
    from_toml = load_kinds_file(write(tmp_path, VALID_TOML, "kinds.toml"))
    from_yaml = load_kinds_file(write(tmp_path, VALID, "kinds.yml"))
    assert [shape(a) for a in from_toml] == [shape(a) for a in from_yaml]
    (agent,) = from_toml
    assert agent.prompt_version == "summary@v1+label@v1"
    assert agent.graph == {"summary": (), "label": ("summary",)}
    assert (agent.steps[1].model, agent.steps[1].temperature) == ("small", 0.2)


def test_the_documented_example_loads_and_both_its_forms_agree() -> None:
    from_toml, from_yaml = load_kinds_file(EXAMPLE_TOML), load_kinds_file(EXAMPLE_YAML)
    assert [shape(a) for a in from_toml] == [shape(a) for a in from_yaml]
    (agent,) = from_toml
    assert agent.kind == "support_reply" and agent.graph == {"facts": (), "reply": ("facts",)}
    assert agent.unavailable == "fallback"
    task_input = agent.parse_input({"customer": "Ana", "message": "The kettle arrived broken", "product": "kettle"})
    user = agent.steps[1].messages(task_input, {"facts": {"facts": ["arrived broken"], "wants": "refund"}})[1]
    assert user["content"].startswith("Write a reply to Ana.")
    assert '{"facts": ["arrived broken"], "wants": "refund"}' in user["content"]


def test_a_changed_definition_changes_the_digest_and_a_description_does_not(tmp_path: Path) -> None:
    (base,) = load_kinds_file(write(tmp_path, VALID, "a.yaml"))
    (prompt,) = load_kinds_file(write(tmp_path, changed(_set("steps.0.prompt", "Sum up: {text}")), "b.yaml"))
    (described,) = load_kinds_file(write(tmp_path, changed(_set("description", "for people")), "c.yaml"))
    assert prompt.definition_digest != base.definition_digest
    assert described.definition_digest == base.definition_digest


def test_a_kind_names_its_policy_for_an_unavailable_endpoint_outside_its_digest(tmp_path: Path) -> None:
    (base,) = load_kinds_file(write(tmp_path, VALID, "a.yaml"))
    (fails,) = load_kinds_file(write(tmp_path, changed(_set("unavailable", "fail_fast")), "b.yaml"))
    assert (base.unavailable, fails.unavailable) == (None, "fail_fast")
    assert fails.definition_digest == base.definition_digest  # a policy, not what the kind answers
    with pytest.raises(KindsFileError, match=r"kind 'triage': unavailable: 'later' is not one of wait, fallback"):
        load_kinds_file(write(tmp_path, changed(_set("unavailable", "later")), "c.yaml"))


def test_a_python_agent_refuses_an_unknown_policy() -> None:
    from pydantic import BaseModel

    from service.agents.base import Step

    class Out(BaseModel):
        x: str

    class One(Step):
        output_model = Out

    assert Agent("k", Out, (One(),), unavailable="fallback").unavailable == "fallback"
    with pytest.raises(ValueError, match="unavailable must be one of"):
        Agent("k", Out, (One(),), unavailable="soon")


@pytest.fixture
def agent(tmp_path: Path) -> DeclaredAgent:
    (loaded,) = load_kinds_file(write(tmp_path, VALID))
    return loaded


def test_placeholders_render_input_fields_and_needed_outputs(agent: DeclaredAgent) -> None:
    task_input = agent.parse_input({"text": "printer on fire {not a placeholder}"})
    first = agent.steps[0].messages(task_input, {})
    assert first[0]["role"] == "system" and "JSON object" in first[0]["content"]
    assert first[1] == {"role": "user", "content": "Summarise: printer on fire {not a placeholder}"}
    second = agent.steps[1].messages(task_input, {"summary": {"summary": "fire, ünïcode"}})
    assert second[1]["content"] == 'Label this summary: {"summary": "fire, ünïcode"}'
    assert agent.steps[1].schema(task_input, {}) == VALID["kinds"][0]["steps"][1]["output_schema"]


def test_literal_braces_and_non_string_fields(tmp_path: Path) -> None:
    data = changed(_set("input_schema", {"type": "object", "properties": {"text": {"type": "string"},
                                                                           "n": {"type": "integer"}}}))
    data["kinds"][0]["steps"][0]["prompt"] = "{{literal}} {text} x{n}"
    (agent,) = load_kinds_file(write(tmp_path, data))
    assert agent.steps[0].messages(agent.parse_input({"text": "t", "n": 3}), {})[1]["content"] == "{literal} t x3"
    assert agent.steps[0].messages(agent.parse_input({"n": 3}), {})[1]["content"] == "{literal}  x3"


def test_input_is_checked_against_its_schema(agent: DeclaredAgent) -> None:
    with pytest.raises(PoisonError) as err:
        agent.parse_input({"text": 5})
    assert err.value.reason == "schema" and "input of triage: 5 is not of type 'string' at /text" in str(err.value)
    with pytest.raises(PoisonError, match="'text' is a required property"):
        agent.parse_input({})


@pytest.mark.parametrize(("answer", "kind", "message"), [
    ("not json", "not_json", "label: answer is not JSON"),
    (json.dumps({"label": "c"}), "schema", "label: 'c' is not one of ['a', 'b'] at /label"),
    (json.dumps({}), "schema", "label: 'label' is a required property"),
])
def test_an_answer_off_its_schema_is_invalid_output(agent: DeclaredAgent, answer: str, kind: str,
                                                    message: str) -> None:
    task_input = agent.parse_input({"text": "t"})
    with pytest.raises(InvalidOutput) as err:
        agent.steps[1].parse(task_input, answer)
    assert err.value.kind == kind and message in str(err.value)
    assert agent.steps[1].parse(task_input, '{"label": "a"}') == {"label": "a"}


def test_the_guide_shows_the_example_file_as_it_is() -> None:
    guide = (REPO / "docs" / "AGENTS.md").read_text()
    shown = guide.split("```toml\n[[kinds]]", 1)[1].split("```", 1)[0]
    assert "[[kinds]]" + shown in EXAMPLE_TOML.read_text()


# -- a declared step that delegates -----------------------------------------------------------------


DELEGATING_TOML = '''
[[kinds]]
name = "panel"
version = "v1"
input_schema = { type = "object", required = ["question"], properties = { question = { type = "string" }, depth = { type = "integer" } } }

[[kinds.steps]]
name = "gather"
needs = []
mode = "optional"
delegate = [
  { kind = "research", input = { question = "{question}", depth = "{depth}", note = "Look into: {question}" } },
  { kind = "critique", input = { text = "{question}", tags = ["{question}", 1] }, topic = "team-b.tasks", budget_s = 60 },
]

[[kinds.steps]]
name = "review"
prompt = "Write the review from {gather}"
output_schema = { type = "object", properties = { review = { type = "string" } } }
'''


def test_a_declared_step_delegates_to_other_kinds_with_its_inputs_templated(tmp_path: Path) -> None:
    from service.agents.delegation import Delegate, DelegateStep
    from service.agents.templates import DeclaredInput

    (agent,) = load_kinds_file(write(tmp_path, DELEGATING_TOML, "kinds.toml"))
    gather, review = agent.steps
    assert isinstance(gather, DelegateStep) and not isinstance(review, DelegateStep)
    assert (gather.name, gather.mode, gather.prompt_version) == ("gather", "optional", "v1")
    assert agent.graph == {"gather": (), "review": ("gather",)}
    children = gather.children(DeclaredInput(data={"question": "why {x}?", "depth": 2}), {})
    assert children == [
        Delegate("research", {"question": "why {x}?", "depth": 2, "note": "Look into: why {x}?"}),
        Delegate("critique", {"text": "why {x}?", "tags": ["why {x}?", 1]}, topic="team-b.tasks", budget_s=60.0),
    ]
    # an absent optional field is empty in a longer text, and absent (null) where it stands alone
    alone = gather.children(DeclaredInput(data={"question": "q"}), {})[0]
    assert alone.input == {"question": "q", "depth": None, "note": "Look into: q"}
    # the children are part of the kind's definition: changing them changes its digest
    (other,) = load_kinds_file(write(tmp_path, DELEGATING_TOML.replace('"critique"', '"critic"'), "kinds.toml"))
    assert other.definition_digest != agent.definition_digest


def test_a_delegating_step_reads_a_needed_steps_output() -> None:
    from service.agents.declared_delegate import declared_delegate_step
    from service.agents.templates import DeclaredInput

    step = declared_delegate_step(
        name="fan", version="v2", needs=("summary",), mode="required", fields=frozenset({"text"}),
        delegate=[{"kind": "research", "input": {"about": "{summary}", "line": "Summary: {summary}"}}])
    (child,) = step.children(DeclaredInput(data={"text": "t"}), {"summary": {"s": "short"}})
    assert child.input == {"about": {"s": "short"}, "line": 'Summary: {"s": "short"}'}
    assert step.mode == "required" and step.needs == ("summary",)


GATHER = {"name": "gather", "needs": [], "delegate": [{"kind": "research", "input": {"q": "{text}"}}]}
DELEGATE_ERRORS = [
    ("delegate not a list", _set("steps.0.delegate", "research"), "steps[0].delegate: expected a non-empty list"),
    ("delegate empty", _set("steps.0.delegate", []), "steps[0].delegate: expected a non-empty list"),
    ("a child not a table", _set("steps.0.delegate", ["research"]), "steps[0].delegate[0]: expected a table"),
    ("a child without kind", _set("steps.0.delegate.0.kind", ...), "steps[0].delegate[0].kind: None is not a kind"),
    ("a child kind in capitals", _set("steps.0.delegate.0.kind", "Research"),
     "steps[0].delegate[0].kind: 'Research' is not a kind name"),
    ("a child input not a table", _set("steps.0.delegate.0.input", "q"),
     "steps[0].delegate[0].input: expected a table"),
    ("an unknown placeholder", _set("steps.0.delegate.0.input", {"q": "{nope}"}),
     "steps[0].delegate[0].input.q: placeholder {nope} is neither an input field nor a needed step"),
    ("a nested bad placeholder", _set("steps.0.delegate.0.input", {"q": {"r": ["{text!r}"]}}),
     "steps[0].delegate[0].input.q.r.0: placeholder {text!r} is not a name"),
    ("an unknown child field", _set("steps.0.delegate.0.budget", 3),
     "steps[0].delegate[0].budget: unknown field (a child has budget_s, input, kind, topic)"),
    ("a budget not positive", _set("steps.0.delegate.0.budget_s", 0),
     "steps[0].delegate[0].budget_s: 0 is not a positive number of seconds"),
    ("a budget that is a flag", _set("steps.0.delegate.0.budget_s", True), "steps[0].delegate[0].budget_s: True"),
    ("a budget without end", _set("steps.0.delegate.0.budget_s", float("inf")),
     "steps[0].delegate: not JSON data: Out of range float values"),
    ("a budget of centuries", _set("steps.0.delegate.0.budget_s", 1e10),
     "steps[0].delegate[0].budget_s: 10000000000.0 is not a positive number of seconds up to"),
    ("an empty topic", _set("steps.0.delegate.0.topic", ""), "steps[0].delegate[0].topic: '' is not a topic name"),
    ("an unknown mode", _set("steps.0.mode", "sometimes"),
     "steps[0].mode: 'sometimes' is not one of required, optional"),
    ("a mode without delegate", lambda kind: kind["steps"][1].update(mode="optional"),
     "steps[1].mode: only a step that delegates has a mode"),
    ("a prompt beside delegate", _set("steps.0.prompt", "Ask {text}"),
     "steps[0].prompt: a step that delegates has no prompt, system, output_schema, model or temperature"),
    ("an unknown field beside delegate", _set("steps.0.promt", "x"), "steps[0].promt: unknown field"),
]


@pytest.mark.parametrize(("case", "edit", "message"), DELEGATE_ERRORS, ids=[e[0] for e in DELEGATE_ERRORS])
def test_a_malformed_delegating_step_is_refused_naming_the_field(
    tmp_path: Path, case: str, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    def delegating(then: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        def edit_kind(kind: dict[str, Any]) -> None:
            kind["steps"][0] = copy.deepcopy(GATHER)
            kind["steps"][1]["prompt"] = "Label {gather}"
            kind["steps"][1]["needs"] = ["gather"]
            then(kind)
        return edit_kind

    assert load_kinds_file(write(tmp_path, changed(delegating(lambda kind: None))))  # as it is, it loads
    path = write(tmp_path, changed(delegating(edit)))
    with pytest.raises(KindsFileError) as err:
        load_kinds_file(path)
    assert str(err.value).startswith(str(path) + ": kind 'triage': ")
    assert message in str(err.value)


def test_the_guides_delegating_steps_load(tmp_path: Path) -> None:
    guide = (REPO / "docs" / "AGENTS.md").read_text()
    shown = guide.split("```toml\n[[kinds.steps]]\nname = \"gather\"", 1)[1].split("```", 1)[0]
    head = ('[[kinds]]\nname = "panel"\nversion = "v1"\ninput_schema = { type = "object", properties = '
            '{ question = { type = "string" } } }\n\n[[kinds.steps]]\nname = "gather"')
    (agent,) = load_kinds_file(write(tmp_path, head + shown, "kinds.toml"))
    assert [s.name for s in agent.steps] == ["gather", "review"]


def test_a_kind_sends_its_calls_through_the_batch_lane_when_it_says_batch(tmp_path: Path) -> None:
    (base,) = load_kinds_file(write(tmp_path, VALID, "a.yaml"))
    (waits,) = load_kinds_file(write(tmp_path, changed(_set("batch", True)), "b.yaml"))
    in_toml = VALID_TOML.replace('version = "v1"\n', 'version = "v1"\nbatch = true\n', 1)
    (toml,) = load_kinds_file(write(tmp_path, in_toml, "c.toml"))
    assert (base.batch, waits.batch, toml.batch) == (False, True, True)
    assert waits.definition_digest == base.definition_digest  # where its calls go, not what the kind answers
    with pytest.raises(KindsFileError, match=r"kind 'triage': batch: expected true or false, not 'yes'"):
        load_kinds_file(write(tmp_path, changed(_set("batch", "yes")), "d.yaml"))
