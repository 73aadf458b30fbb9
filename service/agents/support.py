"""``support_ticket``: an agent that acts. It reads a customer message and files a ticket in the
team's ticketing API through a tool; a ticket that promises a refund above a threshold waits for a
person's approval before it is filed. Offered when ``AGENT_TOOLS__TICKETS_URL`` names the API
(``service.devtools.downstream`` is one to try it with).

The tool is the built-in :class:`~service.agents.tools.HttpTool`: the ticket is created with the
call's idempotency key, the API's by-key lookup reconciles a call that died before its result was
journaled, and cancelling the ticket is its undo, run by ``agent-service task compensate``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.agents.base import Agent, Messages, Previous, Step
from service.agents.helpers import StrictInput, system_message, user_message
from service.agents.tools import HttpTool, ToolCall

TICKET_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "required": ["title", "priority", "refund"],
    "additionalProperties": False,
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 120},
        "priority": {"type": "string", "enum": ["low", "normal", "urgent"]},
        "refund": {"type": "number", "minimum": 0, "maximum": 100000,
                   "description": "the amount to refund the customer, 0 for none"},
    },
}


class SupportInput(StrictInput):
    customer: str = Field(min_length=1, max_length=200)
    message: str = Field(min_length=1, max_length=20_000)


class SupportOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reply: str = Field(min_length=1, description="what to tell the customer")
    status: Literal["filed", "not_filed"]


def ticket_tool(base_url: str) -> HttpTool:
    base = base_url.rstrip("/")
    return HttpTool(
        "open_ticket", f"{base}/tickets", parameters=TICKET_PARAMETERS,
        description="File a ticket for the support team; answers the ticket with its id.",
        status_url=f"{base}/tickets/by-key/{{key}}", undo_url=f"{base}/tickets/{{result[id]}}/cancel",
    )


class FileTicket(Step[SupportInput, SupportOutput]):
    name, prompt_version, output_model = "file", "support-file-v1", SupportOutput
    max_tool_rounds, max_tool_calls = 2, 2

    def __init__(self, tool: HttpTool, approval_above: float, approval_timeout_s: float) -> None:
        self.tools = (tool,)
        self.approval_above, self.approval_timeout_s = approval_above, approval_timeout_s

    def messages(self, task_input: SupportInput, previous: Previous) -> Messages:
        return [system_message("You handle customer messages for a support team. File one ticket with the "
                               "open_ticket tool when the message needs follow-up, then write the reply."),
                user_message(f"Customer: {task_input.customer}\n\n{task_input.message}")]

    def approval(self, task_input: SupportInput, call: ToolCall) -> str | None:
        refund = call.arguments.get("refund", 0)
        if isinstance(refund, int | float) and refund > self.approval_above:
            return f"a refund of {refund:g} is above {self.approval_above:g}"
        return None


def support_agent(tickets_url: str, approval_above: float = 100.0,
                  approval_timeout_s: float = 24 * 3600.0) -> Agent[SupportInput]:
    return Agent("support_ticket", SupportInput,
                 (FileTicket(ticket_tool(tickets_url), approval_above, approval_timeout_s),))
