"""A task parked for a decision: waiting for an approval, a reconcile answer or the children it
delegated to, decided, resuming.

A parked task has had its Kafka offset committed: the ledger holds the obligation. In the ledger its
state is ``waiting_approval`` (``waiting`` says what for) until a decision is recorded, once, by
:data:`dedup.effects.RESOLVE`; then ``resuming`` (claimable) while its original record is produced
again; a claim by the ordinary pipeline ends the wait (the task's own lifecycle goes on from there).
The decisions are the events: which one a wait accepts is the table's to say. A parent waiting for
its children (``waiting_children``, its own ledger state) is decided by the fold of its last
child's reply (:mod:`dedup.children`), or expired by the sweeper.

The initial pseudo-state ``task`` is the task's own lifecycle (running under a claim, or ended and
compensated). The ledger's state of each parked state is :data:`LEDGER_STATE`: ``decided`` and ``expired`` differ
from ``resuming`` only in that the task is still listed in ``agent:parked`` (its record not yet
produced again: the sweeper produces it).
"""

from __future__ import annotations

from collections.abc import Iterable

from dedup.lifecycles.machine import Lifecycle, Transition

_T = Transition

PARKED = Lifecycle(
    name="parked task",
    initial="task",
    states={
        "waiting_approval": "parked until a person approves or rejects the call it waits on",
        "waiting_reconcile": "parked until an operator says whether the call it waits on landed",
        "waiting_children": "parked until every child of a delegating step has replied (its reply folded)",
        "waiting_batch": "parked until the provider's batch holding its model call has ended (the batch lane)",
        "decided": "a decision recorded, once; its record not produced again yet (listed for the sweeper)",
        "expired": "its deadline passed first: decided `expired`; its record not produced again yet",
        "resuming": "its record produced again: the next claim replays its journal and goes on",
    },
    transitions=(
        _T("task", "park_approval", "waiting_approval", "the step's approval rule names a reason and no "
           "approval of the call is journaled (holder's fence)"),
        _T("task", "park_reconcile", "waiting_reconcile", "the downstream cannot tell whether an intended "
           "call landed (holder's fence)"),
        _T("task", "park_children", "waiting_children", "a child of the step's plan has no folded reply "
           "(holder's fence)"),
        _T("task", "park_batch", "waiting_batch", "the step's call is queued for the batch lane (holder's "
           "fence)"),
        _T("task", "rerun", "decided", "a compensated task that ended is set to run again as a new generation"),
        _T("waiting_approval", "approved", "decided", "a person, once"),
        _T("waiting_approval", "rejected", "decided", "a person, once"),
        _T("waiting_approval", "expired", "expired", "the deadline passed (the sweeper)"),
        _T("waiting_reconcile", "landed", "decided", "an operator, once (with the call's result)"),
        _T("waiting_reconcile", "absent", "decided", "an operator, once: the call runs again with its key"),
        _T("waiting_reconcile", "expired", "expired", "the deadline passed (the sweeper)"),
        _T("waiting_children", "children_ended", "decided", "the last child's reply folded, once"),
        _T("waiting_batch", "batch_done", "decided", "its batch completed with a line for the call (the "
           "poller, once)"),
        _T("waiting_batch", "batch_failed", "decided", "its batch failed, expired or was cancelled, or has no "
           "line for the call: the call goes online (the poller, once)"),
        _T("waiting_batch", "expired", "expired", "its share of the deadline passed (the sweeper): online"),
        _T("waiting_children", "expired", "expired", "the deadline passed (the sweeper)"),
        _T("decided", "resume", "resuming", "its record produced (by the decision, else by the sweeper)"),
        _T("expired", "resume", "resuming", "its record produced (by the decision, else by the sweeper)"),
        _T("resuming", "resume", "resuming", "decided before: produced once more (its claim finds it running "
           "or done)"),
    ),
)

# each parked state as the ledger's task hash holds it (field ``state``)
LEDGER_STATE = {"waiting_approval": "waiting_approval",
                "waiting_reconcile": "waiting_approval", "waiting_children": "waiting_children",
                "waiting_batch": "waiting_approval", "decided": "resuming", "expired": "resuming",
                "resuming": "resuming"}

# what a wait is for (``waiting.what``) -> its parked state
WAITING = {"approval": "waiting_approval", "reconcile": "waiting_reconcile", "children": "waiting_children",
           "batch": "waiting_batch"}

# the decisions a wait accepts, in table order: the events out of its waiting state
DECISIONS = {what: tuple(t.event for t in PARKED.transitions if t.source == state)
             for what, state in WAITING.items()}


def ledger_states(states: Iterable[str]) -> tuple[str, ...]:
    """The ledger's states of ``states`` (each once, in order): what a script's guard compares to."""
    return tuple(dict.fromkeys(LEDGER_STATE[s] for s in states))


def parked_state(ledger_state: str, what: str | None = None, listed: bool = False) -> str | None:
    """The parked state of a task the ledger holds in ``ledger_state`` (None: not parked).

    ``what`` is what a waiting task waits for; a ``resuming`` task still ``listed`` has its
    decision recorded and its record not produced again (``decided`` or ``expired``: the same
    moves lead on, so it is read as ``decided``)."""
    if ledger_state == "waiting_approval":
        return WAITING.get(what or "approval")
    if ledger_state == LEDGER_STATE["waiting_children"]:
        return "waiting_children"
    if ledger_state == "resuming":
        return "decided" if listed else "resuming"
    return None
