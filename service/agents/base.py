"""The agent model: an agent is a kind of task made of steps, each step one model call.

A step is a versioned prompt template with an output model. The model's JSON schema travels
with the request as ``response_format``; the answer is validated against the model and the step's
own checks (exact field names, a label from the list, a word limit) before anything is written.

The steps form a graph. A step names the steps whose recorded outputs it reads (``needs``); by
default it reads the step declared before it, so a plain list of steps is a chain. Steps with no
dependency between them run concurrently, and a step that needs several starts once all of them
are journaled and sees their outputs in the order it names them. An agent with an unknown step
name or a cycle is refused when it is made, not when a task runs.

A step is generic in its input and output model, ``Step[TicketInput, Summary]``: its hooks get the
task's input as that model, and :class:`Previous` hands the outputs of the steps it reads back as
their models (``previous.get(Summarize)`` is a ``Summary``) or, by name, as the JSON data the
journal holds (``previous["summarize"]``). A bare ``Step`` is ``Step[Any, Any]``: the older form.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from typing import Any, Generic, overload

from pydantic import BaseModel, ValidationError
from typing_extensions import TypeVar

from service.agents.session import SESSION, Session, SessionView
from service.agents.tasks import describe_validation
from service.agents.tools import Tool, ToolCall
from service.core.errors import InvalidOutput, PoisonError
from service.core.settings import UNAVAILABLE_POLICIES

Messages = list[dict[str, str]]

# a step's input is only ever passed in: a step written for a base model runs on its subclasses
InputT = TypeVar("InputT", bound=BaseModel, default=Any, contravariant=True)
OutputT = TypeVar("OutputT", bound=BaseModel, default=Any)
_Out = TypeVar("_Out", bound=BaseModel)
AgentInputT = TypeVar("AgentInputT", bound=BaseModel, default=Any)
_Default = TypeVar("_Default")


class Previous(Mapping[str, Any]):
    """What a step reads: the recorded outputs of the steps it needs, by step name as JSON data
    (``previous["summarize"]``), or by step as its output model (``previous.get(Summarize)`` or
    ``previous[Summarize]``, a class or an instance); the task's session view under ``SESSION``."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = dict(data or {})

    @overload
    def __getitem__(self, key: str) -> Any: ...
    @overload
    def __getitem__(self, key: type[Step[Any, _Out]] | Step[Any, _Out]) -> _Out: ...

    def __getitem__(self, key: str | type[Step[Any, Any]] | Step[Any, Any]) -> Any:
        if isinstance(key, str):
            return self._data[key]
        if key.name not in self._data:
            raise KeyError(f"step {key.name!r} is not among the steps this one reads (its needs)")
        return key.output_model.model_validate(self._data[key.name])

    @overload
    def get(self, key: str, /) -> Any: ...
    @overload
    def get(self, key: str, default: _Default, /) -> Any | _Default: ...
    @overload
    def get(self, key: type[Step[Any, _Out]] | Step[Any, _Out], /) -> _Out: ...

    def get(self, key: Any, default: Any = None, /) -> Any:
        """By name: the JSON data, or ``default``. By step: its output as its model (``KeyError`` when
        the step is not among those this one reads: its ``needs`` say which)."""
        if isinstance(key, str):
            return self._data.get(key, default)
        return self[key]

    @property
    def session(self) -> SessionView | None:
        """The task's session as it entered (None for a kind without sessions)."""
        view = self._data.get(SESSION)
        return view if isinstance(view, SessionView) else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Previous({self._data!r})"


