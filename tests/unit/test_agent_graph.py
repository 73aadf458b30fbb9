"""An agent's steps form a graph, checked when the agent is made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import BaseModel

from service.agents.base import Agent, Messages, Step
from service.agents.helpers import StrictInput
from service.agents.registry import default_agents


class In(StrictInput):
    text: str


class Out(BaseModel):
    answer: str


def step(name: str, needs: tuple[str, ...] | None = None) -> Step:
    class S(Step):
        output_model = Out

        def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
            return []

    s = S()
    s.name, s.needs = name, needs
    return s


def test_a_plain_list_of_steps_is_a_chain() -> None:
    agent = Agent("chain", In, (step("a"), step("b"), step("c")))
    assert dict(agent.graph) == {"a": (), "b": ("a",), "c": ("b",)}


def test_needs_make_a_graph_and_keep_their_order() -> None:
    agent = Agent("fan", In, (step("x", ()), step("y", ()), step("z", ()), step("join", ("z", "x", "y"))))
    assert dict(agent.graph) == {"x": (), "y": (), "z": (), "join": ("z", "x", "y")}


@pytest.mark.parametrize(("steps", "message"), [
    ((step("a"), step("b", ("nope",))), "step 'b' needs unknown step 'nope'"),
    ((step("a", ("b",)), step("b", ("a",))), "cycle"),
    ((step("a", ("a",)),), "cycle"),
    ((step("a"), step("a", ())), "step 'a' is named twice"),
    ((step("a", ()), step("b", ("a", "a"))), "names a step twice"),
    ((), "has no step"),
])
def test_a_broken_graph_is_refused_when_the_agent_is_made(steps: tuple[Step, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Agent("broken", In, steps)


def test_review_is_built_in_and_fans_out_before_its_join() -> None:
    agent = default_agents().get("review")
    assert dict(agent.graph) == {"research": (), "summarise": (), "critique": (),
                                 "synthesis": ("research", "summarise", "critique")}
    assert agent.steps[-1].name == "synthesis"  # the result is the join's output


def versioned(version: str) -> Agent:
    s = step("answer")
    s.prompt_version = version
    return Agent("triage", In, (s,))


def test_a_rollout_sends_a_stable_share_of_task_keys_to_the_candidate() -> None:
    primary, candidate = versioned("v1"), versioned("v2")
    agent = Agent("triage", In, primary.steps, candidate=candidate, candidate_share=0.5)
    keys = [f"task-{i}" for i in range(10_000)]
    chosen = [agent.version_for(k) for k in keys]
    share = sum(1 for a in chosen if a is candidate) / len(keys)
    assert 0.48 < share < 0.52
    assert [agent.version_for(k) for k in keys] == chosen  # a redelivery takes the same version
    assert agent.other_version("answer@v2") is agent and agent.other_version("answer@v1") is candidate
    none = Agent("triage", In, primary.steps, candidate=candidate, candidate_share=0.0)
    assert all(none.version_for(k) is none for k in keys[:100])
    every = Agent("triage", In, primary.steps, candidate=candidate, candidate_share=1.0)
    assert all(every.version_for(k) is candidate for k in keys[:100])


@pytest.mark.parametrize(("candidate", "share", "message"), [
    ("same", 0.5, "same prompt versions"),
    ("other-kind", 0.5, "of kind 'other'"),
    ("v2", 1.5, "within 0..1"),
    (None, 0.5, "without a candidate"),
])
def test_a_broken_rollout_is_refused(candidate: str | None, share: float, message: str) -> None:
    base = versioned("v1")
    cand: Agent | None = None
    if candidate == "same":
        cand = versioned("v1")
    elif candidate == "other-kind":
        cand = Agent("other", In, versioned("v2").steps)
    elif candidate == "v2":
        cand = versioned("v2")
    with pytest.raises(ValueError, match=message):
        Agent("triage", In, base.steps, candidate=cand, candidate_share=share)


def test_a_map_reduce_step_must_split_a_field_of_its_input() -> None:
    s = step("long")
    s.fit, s.chunk_field = "map_reduce", "nope"
    with pytest.raises(ValueError, match="splits 'nope', which is not a field of its input"):
        Agent("long", In, (s,))
    s.chunk_field = "text"
    assert Agent("long", In, (s,)).journaled  # one step, but its pieces are journaled
    s.fit = "truncate"
    with pytest.raises(ValueError, match="fit must be refuse or map_reduce"):
        Agent("long", In, (s,))
