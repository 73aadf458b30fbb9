"""Kinds declared in a file, for teams that do not write Python: TOML (``.toml``) or YAML (``.yaml``, ``.yml``).

The file holds a list ``kinds`` and, optionally, a list ``schedules`` (each a
:class:`~service.core.schedule_spec.ScheduleSpec`, docs/SCHEDULES.md; :func:`load_schedules`); each kind is::

    name          the kind, as a task names it (lowercase letters, digits, _)
    version       required; every step's prompt version, recorded with every result
    description   optional, for people
    unavailable   optional: wait, fallback or fail_fast, what a task does while the primary model
                  endpoint is unavailable (absent: AGENT_LLM__UNAVAILABLE); not part of the
                  definition's digest, so it changes without a new version
    batch         optional: true sends the calls of its steps without tools through the provider's
                  Batch API at its lower price (service.pipeline.batch_lane); outside the digest too
    input_schema  the JSON Schema of a task's input: an object
    steps         one or more steps, each one model call:
      name           [A-Za-z0-9_-], unique in the kind, not the name of an input field
      prompt         the user message: a template with named placeholders
      system         optional system prompt, a template too (the ask for one JSON object is appended)
      output_schema  the JSON Schema of the answer: an object
      needs          optional: the steps whose outputs this one reads, in order; absent, the step
                     before (none for the first); [] none (it runs at once)
      model          optional: the model to ask instead of the endpoint's default
      temperature    optional: 0..2
    a step may delegate to other kinds instead (no prompt, system, output_schema, model or
    temperature): ``delegate``, a list of children (kind, input, topic, budget_s), and ``mode``,
    required or optional (:mod:`service.agents.declared_delegate`)

A placeholder is ``{name}``: an input field (``properties`` of ``input_schema``) is its value, a
string as it is and anything else as JSON (an absent optional field is empty); a step in the
step's ``needs`` is that step's output as JSON. ``{{`` and ``}}`` are literal braces. Nothing else
goes between braces.

Everything is checked when the file is loaded, and an error names the file, the kind and the field.
The kind becomes an ordinary :class:`~service.agents.base.Agent` of :class:`DeclaredStep` s, run by
the same engine as every other kind. Its definition has a digest: the service records it per
(kind, version) at start and refuses a changed definition under a version already recorded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import exceptions as schema_errors
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from pydantic import BaseModel

from service.agents.base import Agent, Messages, Previous, Step
from service.agents.declared_delegate import (
    MODEL_FIELDS,
    DeclaredDelegateStep,
    DelegateFieldError,
    declared_delegate_step,
)
from service.agents.helpers import JSON_ONLY, system_message, user_message
from service.agents.kinds_file import KindsFileError as KindsFileError
from service.agents.kinds_file import check_top_level, read_kinds_file, schedules_of
from service.agents.kinds_file import load_schedules as load_schedules
from service.agents.session import SESSION, Session, session_messages
from service.agents.tasks import KIND_PATTERN, canonical_json, digest
from service.agents.templates import STEP_NAME, DeclaredInput, Template, parse_template, render, unknown_placeholder
from service.core.errors import InvalidOutput, PoisonError
from service.core.settings import UNAVAILABLE_POLICIES

VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SCHEMA_NAME_MAX = 64  # a request's schema name is "<kind>_<step>" (see service.llm.client.ChatRequest)

KIND_FIELDS = {"name", "version", "description", "input_schema", "steps", "rollout_share", "unavailable", "session",
               "batch"}
SESSION_FIELDS = {"ttl_s", "history_share"}  # a kinds file's session is the turns (a reducer is Python's)
STEP_FIELDS = {"name", "prompt", "system", "output_schema", "needs", "model", "temperature"}
DELEGATE_FIELDS = {"name", "needs", "delegate", "mode"}  # a step that delegates to other kinds


class _Output(BaseModel):
    """Unused: a declared step validates its answer against its JSON Schema."""


class DeclaredStep(Step[DeclaredInput, Any]):
    """A step declared in a file: a prompt template, an optional system template, an output JSON Schema:
    made at run time, so its output is typed ``Any``, JSON data read by name (``previous["step"]``)."""

    output_model = _Output

    def __init__(self, *, name: str, version: str, prompt: str, output_schema: dict[str, Any],
                 system: str | None = None, needs: tuple[str, ...] | None = None,
                 model: str | None = None, temperature: float | None = None,
                 fields: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.prompt_version = version
        self.needs = needs
        self.model = model
        self.temperature = temperature
        self.prompt = prompt
        self.system = system
        self.output_schema = output_schema
        self.fields = fields  # the input's fields: any other placeholder is a needed step's output
        self._prompt = parse_template(prompt)
        self._system = parse_template(system) if system is not None else None
        self._validator: Validator = validator_for(output_schema)(output_schema)

    def schema(self, task_input: DeclaredInput, previous: Previous) -> dict[str, Any]:
        return self.output_schema

    def messages(self, task_input: DeclaredInput, previous: Previous) -> Messages:
        """The system message, the session's history when the task has one (its summary and the
        turns that fit the kind's budget, as ``session_messages`` renders them), the prompt."""
        user = user_message(self._render(self._prompt, task_input.data, previous))
        history = session_messages(previous.get(SESSION))
        if self._system is None:
            return [{"role": "system", "content": JSON_ONLY}, *history, user]
        return [system_message(self._render(self._system, task_input.data, previous)), *history, user]

    def _render(self, template: Template, data: Mapping[str, Any], previous: Mapping[str, Any]) -> str:
        return render(template, self.fields, data, previous)

    def definition(self) -> dict[str, Any]:
        """What the kind's digest covers of this step."""
        return {"name": self.name, "prompt": self.prompt, "system": self.system, "output_schema": self.output_schema,
                "needs": None if self.needs is None else list(self.needs), "model": self.model,
                "temperature": self.temperature}

    def parse(self, task_input: DeclaredInput, content: str) -> dict[str, Any]:
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise InvalidOutput("not_json", f"{self.name}: answer is not JSON: {str(exc)[:120]}") from exc
        error = schema_errors.best_match(self._validator.iter_errors(data))
        if error is not None:
            raise InvalidOutput("schema", f"{self.name}: {_describe(error)}")
        if not isinstance(data, dict):  # the output schema is an object's; kept for a lax schema
            raise InvalidOutput("schema", f"{self.name}: answer is not a JSON object")
        return data


