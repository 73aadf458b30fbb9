"""``ticket_triage``: a support ticket summarised, then routed to a queue. Two steps, a chain.

Written against :mod:`service.sdk` only, in its typed form (``mypy --strict`` checks this package:
``make lint``), and registered through the entry point group ``agent_service.agents`` (see
``pyproject.toml``): the service finds it once this package is installed. ``sample_agents.filing``
is a kind that acts, through a tool made from a typed function.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.sdk import Agent, InvalidOutput, Messages, Previous, Step, StrictInput, system_message, user_message

QUEUES = ("billing", "technical", "account", "other")


class Ticket(StrictInput):
    subject: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1)


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    summary: str = Field(min_length=1)


class Routing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: Literal["billing", "technical", "account", "other"]
    urgent: bool


class Summarize(Step[Ticket, Summary]):
    name, prompt_version, output_model = "summarize", "triage-summarize-v1", Summary
    needs = ()  # the first step: it reads no other

    def messages(self, task_input: Ticket, previous: Previous) -> Messages:
        return [system_message("Summarise the support ticket in one or two sentences."),
                user_message(f"Subject: {task_input.subject}\n\n{task_input.body}")]


class Route(Step[Ticket, Routing]):
    name, prompt_version, output_model = "route", "triage-route-v1", Routing
    needs = ("summarize",)  # reads the summary
    temperature = 0.0  # the same ticket, the same queue

    def messages(self, task_input: Ticket, previous: Previous) -> Messages:
        summary = previous.get(Summarize)  # a Summary, as the step before answered it
        return [system_message(f"Route the ticket to one queue of {', '.join(QUEUES)}; say if it is urgent."),
                user_message(summary.summary)]

    def check(self, task_input: Ticket, output: Routing) -> None:
        if output.queue not in QUEUES:  # the output model says so already: a check shows the hook
            raise InvalidOutput("schema", f"route: unknown queue {output.queue!r}")


def agents() -> list[Agent]:
    """What the entry point names: the agents of this package."""
    return [Agent("ticket_triage", Ticket, (Summarize(), Route()))]
