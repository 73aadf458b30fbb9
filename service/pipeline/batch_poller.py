"""The batch lane's poller, a turn of every replica's sweeper: seal the groups that are due, submit
each sealed batch once, poll it, and decide the waits of its calls once it ended.

One worker at a time holds a batch (its lease, :meth:`dedup.batches.Batches.lease`), renewed every
third of ``lease_s`` while the worker acts on it, so a large upload or download slower than the lease
does not let a second worker take the batch meanwhile; a worker whose renewal was refused (Redis away
longer than the lease) does not make the batch it uploaded, and leaves it to the holder. Submitting is
made safe against a crash at any point:

- before the upload, or between the upload and the batch: nothing is journaled; the next holder
  uploads again (an unused file is left at the provider) and makes the batch;
- between the provider's answer and the journal: the next holder asks the provider for the batch of
  that name (:meth:`BatchAPI.find`) and journals the one it finds instead of making a second;
- after the journal: the batch id is read back (first writer wins).

When the batch ended, each call's wait is decided once through :func:`~service.pipeline.parking.decide`
(``batch_done`` with its output line, or ``batch_failed``), which resumes the task the ordinary way; a
call whose task is not parked on it yet (queued moments before its worker parked it) is tried again
next turn, and one whose wait was decided otherwise (``expired`` by the sweeper) or ended is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dedup.batches import Batches, Sealed
from dedup.effects import decision_field
from dedup.ledger import Ledger, LedgerUnavailable
from service.core.batch_settings import BatchSettings
from service.core.metrics import Metrics
from service.llm.batch_api import BatchAPI, RemoteBatch, read_output
from service.pipeline.batch_lane import CHAT_URL, journal_of
from service.pipeline.parking import NotDecidable, Send, decide

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Hold:
    """This worker's hold on one batch while it acts on it."""

    lost: bool = False  # a renewal was refused: another worker holds the batch now
    ended: bool = False  # every call of the batch is decided: the lease is released