class Step(Generic[InputT, OutputT]):
    """One model call. Subclasses set ``name``, ``prompt_version`` and ``output_model``.

    ``Step[In, Out]``: the task's input is an ``In`` (the agent's input model) and the answer an
    ``Out`` (``output_model``); the hooks below are typed with them."""

    name: str = "answer"
    prompt_version: str = "v1"
    output_model: type[OutputT]
    # the steps whose outputs this one reads, in the order it sees them: None is the step declared
    # before it (none for the first), () none at all (a root that runs at once)
    needs: tuple[str, ...] | None = None
    model: str | None = None  # the model to ask, when not the endpoint's default
    temperature: float | None = None  # when not the endpoint's default
    # an input too large for the model's window: "refuse" (dead-lettered as oversize) or "map_reduce":
    # the input field ``chunk_field`` is split on paragraph boundaries into pieces that fit, the step
    # runs on each (each journaled), and :meth:`reduce_messages` combines their outputs into one
    fit: str = "refuse"
    chunk_field: str | None = None
    # tools the model may call (OpenAI function calling): the step runs the model's tool-call loop,
    # at most ``max_tool_rounds`` rounds and ``max_tool_calls`` calls, each call run once (tools.py)
    tools: tuple[Tool, ...] = ()
    max_tool_rounds: int = 4
    max_tool_calls: int = 8
    approval_timeout_s: float = 24 * 3600.0  # a call waiting for approval longer is dead-lettered `expired`

    def schema(self, task_input: InputT, previous: Previous) -> dict[str, Any]:
        return self.output_model.model_json_schema()

    def messages(self, task_input: InputT, previous: Previous) -> Messages:
        raise NotImplementedError

    def check(self, task_input: InputT, output: OutputT) -> None:
        """Checks the schema cannot express. Raise :class:`InvalidOutput` to refuse."""

    def approval(self, task_input: InputT, call: ToolCall) -> str | None:
        """Why ``call`` needs a person's approval before it runs (None: it runs at once). The task
        parks in the ledger until an approval, a rejection or :attr:`approval_timeout_s` decides."""
        return None

    def reduce_messages(self, task_input: InputT, partials: list[dict[str, Any]]) -> Messages:
        """For ``fit = "map_reduce"``: the request that combines the outputs of the pieces, in order."""
        raise NotImplementedError(f"step {self.name} has fit={self.fit!r} but no reduce_messages")

    def parse(self, task_input: InputT, content: str) -> dict[str, Any]:
        """Validate a model answer and return it as plain JSON data."""
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise InvalidOutput("not_json", f"{self.name}: answer is not JSON: {str(exc)[:120]}") from exc
        try:
            output = self.output_model.model_validate(data)
        except ValidationError as exc:
            raise InvalidOutput("schema", f"{self.name}: {describe_validation(exc)}") from exc
        self.check(task_input, output)
        return output.model_dump(mode="json")


def _check_tools(kind: str, step: Step) -> None:
    names = [t.name for t in step.tools]
    if len(set(names)) != len(names):
        raise ValueError(f"agent {kind!r}: step {step.name!r} offers a tool name twice")
    if step.tools and step.fit == "map_reduce":
        raise ValueError(f"agent {kind!r}: step {step.name!r}: a map_reduce step cannot offer tools")
    if step.max_tool_rounds < 1 or step.max_tool_calls < 1:
        raise ValueError(f"agent {kind!r}: step {step.name!r}: max_tool_rounds and max_tool_calls must be >= 1")


