"""The fake model's tool calls: which tool it calls, with which arguments, and the rules a test
uses to choose the arguments (a random instance of the tool's schema is rarely the case under test)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

from service.devtools.fakellm.chat import BadRequest, ChatRequest, Tool
from service.devtools.fakellm.instances import random_instance, violation
from service.devtools.fakellm.scalars import VOCABULARY, SchemaError

# What a tool without ``parameters`` accepts: nothing, so an extra argument breaks it.
_NO_PARAMETERS: Final = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class ToolArguments:
    """The arguments (a JSON object, used as is) of every call of ``tool`` whose request's
    Idempotency-Key contains ``match`` (any request when None)."""

    tool: str
    arguments: Mapping[str, Any]
    match: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tool, str) or not self.tool:
            raise ValueError(f"tool must be a non-empty string: {self.tool!r}")
        if not isinstance(self.arguments, Mapping):
            raise ValueError(f"arguments must be a JSON object: {self.arguments!r}")
        try:
            json.dumps(self.arguments, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"arguments must be plain JSON: {exc}") from exc
        if self.match is not None and not isinstance(self.match, str):
            raise ValueError(f"match must be a string or None: {self.match!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolArguments:
        """A rule from its JSON form; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a tool argument rule must be an object, not {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown tool argument rule fields: {', '.join(sorted(unknown))}")
        if "tool" not in data or "arguments" not in data:
            raise ValueError("a tool argument rule needs a 'tool' and its 'arguments'")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match, "tool": self.tool, "arguments": dict(self.arguments)}

    def applies(self, key: str | None, tool: str) -> bool:
        return tool == self.tool and (self.match is None or (key is not None and self.match in key))


def as_tool_arguments(rule: ToolArguments | Mapping[str, Any]) -> ToolArguments:
    return rule if isinstance(rule, ToolArguments) else ToolArguments.from_dict(rule)


def tool_calls(request: ChatRequest, count: int, rules: Sequence[ToolArguments], key: str | None,
               rng: random.Random, fault: str | None = None) -> list[dict[str, Any]]:
    """``count`` OpenAI tool calls for a request that offers tools, broken as ``fault`` says.

    Raises:
        BadRequest: the parameters schema of a chosen tool is malformed or has no instance.
    """
    calls = []
    for _ in range(count):
        tool = request.tool_choice if isinstance(request.tool_choice, Tool) else rng.choice(request.tools)
        if fault == "unknown_tool":
            name, arguments = _unknown_name(request.tools, rng), "{}"
        elif fault == "invalid_tool_args":
            name, arguments = tool.name, violation(tool.parameters or _NO_PARAMETERS)
        else:
            name, arguments = tool.name, json.dumps(_arguments(tool, rules, key, rng), separators=(",", ":"))
        calls.append({
            "id": f"call_{rng.getrandbits(96):024x}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        })
    return calls


def _arguments(tool: Tool, rules: Sequence[ToolArguments], key: str | None, rng: random.Random) -> Any:
    for rule in rules:
        if rule.applies(key, tool.name):
            return rule.arguments
    if tool.parameters is None:
        return {}
    try:
        return random_instance(tool.parameters, rng)
    except SchemaError as exc:
        raise BadRequest(f"invalid parameters schema of tool {tool.name!r}: {exc}", "tools") from exc


def _unknown_name(tools: Sequence[Tool], rng: random.Random) -> str:
    offered = {tool.name for tool in tools}
    name = f"{rng.choice(VOCABULARY)}_{rng.choice(VOCABULARY)}"
    while name in offered:
        name += "_x"
    return name