@dataclass(frozen=True)
class DeclaredAgent(Agent[DeclaredInput]):
    """A kind declared in a file: its input is checked against ``input_schema``."""

    version: str = field(kw_only=True)
    input_schema: dict[str, Any] = field(kw_only=True, compare=False)
    definition_digest: str = field(kw_only=True)  # of everything the kind does (not its description)
    description: str | None = field(default=None, kw_only=True, compare=False)

    def parse_input(self, raw: dict[str, Any]) -> DeclaredInput:
        validator = validator_for(self.input_schema)(self.input_schema)
        error = schema_errors.best_match(validator.iter_errors(raw))
        if error is not None:
            raise PoisonError("schema", f"input of {self.kind}: {_describe(error)}")
        return DeclaredInput(data=raw)


def _describe(error: schema_errors.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message[:200]}" + (f" at /{where}" if where else "")


# ----------------------------------------------------------------------------- loading a file


class _Where:
    """Builds an error that names the file, the kind and the field."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind

    def error(self, where: str, message: str) -> KindsFileError:
        return KindsFileError(f"{self.path}: {self.kind}: {where}: {message}")


def load_kinds_file(path: Path) -> list[DeclaredAgent]:
    """The agents a kinds file declares, every field checked. Raises :class:`KindsFileError`."""
    data = read_kinds_file(path)
    check_top_level(path, data)
    schedules_of(path, data.get("schedules", []))  # refused with the kinds, whoever loads the file
    kinds = data["kinds"]
    if not isinstance(kinds, list) or not kinds:
        raise KindsFileError(f"{path}: kinds: expected a non-empty list of kinds")
    agents: dict[str, DeclaredAgent] = {}
    candidates: dict[str, tuple[DeclaredAgent, float]] = {}
    seen: dict[str, int] = {}
    for i, raw in enumerate(kinds):
        agent = _kind(path, i, raw)
        share = raw.get("rollout_share")
        if share is not None:
            _candidate(path, agent, share, candidates)
            continue
        if agent.kind in seen:
            raise KindsFileError(f"{path}: kind {agent.kind!r} is declared twice (kinds[{seen[agent.kind]}] "
                                 f"and kinds[{i}]); a new version in rollout has a rollout_share")
        seen[agent.kind] = i
        agents[agent.kind] = agent
    for kind, (candidate, share) in candidates.items():
        current = agents.get(kind)
        if current is None:
            raise KindsFileError(f"{path}: kind {kind!r}: version {candidate.version} has a rollout_share, but no "
                                 "current version of the kind is declared")
        if current.version == candidate.version:
            raise KindsFileError(f"{path}: kind {kind!r}: the version in rollout must differ from the current "
                                 f"one ({current.version})")
        agents[kind] = dataclasses.replace(current, candidate=candidate, candidate_share=share)
    return list(agents.values())


def _candidate(path: Path, agent: DeclaredAgent, share: Any,
               candidates: dict[str, tuple[DeclaredAgent, float]]) -> None:
    """A new version of a kind with the share of task keys it runs (a stable hash of the key)."""
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise KindsFileError(f"{path}: kind {agent.kind!r}: rollout_share: expected a number within 0..1, "
                             f"not {share!r}")
    if agent.kind in candidates:
        raise KindsFileError(f"{path}: kind {agent.kind!r}: two versions in rollout "
                             f"({candidates[agent.kind][0].version} and {agent.version})")
    candidates[agent.kind] = (agent, float(share))


def _kind(path: Path, index: int, raw: Any) -> DeclaredAgent:
    at = _Where(path, f"kinds[{index}]")
    if not isinstance(raw, dict):
        raise at.error("kind", "expected a table of name, version, input_schema and steps")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(KIND_PATTERN, name):
        raise at.error("name", f"{name!r} is not a kind name (lowercase letters, digits and _, "
                               "starting with a letter, at most 64)")
    at = _Where(path, f"kind {name!r}")
    unknown = sorted(set(raw) - KIND_FIELDS)
    if unknown:
        raise at.error(unknown[0], f"unknown field (a kind has {', '.join(sorted(KIND_FIELDS))})")
    version = raw.get("version")
    if version is None:
        raise at.error("version", "missing: a kind names its version, and a changed prompt needs a new one")
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise at.error("version", f"{version!r} is not a version (a string of letters, digits, '.', '_', '-', "
                                  "such as \"v1\")")
    options = _options(at, raw)
    input_schema = _schema(at, "input_schema", raw.get("input_schema"))
    fields = set(input_schema.get("properties", {}))
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise at.error("steps", "expected a non-empty list of steps")
    names = _step_names(at, name, steps_raw, fields)
    steps = tuple(_step(at, j, s, version, names, fields) for j, s in enumerate(steps_raw))
    definition = {
        "name": name, "version": version, "input_schema": input_schema,
        "steps": [s.definition() for s in steps],
    }
    session = _session(at, raw.get("session"))
    definition.update({"session": {"ttl_s": session.ttl_s, "history_share": session.history_share}} if session else {})
    try:
        return DeclaredAgent(name, DeclaredInput, steps, version=version, input_schema=input_schema,
                             definition_digest=digest(canonical_json(definition)), session=session, **options)
    except ValueError as exc:  # a cycle: the agent model refuses it
        message = str(exc).removeprefix(f"agent {name!r}: ")
        raise at.error("needs", message) from None


def _options(at: _Where, raw: dict[str, Any]) -> dict[str, Any]:
    """The kind's fields outside its digest: ``description``, ``unavailable`` and ``batch``."""
    description, unavailable, batch = raw.get("description"), raw.get("unavailable"), raw.get("batch", False)
    if description is not None and not isinstance(description, str):
        raise at.error("description", "expected a string")
    if unavailable is not None and unavailable not in UNAVAILABLE_POLICIES:
        raise at.error("unavailable", f"{unavailable!r} is not one of {', '.join(UNAVAILABLE_POLICIES)}")
    if not isinstance(batch, bool):
        raise at.error("batch", f"expected true or false, not {batch!r}")
    return {"description": description, "unavailable": unavailable, "batch": batch}