class BatchPoller:
    """The batch lane's turn in one replica."""

    def __init__(self, ledger: Ledger, send: Send, metrics: Metrics, settings: BatchSettings, api: BatchAPI,
                 owner: str, audit_topic: str | None = None) -> None:
        self.ledger, self.send, self.metrics, self.settings = ledger, send, metrics, settings
        self.api, self.owner, self.audit_topic = api, owner, audit_topic
        self.journal: Batches = journal_of(ledger)

    async def turn(self, now: datetime) -> int:
        """Seal, submit, poll and decide what is due; returns the batches acted on."""
        now_ms = int(now.timestamp() * 1000)
        acted, oldest = 0, now_ms
        for group in await self.journal.groups():
            while await self.journal.seal(group, self.settings.max_size, int(self.settings.max_age_s * 1000), now_ms):
                acted += 1
            for n in await self.journal.pending(group):
                sealed = await self.journal.sealed(group, n)
                if sealed is None:
                    continue
                oldest = min(oldest, sealed.sealed_ms)
                if await self.journal.lease(group, n, self.owner, int(self.settings.lease_s * 1000)):
                    async with self._holding(sealed) as hold:
                        acted += await self._one(sealed, now, hold)
                    if hold.ended:
                        await self.journal.release(group, n, self.owner)
        self.metrics.batch_age.set(max(0.0, (now_ms - oldest) / 1000))
        return acted

    @contextlib.asynccontextmanager
    async def _holding(self, sealed: Sealed) -> AsyncIterator[_Hold]:
        """Renew the batch's lease while the body runs."""
        hold = _Hold()
        renewer = asyncio.get_running_loop().create_task(self._renew(sealed, hold), name=f"batch-lease:{sealed.name}")
        try:
            yield hold
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew(self, sealed: Sealed, hold: _Hold) -> None:
        ttl_ms = int(self.settings.lease_s * 1000)
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                held = await self.journal.lease(sealed.group, sealed.n, self.owner, ttl_ms)
            except LedgerUnavailable as exc:
                log.debug("batch %s: lease not renewed this turn: %s", sealed.name, exc)
                continue
            if not held:
                hold.lost = True
                log.warning("batch %s: another worker holds it now; this one leaves it", sealed.name)
                return

    async def _one(self, sealed: Sealed, now: datetime, hold: _Hold) -> int:
        if not sealed.batch_id:
            await self._submit(sealed, hold)
            return 1
        remote = await self.api.get(sealed.batch_id)
        if not remote.ended:
            return 0
        outputs: dict[str, dict[str, Any]] = {}
        for file_id in (remote.error_file_id, remote.output_file_id):  # an output line wins over an error
            if file_id:
                outputs.update(read_output(await self.api.content(file_id)))
        entries = await self.journal.lines(sealed.group, sealed.left)
        decided = [cid for cid in sealed.left
                   if await self._decide(entries.get(cid), cid, outputs.get(cid), remote, now)]
        left = await self.journal.decided(sealed.group, sealed.n, decided)
        if left == 0:
            self.metrics.batches.labels(status=remote.status).inc()
            hold.ended = True
            log.info("batch %s (%s) %s: its %d calls decided", sealed.name, remote.id, remote.status, len(sealed.ids))
        return 1

    async def _submit(self, sealed: Sealed, hold: _Hold) -> None:
        remote = await self.api.find(sealed.name)  # made before a crash, not journaled
        file_id = ""
        if remote is None:
            entries = await self.journal.lines(sealed.group, sealed.ids)
            lines = [entries[cid]["line"] for cid in sealed.ids if cid in entries]
            file_id = await self.api.upload(sealed.name.replace(":", "-"), lines)
            if hold.lost:  # its holder now finds no batch, and makes one of its own upload
                log.warning("batch %s: lease lost during the upload; file %s left unused", sealed.name, file_id)
                return
            remote = await self.api.create(file_id, CHAT_URL, sealed.name)
            self.metrics.batches.labels(status="submitted").inc()
        journaled = await self.journal.submitted(sealed.group, sealed.n, remote.id, file_id)
        log.info("batch %s: %d calls submitted as %s", sealed.name, len(sealed.ids), journaled)

    async def _decide(self, entry: dict[str, str] | None, cid: str, line: dict[str, Any] | None,
                      remote: RemoteBatch, now: datetime) -> bool:
        """Decide the wait of call ``cid`` once; False: its task is not parked on it yet (next turn)."""
        if entry is None:
            return True
        task_key = entry["task"]
        record = await self.ledger.get(task_key)
        if record is None:
            return True
        waiting = json.loads(record.fields.get("waiting") or "null") if record.state == "waiting_approval" else None
        if isinstance(waiting, dict) and waiting.get("what") == "batch":
            if waiting.get("key") != cid:
                return True  # waits on another call now
            await self._resolve(task_key, remote, line, now)
            return True
        if record.state in ("running", "resuming"):
            journal = await self.ledger.effects.journal(task_key)
            if decision_field("batch", entry["step"], 0) not in journal:
                return False  # not parked yet
            if record.state == "resuming":  # decided, perhaps by a turn that stopped before producing it
                await self._resolve(task_key, remote, line, now)  # produces it again (a duplicate is skipped)
        return True

    async def _resolve(self, task_key: str, remote: RemoteBatch, line: dict[str, Any] | None, now: datetime) -> None:
        ok = remote.status == "completed" and line is not None and line.get("status") == 200
        with contextlib.suppress(NotDecidable):  # decided meanwhile (the sweeper's expiry)
            await decide(self.ledger, self.send, self.metrics, now, task_key, "batch_done" if ok else "batch_failed",
                         by=f"batch {remote.id}", reason=remote.status, result=line if ok else None,
                         audit_topic=self.audit_topic)
