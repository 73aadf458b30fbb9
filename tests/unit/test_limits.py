"""One concurrency knob: what a worker does at once follows from AGENT_MAX_IN_FLIGHT, and a cap set
below it is said at start."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel

from service.agents.base import Agent, Step, graph_width
from service.agents.registry import AgentRegistry, default_agents
from service.core.settings import Settings
from service.runtime.limits import REDIS_SPARE, limits, log_limits


class _In(BaseModel):
    text: str


class _Out(BaseModel):
    text: str


def _step(name: str, needs: tuple[str, ...] | None = None) -> Step:
    return type(f"S_{name}", (Step,), {"name": name, "needs": needs, "output_model": _Out})()


@pytest.mark.parametrize(("graph", "width"), [
    ({"a": ()}, 1),
    ({"a": (), "b": ("a",), "c": ("b",)}, 1),  # a chain
    ({"a": (), "b": ("a",), "c": ("a",), "d": ("a",), "e": ("b", "c", "d")}, 3),  # fan out, join
    ({"a": (), "b": (), "c": ("a",), "d": ("b",)}, 2),  # two chains side by side
    ({"a": (), "b": ("a",), "c": (), "d": ("c", "a")}, 2),
    ({"a": (), "b": (), "c": (), "d": ("a", "b", "c"), "e": ("d",), "f": ("d",)}, 3),
])
def test_graph_width_is_the_most_steps_that_can_run_at_once(graph: dict[str, tuple[str, ...]], width: int) -> None:
    assert graph_width(graph) == width


def test_built_in_kinds_open_one_call_per_task_but_review_three() -> None:
    widths = {agent.kind: agent.width for agent in default_agents()}
    assert widths.pop("review") == 3
    assert set(widths.values()) == {1}
    assert default_agents().widest() == 3


def test_a_rollout_counts_the_wider_version() -> None:
    chain = Agent("k", _In, (_step("a"), _step("b")))
    wide = Agent("k", _In, (_step("a", ()), _step("b", ()), _step("c", ("a", "b"))))
    assert Agent("k", _In, chain.steps, candidate=wide, candidate_share=0.1).width == 2


def test_defaults_follow_max_in_flight() -> None:
    s = Settings(max_in_flight=200)
    assert s.llm.max_concurrency is None and s.redis.max_connections is None
    assert s.max_in_flight_per_partition is None
    chains = AgentRegistry([Agent("k", _In, (_step("a"), _step("b")))])
    found = limits(s, chains)
    assert (found.in_flight, found.per_partition, found.calls_per_task, found.model_calls) == (200, 200, 1, 200)
    assert found.redis_connections == 200 + REDIS_SPARE and found.caps == ()
    found = limits(s, default_agents())  # review runs three steps at once
    assert (found.model_calls, found.redis_connections) == (600, 600 + REDIS_SPARE)


def test_a_cap_set_below_the_window_binds_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(max_in_flight=200, max_in_flight_per_partition=50,
                 llm={"max_concurrency": 64}, redis={"max_connections": 32})
    found = limits(s, AgentRegistry([Agent("k", _In, (_step("a"),))]))
    assert (found.per_partition, found.model_calls, found.redis_connections) == (50, 64, 32)
    caplog.set_level(logging.INFO, logger="service.runtime.limits")
    log_limits(found)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3
    assert any("AGENT_LLM__MAX_CONCURRENCY=64" in w and "200" in w for w in warned)
    assert any("AGENT_MAX_IN_FLIGHT_PER_PARTITION=50" in w for w in warned)
    assert any("AGENT_REDIS__MAX_CONNECTIONS=32" in w for w in warned)


def test_a_cap_at_or_above_the_window_is_not_a_cap(caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(max_in_flight=100, llm={"max_concurrency": 500}, redis={"max_connections": 1000})
    found = limits(s, AgentRegistry([Agent("k", _In, (_step("a"),))]))
    assert found.model_calls == 100 and found.redis_connections == 1000 and found.caps == ()


def test_settings_read_the_caps_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_LLM__MAX_CONCURRENCY", "8")
    monkeypatch.setenv("AGENT_REDIS__MAX_CONNECTIONS", "9")
    monkeypatch.setenv("AGENT_MAX_IN_FLIGHT_PER_PARTITION", "10")
    s = Settings()
    assert (s.llm.max_concurrency, s.redis.max_connections, s.max_in_flight_per_partition) == (8, 9, 10)
