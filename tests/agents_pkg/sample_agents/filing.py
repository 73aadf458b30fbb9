"""``ticket_filing``: a customer's complaint understood, then filed in the tracker through a tool, and
a reply with the ticket's id. The tool is a typed method: its parameters' JSON Schema comes from
its signature, its description from its docstring, and the call's idempotency key from its
``ToolCall`` parameter.

Not registered by the entry point (a team adds ``ticket_filing = "sample_agents.filing:agents"``);
the service runs it with ``AGENT_AGENTS=sample_agents.filing:agents``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.sdk import (
    Agent,
    InvalidOutput,
    Messages,
    Previous,
    Step,
    StrictInput,
    ToolCall,
    function_tool,
    system_message,
    user_message,
)

Priority = Literal["low", "normal", "high"]


class Complaint(StrictInput):
    customer: str = Field(min_length=1, max_length=80)
    text: str = Field(min_length=1)


class Facts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    problem: str = Field(min_length=1)
    wants_refund: bool


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ticket_id: str = Field(pattern=r"^T-[0-9]+$")
    reply: str = Field(min_length=1)


class TicketRef(BaseModel):
    id: str
    title: str
    priority: Priority


class Tracker:
    """The support tracker, in memory: one ticket per idempotency key, so a call made again files nothing new."""

    def __init__(self) -> None:
        self.tickets: dict[str, TicketRef] = {}

    def open_ticket(self, call: ToolCall, title: Annotated[str, Field(min_length=3, max_length=120)],
                    priority: Priority = "normal") -> TicketRef:
        """Open a ticket in the support tracker for the customer's problem; returns its id."""
        if call.key not in self.tickets:
            self.tickets[call.key] = TicketRef(id=f"T-{len(self.tickets) + 1}", title=title, priority=priority)
        return self.tickets[call.key]


class Understand(Step[Complaint, Facts]):
    name, prompt_version, output_model = "understand", "filing-understand-v1", Facts
    needs = ()

    def messages(self, task_input: Complaint, previous: Previous) -> Messages:
        return [system_message("State the customer's problem in one sentence, and whether they want a refund."),
                user_message(task_input.text)]


class File(Step[Complaint, Reply]):
    name, prompt_version, output_model = "file", "filing-file-v1", Reply
    needs = ("understand",)

    def __init__(self, tracker: Tracker) -> None:
        self.tools = (function_tool(tracker.open_ticket),)

    def messages(self, task_input: Complaint, previous: Previous) -> Messages:
        facts = previous.get(Understand)  # a Facts
        priority = "high" if facts.wants_refund else "normal"
        return [system_message(f"Open one ticket (priority {priority}) with open_ticket, then reply to the "
                               "customer by name with the ticket's id."),
                user_message(f"Customer: {task_input.customer}\nProblem: {facts.problem}")]

    def check(self, task_input: Complaint, output: Reply) -> None:
        if task_input.customer not in output.reply:
            raise InvalidOutput("schema", f"file: the reply does not name the customer {task_input.customer!r}")

    def approval(self, task_input: Complaint, call: ToolCall) -> str | None:
        return None  # every ticket is filed at once; a step could ask a person first here


def agents(tracker: Tracker | None = None) -> list[Agent]:
    """The kind, filing into ``tracker`` (a new, empty one when None)."""
    return [Agent("ticket_filing", Complaint, (Understand(), File(tracker or Tracker())))]
