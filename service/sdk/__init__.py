"""What your own agent imports: the agent model, the helpers for writing a kind, and the errors.

A kind is an :class:`Agent`: a name, an input model and one or more steps, each step one model
call; the steps form a graph (``Step.needs``). The service loads your agents at start from the entry
point group ``agent_service.agents`` or ``AGENT_AGENTS=package.module:attribute`` (docs/AGENTS.md)::

    from service.sdk import Agent, Messages, Previous, Step, StrictInput, system_message, user_message

    class TicketInput(StrictInput):
        text: str

    class Triage(Step[TicketInput, TriageOutput]):  # typed: task_input is a TicketInput
        name, prompt_version, output_model = "triage", "triage-v1", TriageOutput

        def messages(self, task_input: TicketInput, previous: Previous) -> Messages:
            return [system_message("Triage the ticket."), user_message(task_input.text)]

    agents = [Agent("triage", TicketInput, (Triage(),))]  # AGENT_AGENTS=mypkg.triage:agents

The names, and nothing else:

- ``Agent``: a kind of task, its input model and its steps; the result is the last step's output.
- ``AgentRegistry``: the kinds a service runs, by name.
- ``default_agents``: a registry of the built-in kinds (``extract``, ``classify``, ``summarize``,
  ``summarize_long``, ``prior_auth``, ``review``, ``review_panel`` and the three kinds it
  delegates to).
- ``Step``: one model call: a versioned prompt, an output model, and the checks a schema cannot express;
  ``Step[Input, Output]`` types its hooks with the kind's input model and the step's output model.
- ``Previous``: what a step reads of the steps before it: ``previous.get(Summarize)`` is that step's
  output as its model, ``previous["summarize"]`` the JSON data, ``previous.session`` the session view.
- ``DelegateStep``: a step that hands work to other kinds instead of calling the model, and waits
  for them (``mode`` required or optional, ``children(task_input, previous)``; docs/DELEGATION.md).
- ``Delegate``: one child task of a ``DelegateStep``: its kind, input, and optionally another
  deployment's ``topic`` and a time ``budget_s``.
- ``Tool``: a side effect a step may offer the model (``Step.tools``, OpenAI function calling);
  each call runs once by construction (docs/AGENTS.md, "Agents that act").
- ``FunctionTool``: a Python callable as a tool, with an optional reconcile and undo; its
  ``parameters`` a JSON Schema or a pydantic model.
- ``function_tool``: ``@function_tool`` makes a ``FunctionTool`` of a typed function: the parameters'
  schema from its signature, the description from its docstring, a ``ToolCall`` parameter gets the call.
- ``HttpTool``: a webhook or REST call as a tool: sends the call's key as ``Idempotency-Key``.
- ``ToolCall``: one call as a tool sees it: its idempotency ``key``, arguments, task, step, ordinal, fence.
- ``Reconciled``: a tool's answer to "did the call with this key land?": landed, absent or unknown.
- ``ToolError``: raise it from a tool when the downstream refused the call (nothing happened).
- ``ToolUnknown``: raise it when whether the call took effect is unknown (it is then reconciled).
- ``Messages``: the chat messages a step sends, ``[{"role": ..., "content": ...}]``.
- ``StrictInput``: a base for input models that refuses unknown fields.
- ``system_message``: a system prompt that asks for the step's JSON object and nothing else.
- ``user_message``: a user message.
- ``Session``: a kind's sessions (``Agent(..., session=Session())``): the turns, or a state and its
  ``reduce``; docs/SESSIONS.md.
- ``SESSION``: the key of the session in a step's ``previous``.
- ``SessionView``: the session as a step sees it: its version, turns, state and summary.
- ``session_messages``: ``session_messages(view)`` renders a view's summary and turns as chat messages.
- ``TaskEvent``: the task as a producer writes it to the input topic.
- ``AgentError``: the root of the service's own exceptions.
- ``InvalidOutput``: raise it from ``Step.check`` to refuse an answer (retried, then dead-lettered).
- ``PoisonError``: a task that can never succeed (dead-lettered at once), as ``Agent.parse_input`` raises it.

Everything else in ``service`` is the service's own and may change without notice.
"""

from service.agents.base import Agent, Messages, Previous, Step
from service.agents.delegation import Delegate, DelegateStep
from service.agents.function_tools import function_tool
from service.agents.helpers import StrictInput, system_message, user_message
from service.agents.registry import AgentRegistry, default_agents
from service.agents.session import SESSION, Session, SessionView, session_messages
from service.agents.tasks import TaskEvent
from service.agents.tools import FunctionTool, HttpTool, Reconciled, Tool, ToolCall, ToolError, ToolUnknown
from service.core.errors import AgentError, InvalidOutput, PoisonError

__all__ = [
    "Agent",
    "AgentError",
    "AgentRegistry",
    "Delegate",
    "DelegateStep",
    "FunctionTool",
    "HttpTool",
    "InvalidOutput",
    "Messages",
    "PoisonError",
    "Previous",
    "Reconciled",
    "SESSION",
    "Session",
    "SessionView",
    "Step",
    "StrictInput",
    "TaskEvent",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolUnknown",
    "default_agents",
    "function_tool",
    "session_messages",
    "system_message",
    "user_message",
]
