"""The registry of kinds, the default one, and a task made ready for the input topic.

New kinds register in an :class:`AgentRegistry`; the consumer never changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from service.agents.base import Agent
from service.agents.kinds import (
    ClassifyInput,
    ClassifyStep,
    ExtractInput,
    ExtractStep,
    SummarizeInput,
    SummarizeLongStep,
    SummarizeStep,
)
from service.agents.prior_auth import prior_auth_agent
from service.agents.review import review_agent
from service.agents.review_panel import review_panel_agents
from service.agents.tasks import TaskEvent, canonical_json, task_key
from service.core.errors import PoisonError


class AgentRegistry:
    """The kinds a service runs, by name; a kind registers once. Each kind remembers where it came
    from (``source``: "built-in", an entry point, a module, a kinds file), to say so when listed."""

    def __init__(self, agents: Iterable[Agent] = (), *, source: str = "built-in") -> None:
        self._agents: dict[str, Agent] = {}
        self._sources: dict[str, str] = {}
        for agent in agents:
            self.register(agent, source=source)

    def register(self, agent: Agent, *, source: str = "registered in code") -> None:
        if agent.kind in self._agents:
            raise ValueError(f"kind {agent.kind!r} is registered twice: by {self._sources[agent.kind]} "
                             f"and by {source}")
        self._agents[agent.kind] = agent
        self._sources[agent.kind] = source

    def source(self, kind: str) -> str:
        """Where ``kind`` came from."""
        return self._sources[kind]

    def agents(self) -> list[Agent]:
        """Every agent, by kind name."""
        return [self._agents[kind] for kind in self.kinds()]

    def __iter__(self) -> Iterator[Agent]:
        return iter(self.agents())

    def get(self, kind: str) -> Agent:
        try:
            return self._agents[kind]
        except KeyError:
            raise PoisonError("schema", f"unknown kind {kind!r}") from None

    def kinds(self) -> list[str]:
        return sorted(self._agents)

    def widest(self) -> int:
        """The most model calls one task of any kind here can have open at once (:attr:`Agent.width`)."""
        return max((agent.width for agent in self._agents.values()), default=1)


def default_agents() -> AgentRegistry:
    return AgentRegistry([
        Agent("extract", ExtractInput, (ExtractStep(),)),
        Agent("classify", ClassifyInput, (ClassifyStep(),)),
        Agent("summarize", SummarizeInput, (SummarizeStep(),)),
        Agent("summarize_long", SummarizeInput, (SummarizeLongStep(),)),
        prior_auth_agent(),
        review_agent(),
        *review_panel_agents(),
    ])


def prepare_task(event: TaskEvent, agents: AgentRegistry, max_bytes: int) -> tuple[str, bytes]:
    """The record key and value for a task, after the checks the consumer would make.

    Raises :class:`PoisonError` for an unknown kind, an input its agent refuses, or a value over
    ``max_bytes`` (reason ``oversize``).
    """
    agents.get(event.kind).parse_input(event.input)
    value = canonical_json(event.model_dump(mode="json", exclude_none=True)).encode()
    if len(value) > max_bytes:
        raise PoisonError("oversize", f"task is {len(value)} bytes, limit is {max_bytes}")
    return task_key(event), value