@dataclass(frozen=True)
class Agent(Generic[AgentInputT]):
    """A kind of task: its input model and its steps; the result is the last step's output.

    Made with an unknown step in a ``needs``, a step named twice or a cycle, it raises ``ValueError``.
    """

    kind: str
    input_model: type[AgentInputT]
    steps: tuple[Step[AgentInputT, Any], ...]  # typed steps must take this input model (or a base of it)
    # a rollout: this share of task keys (a stable hash of the key, so a redelivery takes the same
    # version) runs ``candidate``, a new version of the same kind; the rest run this one
    candidate: Agent[AgentInputT] | None = None
    candidate_share: float = 0.0
    # while the primary model endpoint is unavailable (its breaker open, or it is degraded): "wait"
    # for it, "fallback" to the first fallback endpoint that accepts (the result is flagged
    # degraded), or "fail_fast" (dead letter `unavailable`); None takes AGENT_LLM__UNAVAILABLE
    unavailable: str | None = None
    # its tasks naming a session run one at a time per session and update its state (docs/SESSIONS.md)
    session: Session | None = None
    # its tasks can wait: each model call of a step without tools goes through the provider's Batch
    # API at its lower price (service.pipeline.batch_lane), unless the task is `priority: interactive`
    batch: bool = False
    # step name -> the names of the steps it reads, in its order (computed from the steps' ``needs``)
    graph: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"agent {self.kind!r} has no step")
        names = [s.name for s in self.steps]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"agent {self.kind!r}: step {twice[0]!r} is named twice")
        graph: dict[str, tuple[str, ...]] = {}
        for i, step in enumerate(self.steps):
            needs = step.needs if step.needs is not None else tuple(names[i - 1:i])
            unknown = [n for n in needs if n not in names]
            if unknown:
                raise ValueError(f"agent {self.kind!r}: step {step.name!r} needs unknown step {unknown[0]!r}")
            if len(set(needs)) != len(needs):
                raise ValueError(f"agent {self.kind!r}: step {step.name!r} names a step twice in its needs")
            if step.fit not in ("refuse", "map_reduce"):
                raise ValueError(f"agent {self.kind!r}: step {step.name!r}: fit must be refuse or map_reduce")
            _check_tools(self.kind, step)
            if step.fit == "map_reduce" and step.chunk_field not in self.input_model.model_fields:
                raise ValueError(f"agent {self.kind!r}: step {step.name!r} splits {step.chunk_field!r}, "
                                 "which is not a field of its input")
            graph[step.name] = tuple(needs)
        try:
            tuple(TopologicalSorter(graph).static_order())
        except CycleError as exc:
            cycle = " -> ".join(exc.args[1])
            raise ValueError(f"agent {self.kind!r}: its steps form a cycle: {cycle}") from None
        object.__setattr__(self, "graph", graph)
        if self.unavailable not in (None, *UNAVAILABLE_POLICIES):
            raise ValueError(f"agent {self.kind!r}: unavailable must be one of {', '.join(UNAVAILABLE_POLICIES)}, "
                             f"not {self.unavailable!r}")
        self._check_rollout()

    def _check_rollout(self) -> None:
        if not 0.0 <= self.candidate_share <= 1.0:
            raise ValueError(f"agent {self.kind!r}: candidate_share must be within 0..1, not {self.candidate_share}")
        candidate = self.candidate
        if candidate is None:
            if self.candidate_share:
                raise ValueError(f"agent {self.kind!r}: a candidate_share without a candidate")
            return
        if candidate.kind != self.kind:
            raise ValueError(f"agent {self.kind!r}: its candidate is of kind {candidate.kind!r}")
        if candidate.candidate is not None:
            raise ValueError(f"agent {self.kind!r}: a candidate cannot have a candidate of its own")
        if candidate.prompt_version == self.prompt_version:
            raise ValueError(f"agent {self.kind!r}: the candidate has the same prompt versions "
                             f"({self.prompt_version}); give the changed steps a new version")

    def version_for(self, task_key: str) -> Agent[AgentInputT]:
        """The version that runs the task ``task_key``: the candidate for a stable share of keys."""
        if self.candidate is None or not self.candidate_share:
            return self
        bucket = int.from_bytes(hashlib.sha256(f"{self.kind}\0{task_key}".encode()).digest()[:8], "big") / 2**64
        return self.candidate if bucket < self.candidate_share else self

    def other_version(self, prompt_version: str) -> Agent[AgentInputT] | None:
        """In a rollout, the version that did not answer with ``prompt_version`` (None without one)."""
        if self.candidate is None:
            return None
        return self if prompt_version == self.candidate.prompt_version else self.candidate

    @property
    def width(self) -> int:
        """The most model calls one task of this kind can have open at once: the widest set of steps
        with no path between them (each of them can be ready at the same moment), over both versions
        in a rollout. A chain is 1; a ``map_reduce`` step calls the model for its pieces one at a time."""
        own = graph_width(self.graph)
        return own if self.candidate is None else max(own, self.candidate.width)

    @functools.cached_property
    def journaled(self) -> bool:
        """Whether the steps' outputs are journaled: with more than one step, or pieces of one."""
        return len(self.steps) > 1 or any(s.fit == "map_reduce" for s in self.steps)

    @functools.cached_property
    def read_steps(self) -> frozenset[str]:
        """The steps whose output another step reads."""
        return frozenset(need for needs in self.graph.values() for need in needs)

    @functools.cached_property
    def _by_name(self) -> dict[str, Step]:
        return {s.name: s for s in self.steps}

    def step(self, name: str) -> Step:
        return self._by_name[name]

    def parse_input(self, raw: dict[str, Any]) -> AgentInputT:
        try:
            return self.input_model.model_validate(raw)
        except ValidationError as exc:
            raise PoisonError("schema", f"input of {self.kind}: {describe_validation(exc)}") from exc

    def result(self, outputs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """The task's result: the last step's output."""
        return outputs[self.steps[-1].name]

    @functools.cached_property
    def prompt_version(self) -> str:
        """Each step's name and prompt version: read several times a task, made once (the steps
        of an agent are fixed when it is made)."""
        return "+".join(f"{s.name}@{s.prompt_version}" for s in self.steps)


def graph_width(graph: Mapping[str, tuple[str, ...]]) -> int:
    """The largest antichain of a step graph (step -> the steps it needs): by Dilworth's theorem,
    the steps less a maximum matching of "runs before" pairs (a minimum chain cover)."""
    later: dict[str, set[str]] = {name: set() for name in graph}  # step -> every step that runs after it
    for name in reversed(list(TopologicalSorter(graph).static_order())):  # a step after all that need it
        for need in graph[name]:
            later[need] |= {name} | later[name]
    matched: dict[str, str] = {}  # a later step -> the earlier one it is chained to

    def augment(name: str, seen: set[str]) -> bool:
        for after in later[name]:
            if after in seen:
                continue
            seen.add(after)
            if after not in matched or augment(matched[after], seen):
                matched[after] = name
                return True
        return False

    pairs = sum(augment(name, set()) for name in graph)
    return len(graph) - pairs
