"""Every lifecycle of the service, each one table of states and transitions.

- :data:`~dedup.lifecycles.task.TASK`: a task in the ledger;
- :data:`~dedup.lifecycles.tool_call.TOOL_CALL`: one tool call of a step;
- :data:`~dedup.lifecycles.parked.PARKED`: a task parked for a decision.
"""

from dedup.lifecycles.machine import IllegalTransition, Lifecycle, Transition

__all__ = ["IllegalTransition", "Lifecycle", "Transition"]
