"""The service's registry: the built-in kinds, a user's own agents, and the kinds declared in a file.

In this order, each kind remembered with where it came from:

1. the built-in kinds (:func:`~service.agents.registry.default_agents`);
2. every entry point of the group ``agent_service.agents`` of the installed packages;
3. ``AGENT_AGENTS``: ``package.module:attribute`` (several separated by commas);
4. ``AGENT_KINDS_FILE``: kinds declared in a TOML or YAML file (:mod:`service.agents.declared`).

An entry point or an attribute is an :class:`~service.agents.base.Agent`, an iterable of them, or
a callable (no arguments) returning either. Anything wrong (an import that fails, another type, a
kind registered twice, an agent whose steps do not form a graph) raises :class:`AgentsNotLoaded`,
whose message names the source, and the service does not start.

The schedules (docs/SCHEDULES.md) come from ``AGENT_SCHEDULER__SCHEDULES`` and the kinds file, each
of a kind the registry runs (:func:`schedules_from_settings`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from service.agents.base import Agent
from service.agents.declared import SCHEMA_NAME_MAX, DeclaredAgent, KindsFileError, load_kinds_file, load_schedules
from service.agents.registry import AgentRegistry, default_agents
from service.agents.support import support_agent
from service.agents.tasks import KIND_PATTERN
from service.agents.templates import STEP_NAME
from service.core.errors import AgentError
from service.core.schedule_spec import ScheduleSpec
from service.core.settings import Settings

ENTRY_POINT_GROUP = "agent_service.agents"


class AgentsNotLoaded(AgentError):
    """The agents cannot be loaded; the message names the source (entry point, module, file)."""


def agents_from_settings(settings: Settings) -> AgentRegistry:
    """The registry the service runs with these settings."""
    registry = load_agents(spec=settings.agents, kinds_file=settings.kinds_file)
    tools = settings.tools
    if tools.tickets_url:
        registry.register(support_agent(tools.tickets_url, tools.approval_above, tools.approval_timeout_s),
                          source="built-in (AGENT_TOOLS__TICKETS_URL)")
    return registry


def schedules_from_settings(settings: Settings, registry: AgentRegistry) -> list[ScheduleSpec]:
    """Every schedule of the deployment (the settings', then the kinds file's), each of a kind the
    registry runs; anything else raises :class:`AgentsNotLoaded` and the service does not start."""
    declared: list[ScheduleSpec] = []
    if settings.kinds_file is not None:
        try:
            declared = load_schedules(settings.kinds_file)
        except KindsFileError as exc:
            raise AgentsNotLoaded(str(exc)) from exc
    schedules = all_schedules(settings, declared)
    kinds = set(registry.kinds())
    for spec in schedules:
        if spec.kind not in kinds:
            raise AgentsNotLoaded(f"schedule {spec.name!r}: kind {spec.kind!r} is not a kind this deployment runs "
                                  f"({', '.join(sorted(kinds))})")
    return schedules


def all_schedules(settings: Settings, kinds_file_schedules: Iterable[ScheduleSpec]) -> list[ScheduleSpec]:
    """The schedules of ``AGENT_SCHEDULER__SCHEDULES`` and of the kinds file; a name declared twice
    (in either, or in both) raises :class:`AgentsNotLoaded`."""
    found: dict[str, str] = {}
    schedules: list[ScheduleSpec] = []
    sources = [("AGENT_SCHEDULER__SCHEDULES", spec) for spec in settings.scheduler.schedules]
    sources += [(f"kinds file {settings.kinds_file}", spec) for spec in kinds_file_schedules]
    for source, spec in sources:
        if spec.name in found:
            raise AgentsNotLoaded(f"schedule {spec.name!r} is declared twice ({found[spec.name]} and {source})")
        found[spec.name] = source
        schedules.append(spec)
    return schedules


def load_agents(*, spec: str | None = None, kinds_file: Path | None = None, entry_points: bool = True,
                group: str = ENTRY_POINT_GROUP) -> AgentRegistry:
    """The built-in kinds, plus the entry points of ``group``, ``spec`` and ``kinds_file``."""
    registry = default_agents()
    if entry_points:
        found = importlib.metadata.entry_points(group=group)
        for ep in sorted(found, key=lambda e: (e.dist.name if e.dist else "", e.name)):
            dist = f" of {ep.dist.name} {ep.dist.version}" if ep.dist else ""
            source = f"entry point {ep.name} = {ep.value}{dist}"
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - whatever a user's module raises, named with it
                raise AgentsNotLoaded(f"{source}: cannot load it: {type(exc).__name__}: {exc}") from exc
            register_all(registry, obj, source)
    for one in (spec or "").split(","):
        if one.strip():
            source = f"AGENT_AGENTS {one.strip()}"
            register_all(registry, resolve(one.strip(), source), source)
    if kinds_file is not None:
        try:
            declared = load_kinds_file(kinds_file)
        except KindsFileError as exc:
            raise AgentsNotLoaded(str(exc)) from exc
        register_all(registry, declared, f"kinds file {kinds_file}")
    return registry


def resolve(spec: str, source: str) -> Any:
    """The object ``package.module:attribute`` names (the attribute may be dotted)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise AgentsNotLoaded(f"{source}: expected package.module:attribute")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever a user's module raises, named with it
        raise AgentsNotLoaded(f"{source}: cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AgentsNotLoaded(f"{source}: {module_name} has no attribute {attribute}") from None
    return obj


def register_all(registry: AgentRegistry, obj: Any, source: str) -> None:
    """Register what ``obj`` is or returns: an agent, or an iterable of agents."""
    if callable(obj) and not isinstance(obj, Agent):
        try:
            obj = obj()
        except ValueError as exc:  # an agent refused when it is made: an unknown step, a cycle
            raise AgentsNotLoaded(f"{source}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - whatever a user's function raises, named with it
            raise AgentsNotLoaded(f"{source}: calling it raised {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Agent):
        agents = [obj]
    elif isinstance(obj, Iterable) and not isinstance(obj, str | bytes | Mapping):
        agents = list(obj)
    else:
        raise AgentsNotLoaded(f"{source}: expected an Agent, an iterable of Agents or a callable returning "
                              f"either, got {type(obj).__name__}")
    if not agents:
        raise AgentsNotLoaded(f"{source}: no agent")
    for agent in agents:
        if not isinstance(agent, Agent):
            raise AgentsNotLoaded(f"{source}: expected an Agent, got {type(agent).__name__}")
        problem = naming_problem(agent)
        if problem:
            raise AgentsNotLoaded(f"{source}: {problem}")
        try:
            registry.register(agent, source=source)
        except ValueError as exc:  # registered twice: the message names both sources
            raise AgentsNotLoaded(str(exc)) from exc


def naming_problem(agent: Agent) -> str | None:
    """Why a task of this agent could never be produced or run because of its names, or None."""
    if not re.fullmatch(KIND_PATTERN, agent.kind):
        return (f"kind {agent.kind!r} is not a kind name (lowercase letters, digits and _, starting with a "
                "letter, at most 64)")
    for step in agent.steps:
        if not STEP_NAME.fullmatch(step.name):
            return f"kind {agent.kind!r}: step {step.name!r} is not a step name (letters, digits, _ and -)"
        if len(agent.kind) + 1 + len(step.name) > SCHEMA_NAME_MAX:
            return (f"kind {agent.kind!r}: step {step.name!r}: kind and step name together exceed "
                    f"{SCHEMA_NAME_MAX - 1} characters")
    return None


def input_schema(agent: Agent) -> dict[str, Any]:
    """The JSON Schema of a task's input for this agent."""
    if isinstance(agent, DeclaredAgent):
        return agent.input_schema
    schema: dict[str, Any] = agent.input_model.model_json_schema()
    return schema


def describe(registry: AgentRegistry) -> list[dict[str, Any]]:
    """Every kind as plain data: its name, source, steps (needs, prompt version, model), input schema."""
    out = []
    for agent in registry:
        steps = []
        for step in agent.steps:
            entry: dict[str, Any] = {"name": step.name, "needs": list(agent.graph[step.name]),
                                     "prompt_version": step.prompt_version}
            if step.model is not None:
                entry["model"] = step.model
            if step.temperature is not None:
                entry["temperature"] = step.temperature
            steps.append(entry)
        item: dict[str, Any] = {"kind": agent.kind, "source": registry.source(agent.kind),
                                "prompt_version": agent.prompt_version, "steps": steps}
        if isinstance(agent, DeclaredAgent):
            item["version"] = agent.version
            item["definition_digest"] = agent.definition_digest
        if agent.candidate is not None:
            item["rollout"] = {"candidate": agent.candidate.prompt_version, "share": agent.candidate_share}
            if isinstance(agent.candidate, DeclaredAgent):
                item["rollout"]["version"] = agent.candidate.version
        item["input_schema"] = input_schema(agent)
        out.append(item)
    return out


def summary(item: Mapping[str, Any]) -> str:
    """One line for the start log: ``kind (source): step@version <- needs, ...``."""
    steps = ", ".join(
        f"{s['name']}@{s['prompt_version']}" + (f" <- {'+'.join(s['needs'])}" if s["needs"] else "")
        + (f" [{s['model']}]" if "model" in s else "")
        for s in item["steps"])
    rollout = item.get("rollout")
    tail = f"; rollout {rollout['share']:.0%} to {rollout['candidate']}" if rollout else ""
    return f"kind {item['kind']} ({item['source']}): {steps}{tail}"