def _session(at: _Where, raw: Any) -> Session | None:
    """``session = { ttl_s, history_share }`` (both optional): the kind keeps sessions of turns."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise at.error("session", "expected a table such as { ttl_s = 2592000, history_share = 0.5 }")
    unknown = sorted(set(raw) - SESSION_FIELDS)
    if unknown:
        raise at.error(f"session.{unknown[0]}", f"unknown field (a session has {', '.join(sorted(SESSION_FIELDS))})")
    try:
        return Session(**raw)
    except (TypeError, ValueError) as exc:
        raise at.error("session", str(exc).removeprefix("Session: ")) from None


def _step_names(at: _Where, kind: str, steps: list[Any], fields: set[str]) -> list[str]:
    names: list[str] = []
    for j, raw in enumerate(steps):
        if not isinstance(raw, dict):
            raise at.error(f"steps[{j}]", "expected a table of name, prompt and output_schema")
        step = raw.get("name")
        if not isinstance(step, str) or not STEP_NAME.fullmatch(step):
            raise at.error(f"steps[{j}].name", f"{step!r} is not a step name (letters, digits, _ and -)")
        if len(kind) + 1 + len(step) > SCHEMA_NAME_MAX:
            raise at.error(f"steps[{j}].name", f"kind and step name together exceed {SCHEMA_NAME_MAX - 1} characters")
        if step in names:
            raise at.error(f"steps[{j}].name", f"step {step!r} is declared twice")
        if step in fields:
            raise at.error(f"steps[{j}].name", f"{step!r} is also an input field: a placeholder would name both")
        names.append(step)
    return names


def _step(at: _Where, j: int, raw: dict[str, Any], version: str, names: list[str],
          fields: set[str]) -> DeclaredStep | DeclaredDelegateStep:
    here = f"steps[{j}]"
    unknown = sorted(set(raw) - STEP_FIELDS - DELEGATE_FIELDS)
    if unknown:
        raise at.error(f"{here}.{unknown[0]}", f"unknown field (a step has {', '.join(sorted(STEP_FIELDS))}; "
                                               f"one that delegates {', '.join(sorted(DELEGATE_FIELDS))})")
    needs = _needs(at, here, raw.get("needs"), names)
    readable = set(needs if needs is not None else names[j - 1:j] if j else ())
    if "delegate" in raw or "mode" in raw:
        return _delegating(at, here, raw, version, needs, names, fields, readable)
    templates = _templates(at, here, raw, names, fields, readable)
    output_schema = _schema(at, f"{here}.output_schema", raw.get("output_schema"))
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise at.error(f"{here}.model", "expected a model name")
    temperature = raw.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise at.error(f"{here}.temperature", f"{temperature!r} is not a number from 0 to 2")
        temperature = float(temperature)
    return DeclaredStep(name=raw["name"], version=version, prompt=templates["prompt"], system=templates.get("system"),
                        output_schema=output_schema, needs=needs, model=model, temperature=temperature,
                        fields=frozenset(fields))


def _delegating(at: _Where, here: str, raw: dict[str, Any], version: str, needs: tuple[str, ...] | None,
                names: list[str], fields: set[str], readable: set[str]) -> DeclaredDelegateStep:
    """A step that delegates to other kinds (:mod:`service.agents.declared_delegate`)."""
    if "delegate" not in raw:
        raise at.error(f"{here}.mode", "only a step that delegates has a mode")
    model_only = [f for f in MODEL_FIELDS if f in raw]
    if model_only:
        raise at.error(f"{here}.{model_only[0]}", f"a step that delegates has no {', '.join(MODEL_FIELDS[:-1])} "
                                                  f"or {MODEL_FIELDS[-1]}")
    try:
        return declared_delegate_step(name=raw["name"], version=version, needs=needs, mode=raw.get("mode"),
                                      fields=fields, delegate=raw["delegate"], readable=readable, steps=names,
                                      here=here)
    except DelegateFieldError as exc:
        raise at.error(f"{here}.{exc.where}", exc.message) from None


def _needs(at: _Where, here: str, raw: Any, names: list[str]) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise at.error(f"{here}.needs", "expected a list of step names")
    for n in raw:
        if n not in names:
            raise at.error(f"{here}.needs", f"unknown step {n!r}")
    if len(set(raw)) != len(raw):
        raise at.error(f"{here}.needs", "names a step twice")
    return tuple(raw)


def _templates(at: _Where, here: str, raw: dict[str, Any], names: list[str], fields: set[str],
               readable: set[str]) -> dict[str, str]:
    """The step's prompt and system templates, each placeholder an input field or a needed step."""
    templates: dict[str, str] = {}
    for key, required in (("prompt", True), ("system", False)):
        text = raw.get(key)
        if text is None and not required:
            continue
        if not isinstance(text, str) or not text.strip():
            raise at.error(f"{here}.{key}", "expected a non-empty string")
        try:
            template = parse_template(text)
        except ValueError as exc:
            raise at.error(f"{here}.{key}", str(exc)) from None
        problem = unknown_placeholder(template, fields, readable, names, here)
        if problem is not None:
            raise at.error(f"{here}.{key}", problem)
        templates[key] = text
    return templates


def _schema(at: _Where, where: str, schema: Any) -> dict[str, Any]:
    """A JSON Schema of an object, checked against its metaschema."""
    if not isinstance(schema, dict):
        raise at.error(where, "missing or not a table: expected a JSON Schema")
    try:
        canonical_json(schema)
    except (TypeError, ValueError) as exc:
        raise at.error(where, f"not JSON data: {exc}") from None
    try:
        validator_for(schema).check_schema(schema)
    except schema_errors.SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise at.error(where, f"not a valid JSON Schema: {exc.message[:200]}" + (f" at /{path}" if path else "")) from None
    if schema.get("type") != "object":
        raise at.error(where, f"must have \"type\": \"object\" (found {schema.get('type')!r})")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise at.error(f"{where}.properties", "expected a table")
    return schema
