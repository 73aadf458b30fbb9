"""A typed Python function as a tool: its parameters' JSON Schema made from its signature.

:func:`function_tool` turns a function into a :class:`~service.agents.tools.FunctionTool`. The
function's parameters, with their annotations and defaults, become a pydantic model (``create_model``,
unknown arguments refused) whose JSON Schema is the tool's ``parameters``; its docstring is the
description the model reads. A parameter annotated :class:`ToolCall` is not an argument: it gets the
call itself (its idempotency ``key`` to pass on). A function whose only argument is a pydantic model
takes that model's schema as it is, and gets the arguments as an instance of it::

    @function_tool
    def open_ticket(call: ToolCall, title: str, refund: Annotated[float, Field(ge=0)] = 0) -> Ticket:
        \"\"\"File a ticket for the support team.\"\"\"
        return tracker.open(title, refund, idempotency_key=call.key)

The arguments the model sends are validated by the model before the function runs: arguments it
refuses are a :class:`ToolError` (nothing happened; the model is told why). The function's return
value goes to the model as JSON (a pydantic model, a dataclass, a dict, ...). It may be a coroutine
function; ``reconcile`` and ``undo`` are those of :class:`FunctionTool`.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, overload

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import to_jsonable_python

from service.agents.tasks import describe_validation
from service.agents.tools import FunctionTool, ToolCall, ToolError, maybe_await

ToolFunction = Callable[..., Any]


class _Signature:
    """What a function's signature says of its tool: where the call goes, and the arguments' model."""

    def __init__(self, function: ToolFunction, name: str) -> None:
        try:
            hints = typing.get_type_hints(function, include_extras=True)
        except NameError as exc:  # an annotation naming a class local to a function
            raise ValueError(f"tool {name}: its annotations cannot be resolved ({exc}); "
                             "define the types it names at module level") from None
        self.call_param: str | None = None
        fields: dict[str, Any] = {}
        for param in inspect.signature(function).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
                raise ValueError(f"tool {name}: parameter {param.name!r} must be one that can be named")
            annotation = hints.get(param.name, Any)
            if annotation is ToolCall:
                if self.call_param is not None:
                    raise ValueError(f"tool {name}: only one parameter may take the ToolCall")
                self.call_param = param.name
                continue
            fields[param.name] = (annotation, ... if param.default is param.empty else param.default)
        self.whole: str | None = None  # the one parameter that is a model: the arguments are that model
        self.model: type[BaseModel] = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"),
                                                   **fields)
        if len(fields) == 1:
            ((only, (annotation, default)),) = fields.items()
            if default is ... and isinstance(annotation, type) and issubclass(annotation, BaseModel):
                self.whole, self.model = only, annotation

    def parameters(self) -> dict[str, Any]:
        schema = self.model.model_json_schema()
        schema.pop("title", None)
        return schema

    def arguments(self, call: ToolCall) -> dict[str, Any]:
        try:
            parsed = self.model.model_validate(call.arguments)
        except ValidationError as exc:
            raise ToolError(f"the arguments do not fit: {describe_validation(exc)}") from None
        given: dict[str, Any] = {self.whole: parsed} if self.whole is not None else {k: getattr(parsed, k) for k in self.model.model_fields}
        if self.call_param is not None:
            given[self.call_param] = call
        return given


def _tool(function: ToolFunction, name: str | None, description: str | None, **options: Any) -> FunctionTool:
    tool_name = name or function.__name__
    signature = _Signature(function, tool_name)

    async def run(call: ToolCall) -> Any:
        return to_jsonable_python(await maybe_await(function(**signature.arguments(call))))

    return FunctionTool(tool_name, run, parameters=signature.parameters(),
                        description=description if description is not None else inspect.getdoc(function) or "",
                        **options)


@overload
def function_tool(function: ToolFunction, /) -> FunctionTool: ...
@overload
def function_tool(*, name: str | None = None, description: str | None = None, timeout_s: float = 10.0,
                  settle_s: float | None = None, reconcile: Callable[[ToolCall], Any] | None = None,
                  undo: Callable[[ToolCall, Any], Any] | None = None) -> Callable[[ToolFunction], FunctionTool]: ...


def function_tool(function: ToolFunction | None = None, /, *, name: str | None = None, description: str | None = None,
                  timeout_s: float = 10.0, settle_s: float | None = None,
                  reconcile: Callable[[ToolCall], Any] | None = None,
                  undo: Callable[[ToolCall, Any], Any] | None = None) -> FunctionTool | Callable[[ToolFunction], FunctionTool]:
    """``@function_tool`` or ``@function_tool(name=..., timeout_s=..., reconcile=..., undo=...)``: the
    function as a :class:`FunctionTool` named after it (or ``name``), described by its docstring (or
    ``description``), its parameters' schema made from its signature. ``ValueError`` for a signature
    that cannot be one (``*args``, ``**kwargs``, positional-only parameters, two ``ToolCall`` ones)."""
    options: dict[str, Any] = {"timeout_s": timeout_s, "settle_s": settle_s, "reconcile": reconcile, "undo": undo}
    if function is not None:
        return _tool(function, name, description, **options)
    return lambda decorated: _tool(decorated, name, description, **options)
