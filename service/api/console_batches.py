"""The console's view of the batch lane (:mod:`service.pipeline.batch_lane`): the batches not ended,
group by group, and the batch a parked call waits in, read from the lane's journal in the ledger."""

from __future__ import annotations

from typing import Any

from dedup.ledger import Ledger
from service.pipeline.batch_lane import journal_of

MAX_ROWS = 200


async def batches_waiting(ledger: Ledger) -> list[dict[str, Any]]:
    """One row per group with calls queued, and per batch not ended (sealed, or submitted and
    polled): its group, number, provider id, state, calls and calls still undecided."""
    journal = journal_of(ledger)
    rows: list[dict[str, Any]] = []
    for group in await journal.groups():
        queued = await journal.queued(group)
        if queued:
            rows.append({"group": group, "n": None, "state": "queued", "batch_id": "", "calls": queued,
                         "left": queued, "sealed_ms": None})
        for n in await journal.pending(group):
            sealed = await journal.sealed(group, n)
            if sealed is not None:
                rows.append({"group": group, "n": n, "state": sealed.state, "batch_id": sealed.batch_id,
                             "calls": len(sealed.ids), "left": len(sealed.left), "sealed_ms": sealed.sealed_ms})
            if len(rows) >= MAX_ROWS:
                return rows
    return rows


async def batch_of(ledger: Ledger, waiting: dict[str, Any]) -> dict[str, Any]:
    """The batch a parked call waits in (``waiting.what == "batch"``): its number (0 while the call is
    queued), provider id and state."""
    group, key = str(waiting.get("group", "")), str(waiting.get("key", ""))
    journal = journal_of(ledger)
    n = await journal.where(group, key) if group and key else 0
    sealed = await journal.sealed(group, n) if n else None
    if sealed is None:
        return {"n": 0, "batch_id": "", "state": "queued"}
    return {"n": n, "batch_id": sealed.batch_id, "state": sealed.state}
