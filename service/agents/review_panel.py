"""``review_panel``: the ``review`` of :mod:`service.agents.review`, its three branches handed to kinds
of their own instead of run as steps, then a synthesis from their outputs in the order it names them.

::

    review_panel:  panel (delegates) ----------------------> synthesis (model)
                      |-- 0: review_research   research (model)
                      |-- 1: review_summary    summarise (model)
                      '-- 2: review_critique   critique (model)

Each child is a task of its own (``<task id>/panel/0`` ... ``/2``) on this deployment's input topic,
run once by whichever replica claims it, and may be scaled, budgeted and deployed apart from the
parent. The delegation is ``optional``: a child that fails leaves the review written from the
other two, flagged ``degraded``, rather than no review. The three child kinds are kinds like any
other: a producer may send them tasks directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from service.agents.base import Agent, Messages, Previous, Step
from service.agents.delegation import Delegate, DelegateStep
from service.agents.helpers import system_message, user_message
from service.agents.review import (
    CritiqueStep,
    ResearchStep,
    ReviewInput,
    SummariseStep,
    SynthesisOutput,
    document_prompt,
)

# the child kinds, in the order the synthesis reads them: (kind, what the synthesis calls its output)
PANEL = (("review_research", "research"), ("review_summary", "summary"), ("review_critique", "critique"))


class PanelStep(DelegateStep[ReviewInput]):
    name, prompt_version, needs, mode = "panel", "panel-v1", (), "optional"

    def children(self, task_input: ReviewInput, previous: Previous) -> list[Delegate]:
        return [Delegate(kind, task_input.model_dump()) for kind, _ in PANEL]


def panel_notes(panel: Mapping[str, Any]) -> str:
    """The children's outputs in declared order; a child that failed is named, with its reason."""
    names = dict(PANEL)
    notes = []
    for child in panel["children"]:
        label = names.get(child["kind"], child["kind"])
        if child["state"] == "succeeded":
            notes.append(f"{label}:\n{json.dumps(child['result'], sort_keys=True)}")
        else:
            notes.append(f"{label}: missing ({child.get('reason', 'failed')})")
    return "\n\n".join(notes)


class PanelSynthesisStep(Step[ReviewInput, SynthesisOutput]):
    name, prompt_version, output_model, needs = "synthesis", "panel-synthesis-v1", SynthesisOutput, ("panel",)

    def messages(self, task_input: ReviewInput, previous: Previous) -> Messages:
        return [system_message("Write the review: an overall assessment and concrete recommendations, from the "
                               "research, the summary and the critique that follow (any that is missing, "
                               "leave out)."),
                user_message(f"{document_prompt(task_input)}\n\n{panel_notes(previous['panel'])}")]


def review_panel_agents() -> list[Agent]:
    """``review_panel`` and the three kinds it delegates to."""
    return [
        Agent("review_panel", ReviewInput, (PanelStep(), PanelSynthesisStep())),
        Agent("review_research", ReviewInput, (ResearchStep(),)),
        Agent("review_summary", ReviewInput, (SummariseStep(),)),
        Agent("review_critique", ReviewInput, (CritiqueStep(),)),
    ]
