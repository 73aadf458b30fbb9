"""``review``: a step graph to copy. Research, summarise and critique a document in parallel, then a
synthesis step that reads all three, in the order it names them.

::

    research ----+
    summarise ---+--> synthesis
    critique ----+

The three branches need nothing (``needs = ()``), so they start together; ``synthesis`` needs all
three and starts once each is journaled. A crash after two branches resumes with the third.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from service.agents.base import Agent, Messages, Previous, Step
from service.agents.helpers import StrictInput, system_message, user_message


class ReviewInput(StrictInput):
    document: str = Field(min_length=1)
    audience: str = Field("a general reader", min_length=1, max_length=200)


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResearchOutput(_Output):
    claims: list[str] = Field(max_length=20)
    open_questions: list[str] = Field(max_length=20)


class SummaryOutput(_Output):
    summary: str = Field(min_length=1)


class CritiqueOutput(_Output):
    strengths: list[str] = Field(max_length=20)
    weaknesses: list[str] = Field(max_length=20)


class SynthesisOutput(_Output):
    assessment: str = Field(min_length=1)
    recommendations: list[str] = Field(max_length=20)


def document_prompt(task_input: ReviewInput) -> str:
    """The document and its audience, as every step of a review reads them."""
    return f"Audience: {task_input.audience}\n\nDocument:\n{task_input.document}"


class ResearchStep(Step[ReviewInput, ResearchOutput]):
    name, prompt_version, output_model, needs = "research", "research-v1", ResearchOutput, ()

    def messages(self, task_input: ReviewInput, previous: Previous) -> Messages:
        return [system_message("List the document's factual claims and the questions it leaves open."),
                user_message(document_prompt(task_input))]


class SummariseStep(Step[ReviewInput, SummaryOutput]):
    name, prompt_version, output_model, needs = "summarise", "summarise-v1", SummaryOutput, ()

    def messages(self, task_input: ReviewInput, previous: Previous) -> Messages:
        return [system_message("Summarise the document for the audience in one paragraph."),
                user_message(document_prompt(task_input))]


class CritiqueStep(Step[ReviewInput, CritiqueOutput]):
    name, prompt_version, output_model, needs = "critique", "critique-v1", CritiqueOutput, ()

    def messages(self, task_input: ReviewInput, previous: Previous) -> Messages:
        return [system_message("Name the document's strengths and weaknesses."),
                user_message(document_prompt(task_input))]


class SynthesisStep(Step[ReviewInput, SynthesisOutput]):
    name, prompt_version, output_model = "synthesis", "synthesis-v1", SynthesisOutput
    needs = ("research", "summarise", "critique")

    def messages(self, task_input: ReviewInput, previous: Previous) -> Messages:
        # ``previous`` holds the three outputs in the order ``needs`` names them
        notes = "\n\n".join(f"{name}:\n{json.dumps(output, sort_keys=True)}" for name, output in previous.items())
        return [system_message("Write the review: an overall assessment and concrete recommendations, "
                               "from the research, the summary and the critique."),
                user_message(f"{document_prompt(task_input)}\n\n{notes}")]


def review_agent() -> Agent:
    return Agent("review", ReviewInput, (ResearchStep(), SummariseStep(), CritiqueStep(), SynthesisStep()))
