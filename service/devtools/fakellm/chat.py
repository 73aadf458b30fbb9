"""The chat-completion request the fake model accepts, checked as strictly as OpenAI checks it:
a client bug (a malformed tool, a tool result that answers no call) fails here, not in production."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from service.devtools.fakellm.prefixes import Marks, prefix_marks

MODEL_NAME: Final = "fake"  # what a request without a model asks for, and /models lists
_TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOOL_CHOICES: Final = frozenset({"auto", "none", "required"})


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the client offers; ``parameters`` is its JSON schema (None: it takes no arguments)."""

    name: str
    parameters: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    schema: Mapping[str, Any] | None
    prompt_chars: int
    tools: tuple[Tool, ...]
    tool_choice: str | Tool  # "auto", "none", "required", or the one tool the client forces
    tool_rounds: int  # assistant messages with tool calls already in the conversation
    prefix: Marks = ()  # the digests of the prompt's prefixes (service.devtools.fakellm.prefixes)
    cached_chars: int = 0  # of the prompt's content, the longest prefix the server saw before

    @property
    def offers_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


def parse_chat(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    model = data.get("model", MODEL_NAME)
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", "model")
    if data.get("stream"):
        raise BadRequest("streaming is not supported by this server", "stream")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    chars, rounds = _conversation(messages)
    tools = _tools(data.get("tools"))
    schema = schema_of(data.get("response_format"))
    sizes = [_chars(m.get("content"), "") for m in messages]
    return ChatRequest(model, schema, chars, tools, _tool_choice(data.get("tool_choice"), tools), rounds,
                       prefix_marks(data.get("tools"), schema, messages, sizes))


def schema_of(response_format: Any) -> Mapping[str, Any] | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise BadRequest("'response_format' must be an object", "response_format")
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequest("'response_format.json_schema.schema' must be an object",
                              "response_format.json_schema")
        schema = spec.get("schema")
    elif kind == "json_object":
        schema = response_format.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise BadRequest("'response_format.schema' must be an object", "response_format.schema")
    elif kind == "text":
        schema = None
    else:
        raise BadRequest(f"unsupported response_format type {kind!r}", "response_format.type")
    return schema


# -- tools ----------------------------------------------------------------------------------------


def _tools(raw: Any) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'tools' must be a non-empty array", "tools")
    tools: dict[str, Tool] = {}
    for index, entry in enumerate(raw):
        where = f"tools[{index}]"
        if not isinstance(entry, dict) or entry.get("type") != "function":
            raise BadRequest(f'{where} must be an object with "type": "function"', where)
        function = entry.get("function")
        if not isinstance(function, dict):
            raise BadRequest(f"{where}.function must be an object", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise BadRequest(f"{where}.function.name must be 1-64 of a-z, A-Z, 0-9, _ and -",
                             f"{where}.function.name")
        if name in tools:
            raise BadRequest(f"{where}.function.name {name!r} is offered twice", f"{where}.function.name")
        if not isinstance(function.get("description", ""), str):
            raise BadRequest(f"{where}.function.description must be a string", f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(f"{where}.function.parameters must be an object", f"{where}.function.parameters")
        tools[name] = Tool(name, parameters)
    return tuple(tools.values())


def _tool_choice(raw: Any, tools: tuple[Tool, ...]) -> str | Tool:
    if raw is None:
        return "auto" if tools else "none"
    if not tools:
        raise BadRequest("'tool_choice' is only allowed when 'tools' are offered", "tool_choice")
    if isinstance(raw, str) and raw in _TOOL_CHOICES:
        return raw
    function = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRequest('\'tool_choice\' must be "auto", "none", "required" or '
                         '{"type": "function", "function": {"name": ...}}', "tool_choice")
    for tool in tools:
        if tool.name == name:
            return tool
    raise BadRequest(f"'tool_choice' forces {name!r}, which is not among the tools", "tool_choice")


# -- messages -------------------------------------------------------------------------------------


def _conversation(messages: list[Any]) -> tuple[int, int]:
    """The characters of the prompt and its assistant tool-call rounds.

    Every tool call must be answered by a ``tool`` message right after its assistant message, and
    every ``tool`` message must answer one of those calls, as OpenAI requires.
    """
    chars = rounds = 0
    pending: dict[str, int] = {}  # call id -> index of the assistant message that made the call
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"{where} must be an object with a 'role'", where)
        role = message["role"]
        content = message.get("content")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or pending.pop(call_id, None) is None:
                raise BadRequest(f"{where}.tool_call_id must name an unanswered call of the assistant "
                                 "message before it", f"{where}.tool_call_id")
            if content is None:
                raise BadRequest(f"{where}.content must be the tool's result", f"{where}.content")
        else:
            _all_answered(pending)
            if message.get("tool_calls") is not None:
                if role != "assistant":
                    raise BadRequest(f"only assistant messages carry tool_calls, not {role!r}",
                                     f"{where}.tool_calls")
                pending = dict.fromkeys(_call_ids(message["tool_calls"], where), index)
                rounds += 1
        chars += _chars(content, where)
    _all_answered(pending)
    return chars, rounds


def _call_ids(calls: Any, where: str) -> list[str]:
    if not isinstance(calls, list) or not calls:
        raise BadRequest(f"{where}.tool_calls must be a non-empty array", f"{where}.tool_calls")
    ids: list[str] = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call, dict) or not isinstance(call.get("id"), str) or not call["id"]
                or call.get("type") != "function" or not isinstance(function, dict)
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str)):
            raise BadRequest(f'{at} must be {{"id": str, "type": "function", "function": {{"name": str, '
                             '"arguments": str}}}}', at)
        if call["id"] in ids:
            raise BadRequest(f"{at}.id {call['id']!r} is used twice", f"{at}.id")
        ids.append(call["id"])
    return ids


def _all_answered(pending: Mapping[str, int]) -> None:
    if pending:
        call_id, index = next(iter(pending.items()))
        raise BadRequest(f"tool call {call_id!r} of messages[{index}] has no tool message answering it",
                         f"messages[{index}].tool_calls")


def _chars(content: Any, where: str) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part["text"]) for part in content
                   if isinstance(part, dict) and isinstance(part.get("text"), str))
    if content is not None:
        raise BadRequest(f"{where}.content must be a string or an array", f"{where}.content")
    return 0
