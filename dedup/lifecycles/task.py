"""A task in the ledger: the states of its hash's ``state`` field and the moves between them.

:data:`TASK` is what the ledger's scripts move a task by. Each script that changes ``state`` is
handed, as arguments, the states its event may start from (:meth:`~dedup.lifecycles.Lifecycle.sources`)
and the state it leads to (:meth:`~dedup.lifecycles.Lifecycle.target`), built from this table by
:class:`dedup.ledger.Ledger`; a task in any other state is answered, not moved. The parked part of the life
(``park``, ``decide``, ``rerun``) is moved by :mod:`dedup.effects`; a parent's wait for the children
it delegated to (``park_children``, ``children_ended``) and a child cancelled before it started
(``cancel``, made by the claim) by :mod:`dedup.children`.

Who published a task's outcome is no state: the ``publish`` event leaves the state as it is and
records ``published_by`` and ``published_how`` (see :mod:`dedup.scripts` for the fields); every
move into ``succeeded`` or ``dead``, and a ``rerun``, clears them.
"""

from __future__ import annotations

from dedup.lifecycles.machine import Lifecycle, Transition

NEW = "new"  # no hash: the task was never claimed (or its keys expired)
RUNNING = "running"
PARKED = "waiting_approval"
WAITING_CHILDREN = "waiting_children"
RESUMING = "resuming"
SUCCEEDED = "succeeded"
FAILED = "failed"
DEAD = "dead"

_LEASE_OUT = "its lease ran out"

TASK = Lifecycle(
    name="task",
    initial=NEW,
    states={
        RUNNING: "claimed: one worker holds it under its fence while its lease (lease_until) lasts",
        PARKED: "parked: a tool call waits for a person's decision or a reconcile answer (waiting)",
        WAITING_CHILDREN: "parked: a step delegated to other kinds and waits for their replies (waiting)",
        RESUMING: "decided, or compensated for a new generation: claimable, to run on",
        SUCCEEDED: "its result is stored (result, event); published_by once it reached its topic",
        FAILED: "released after a failure of its own: claimable again",
        DEAD: "given up (dead_reason); published_by once its dead letter reached the topic",
    },
    transitions=(
        Transition(NEW, "claim", RUNNING, "fence 1"),
        Transition(FAILED, "claim", RUNNING, "a fence one higher"),
        Transition(RESUMING, "claim", RUNNING, "a fence one higher"),
        Transition(NEW, "cancel", DEAD, "the claim finds its parent's cancel mark (agent:{id}:cancel): "
                   "dead(cancelled), it never runs"),
        Transition(RUNNING, "take_over", RUNNING,
                   f"{_LEASE_OUT}, a call under way of another process counts a death"),
        Transition(RUNNING, "crash", DEAD,
                   f"{_LEASE_OUT} with a call under way, the max_deaths-th death: dead(crashed)"),
        Transition(RUNNING, "complete", SUCCEEDED, "the holder's fence, the first result wins"),
        Transition(RUNNING, "fail", FAILED, "the holder's fence, no dead reason"),
        Transition(RUNNING, "die", DEAD, "the holder's fence, with a dead reason"),
        Transition(RUNNING, "expire", DEAD, "past its deadline while another holds it: dead(expired), fence + 1"),
        Transition(RUNNING, "park", PARKED, "the holder's fence, listed in agent:parked by deadline"),
        Transition(PARKED, "decide", RESUMING, "the waiting it was read with is still the one stored"),
        Transition(RUNNING, "park_children", WAITING_CHILDREN,
                   "the holder's fence, a child of the step's plan without a folded reply; listed in agent:parked "
                   "by deadline"),
        Transition(WAITING_CHILDREN, "children_ended", RESUMING,
                   "the reply of the last child of the plan it waits on folded, once"),
        Transition(WAITING_CHILDREN, "decide", RESUMING,
                   "expired (the sweeper): the waiting it was read with is still the one stored"),
        Transition(SUCCEEDED, "publish", SUCCEEDED, "staged before the send, or acked after it"),
        Transition(DEAD, "publish", DEAD, "staged before the send, or acked after it"),
        Transition(DEAD, "revive", FAILED, "an operator redrives its dead letter"),
        Transition(SUCCEEDED, "rerun", RESUMING, "compensated: a new generation"),
        Transition(DEAD, "rerun", RESUMING, "compensated: a new generation"),
        Transition(FAILED, "rerun", RESUMING, "compensated: a new generation"),
    ),
)

__all__ = ["DEAD", "FAILED", "NEW", "PARKED", "RESUMING", "RUNNING", "SUCCEEDED", "TASK", "WAITING_CHILDREN"]
