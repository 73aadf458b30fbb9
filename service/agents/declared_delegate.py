"""A step of a kind declared in a file that delegates to other kinds instead of calling the model.

In the kinds file, a step with ``delegate`` (and no prompt, system, output_schema, model or
temperature)::

    [[kinds.steps]]
    name = "gather"
    needs = []
    mode = "optional"          # or "required" (absent: required), as DelegateStep.mode
    delegate = [
      { kind = "research", input = { question = "{question}" } },
      { kind = "critique", input = { text = "Critique: {question}" }, topic = "team-b.tasks", budget_s = 60 },
    ]

Each child names its ``kind``, its ``input`` (a table), optionally ``topic`` (another deployment's
input topic) and ``budget_s`` (seconds, below the parent's deadline). Every string in ``input``, at
any depth, is a template as a prompt is (:mod:`service.agents.templates`); a string that is one
placeholder alone is the value itself (an input field's as the task gave it, absent: null; a needed
step's output as an object), so a number stays a number. The step becomes a
:class:`~service.agents.delegation.DelegateStep` run like any other; its output is read by the
steps after it as ``{<step name>}``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from service.agents.base import Previous
from service.agents.delegation import DELEGATE_MODES, Delegate, DelegateStep, budget_problem
from service.agents.tasks import KIND_PATTERN, canonical_json
from service.agents.templates import DeclaredInput, Template, parse_template, render, unknown_placeholder

CHILD_FIELDS = ("budget_s", "input", "kind", "topic")
MODEL_FIELDS = ("prompt", "system", "output_schema", "model", "temperature")  # a model step's, not this one's


class DelegateFieldError(ValueError):
    """A delegating step the loader refuses: ``where`` in the step (``delegate[0].kind``) and why."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message


@dataclass(frozen=True, slots=True)
class ChildTemplate:
    """One declared child: its kind, its input with each string parsed as a template, topic, budget."""

    kind: str
    input: Any
    topic: str | None
    budget_s: float | None


class DeclaredDelegateStep(DelegateStep[DeclaredInput]):
    """A declared step that delegates: its children's inputs filled from the task's input and the
    outputs of the steps it needs. Its output is a :class:`DelegateOutput`, as every delegating
    step's; the steps it reads are declared ones, whose outputs are JSON data (read by name)."""

    def __init__(self, *, name: str, version: str, needs: tuple[str, ...] | None, mode: str,
                 children: tuple[ChildTemplate, ...], fields: frozenset[str], declared: list[Any]) -> None:
        self.name, self.prompt_version, self.needs, self.mode = name, version, needs, mode
        self.templates, self.fields, self.declared = children, fields, declared

    def children(self, task_input: DeclaredInput, previous: Previous) -> list[Delegate]:
        return [Delegate(c.kind, self._fill(c.input, task_input.data, previous), topic=c.topic, budget_s=c.budget_s)
                for c in self.templates]

    def _fill(self, value: Any, data: Mapping[str, Any], previous: Mapping[str, Any]) -> Any:
        if isinstance(value, dict):
            return {k: self._fill(v, data, previous) for k, v in value.items()}
        if isinstance(value, list):
            return [self._fill(v, data, previous) for v in value]
        if not isinstance(value, tuple):  # not a template: a number, a flag, null
            return value
        if len(value) == 1 and value[0][0] == "" and value[0][1] is not None:  # one placeholder alone
            name = value[0][1]
            return data.get(name) if name in self.fields else previous[name]
        return render(value, self.fields, data, previous)

    def definition(self) -> dict[str, Any]:
        """What the kind's digest covers of this step."""
        return {"name": self.name, "delegate": self.declared, "mode": self.mode,
                "needs": None if self.needs is None else list(self.needs)}


def declared_delegate_step(*, name: str, version: str, needs: tuple[str, ...] | None, mode: Any,
                           fields: Collection[str], delegate: Any, readable: Collection[str] | None = None,
                           steps: Collection[str] = (), here: str = "") -> DeclaredDelegateStep:
    """The step a kinds file declares; :class:`DelegateFieldError` names what it refuses. ``readable``:
    the steps whose outputs its placeholders may name (absent: ``needs``)."""
    mode = "required" if mode is None else mode
    if mode not in DELEGATE_MODES:
        raise DelegateFieldError("mode", f"{mode!r} is not one of {', '.join(DELEGATE_MODES)}")
    if not isinstance(delegate, list) or not delegate:
        raise DelegateFieldError("delegate", "expected a non-empty list of children (kind, input, topic, budget_s)")
    try:
        canonical_json(delegate)
    except (TypeError, ValueError) as exc:
        raise DelegateFieldError("delegate", f"not JSON data: {exc}") from None
    can_read = set(readable if readable is not None else needs or ())
    children = tuple(_child(f"delegate[{n}]", raw, set(fields), can_read, steps, here)
                     for n, raw in enumerate(delegate))
    return DeclaredDelegateStep(name=name, version=version, needs=needs, mode=mode, children=children,
                                fields=frozenset(fields), declared=delegate)


def _child(where: str, raw: Any, fields: set[str], readable: set[str], steps: Collection[str],
           here: str) -> ChildTemplate:
    if not isinstance(raw, dict):
        raise DelegateFieldError(where, "expected a table of kind, input, topic and budget_s")
    unknown = sorted(set(raw) - set(CHILD_FIELDS))
    if unknown:
        raise DelegateFieldError(f"{where}.{unknown[0]}", f"unknown field (a child has {', '.join(CHILD_FIELDS)})")
    kind = raw.get("kind")
    if not isinstance(kind, str) or not re.fullmatch(KIND_PATTERN, kind):
        raise DelegateFieldError(f"{where}.kind", f"{kind!r} is not a kind name (lowercase letters, digits and _)")
    data = raw.get("input", {})
    if not isinstance(data, dict):
        raise DelegateFieldError(f"{where}.input", "expected a table")
    topic = raw.get("topic")
    if topic is not None and (not isinstance(topic, str) or not topic or len(topic) > 249):
        raise DelegateFieldError(f"{where}.topic", f"{topic!r} is not a topic name")
    budget = raw.get("budget_s")
    if budget is not None and (problem := budget_problem(budget)):
        raise DelegateFieldError(f"{where}.budget_s", problem)
    filled = _templated(f"{where}.input", data, fields, readable, steps, here)
    return ChildTemplate(kind, filled, topic, float(budget) if budget is not None else None)


def _templated(where: str, value: Any, fields: set[str], readable: set[str], steps: Collection[str],
               here: str) -> Any:
    """``value`` with each string parsed as a template whose placeholders the step may read."""
    if isinstance(value, dict):
        return {k: _templated(f"{where}.{k}", v, fields, readable, steps, here) for k, v in value.items()}
    if isinstance(value, list):
        return [_templated(f"{where}.{i}", v, fields, readable, steps, here) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    try:
        template: Template = parse_template(value)
    except ValueError as exc:
        raise DelegateFieldError(where, str(exc)) from None
    problem = unknown_placeholder(template, fields, readable, steps, here)
    if problem is not None:
        raise DelegateFieldError(where, problem)
    return template
