"""The ledger on a Sentinel-managed Redis (``redis+sentinel://``), failed over under load.

A master, a replica and three sentinels (the ``redis_sentinel`` fixture). Many tasks are claimed and
completed at once through the sentinels, as workers do; a quarter of the way in the master is
SIGKILLed (and started again once the sentinels promoted its replica, so that it rejoins as a
replica) or demoted with ``SENTINEL FAILOVER``. A ledger call that fails meanwhile is
``LedgerUnavailable`` and is retried, as the service retries it; never ``LedgerRefused``. Then every
task is run again, as every event would be replayed: a completion the ledger acknowledged and then
lost shows up as a task claimed again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger, LedgerUnavailable
from service.devtools.redis_sentinel import SentinelSet

# a master SIGKILLed under load leaves redis-py connections whose stream writers are freed unclosed
# (asyncio warns in StreamWriter.__del__, whenever the collector gets to them): not this test's leak
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

FP = "sha256:sentinel"
TASKS = 1500
CONCURRENCY = 48
RUN_DEADLINE_S = 240.0


@dataclass
class Tally:
    """What one pass saw: the completions the ledger acknowledged, the model calls, the outages."""

    acked: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)
    unavailable: int = 0
    first_unavailable_at: float | None = None
    last_unavailable_at: float | None = None

    def outage(self) -> None:
        self.unavailable += 1
        now = time.monotonic()
        self.first_unavailable_at = self.first_unavailable_at or now
        self.last_unavailable_at = now


async def _run_task(ledger: Ledger, key: str, tally: Tally) -> None:
    """Claim and complete ``key`` until the ledger holds its result, retrying every outage. A result
    counts as acknowledged when the service would publish it: its COMPLETE answered, or a claim found
    it stored and the replicas confirmed it (with WAIT), as a worker's retry does."""
    while True:
        try:
            claim = await ledger.claim(key, FP, "worker", "classify")
            if claim.decision == "succeeded":
                await ledger.confirm_replicated(key)
                tally.acked.add(key)
                return
            if claim.decision != "claimed":  # busy: a claim whose answer was lost holds the lease
                await asyncio.sleep(0.1)
                continue
            tally.calls[key] += 1  # a model call
            done = await ledger.complete(key, claim.fence, result='{"a":1}', digest="d", event=b"{}",
                                         model="m", prompt_version="p1")
            if done.status in ("ok", "already"):
                tally.acked.add(key)
                return
        except LedgerUnavailable:
            tally.outage()
            await asyncio.sleep(0.05)


async def _pass(ledger: Ledger, keys: list[str], fault: Any = None) -> tuple[Tally, list[str]]:
    """Every task once, ``CONCURRENCY`` at a time. ``fault`` runs in a thread once a quarter is
    acknowledged, and the load goes on until it has ended (with further tasks when the list runs
    out before it): returns the tally and every task run."""
    tally = Tally()
    todo = deque(keys)
    ran: list[str] = []
    faults: list[asyncio.Future[None]] = []

    async def worker() -> None:
        while todo or (faults and not faults[0].done()):
            key = todo.popleft() if todo else f"extra-{len(ran)}"
            ran.append(key)
            await _run_task(ledger, key, tally)
            if fault is not None and not faults and len(tally.acked) >= len(keys) // 4:
                faults.append(asyncio.ensure_future(asyncio.to_thread(fault)))

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), RUN_DEADLINE_S)
    if faults:
        await faults[0]
    return tally, ran


def _wait_for_new_master(sentinels: SentinelSet, old_port: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (port := sentinels.master_port()) == old_port:
        assert time.monotonic() < deadline, "the sentinels promoted no replica"
        time.sleep(0.1)
    return port


def _kill_master(sentinels: SentinelSet, events: list[str]) -> None:
    """SIGKILL the master; once its replica is promoted, start it again (it rejoins as a replica)."""
    old = sentinels.master_port()
    started = time.monotonic()
    sentinels.server(old).kill()
    new = _wait_for_new_master(sentinels, old)
    events.append(f"master {old} killed, {new} promoted after {time.monotonic() - started:.1f} s")
    sentinels.server(old).restart()


def _sentinel_failover(sentinels: SentinelSet, events: list[str]) -> None:
    """``SENTINEL FAILOVER``: the replica is promoted and the master, alive, demoted to a replica."""
    old = sentinels.master_port()
    started = time.monotonic()
    client = redis.Redis(port=sentinels.sentinels[0].port, socket_timeout=5)
    try:
        client.sentinel_failover(sentinels.service)
    finally:
        client.close()
    new = _wait_for_new_master(sentinels, old)
    events.append(f"master {old} demoted, {new} promoted after {time.monotonic() - started:.1f} s")


async def _failover_run(sentinels: SentinelSet, fault: Any, wait_replicas: int) -> dict[str, int]:
    client = connect(sentinels.url(), max_connections=32, socket_timeout=2.0, socket_connect_timeout=2.0)
    ledger = Ledger(client, keys=Keys(f"s{uuid.uuid4().hex[:8]}"), lease_ms=2000, wait_replicas=wait_replicas,
                    wait_timeout_ms=1000)
    keys = [f"task-{i}" for i in range(TASKS)]
    events: list[str] = []
    try:
        first, keys = await _pass(ledger, keys, lambda: fault(sentinels, events))
        not_held = await _not_held(ledger, keys)
        second, _ = await _pass(ledger, keys)
        missing = await _not_held(ledger, keys)
    finally:
        await close(client)
        await asyncio.to_thread(sentinels.wait_ready, 120)  # the next test starts on a healthy set
    figures = {"tasks": len(keys), "acked": len(first.acked), "acked_then_lost": len(not_held & first.acked),
               "not_held_after_first_pass": len(not_held),
               "called_twice_first_pass": sum(1 for n in first.calls.values() if n > 1),
               "called_on_second_pass": sum(second.calls.values()), "unavailable": first.unavailable,
               "unavailable_ms": int(1000 * ((first.last_unavailable_at or 0) - (first.first_unavailable_at or 0)))}
    print(f"\nsentinel {fault.__name__} wait_replicas={wait_replicas}: {events} {figures}")
    assert events, "the fault never ran"
    assert first.unavailable > 0, "the failover was never seen by a ledger call"
    assert not missing, f"{len(missing)} tasks hold no result after both passes"
    # a task whose result the failover took is run again, and only such a task
    assert set(second.calls) == not_held
    return figures


async def _not_held(ledger: Ledger, keys: list[str]) -> set[str]:
    """The tasks whose result the ledger does not hold."""
    records = await asyncio.gather(*(ledger.get(k) for k in keys))
    return {k for k, r in zip(keys, records, strict=True) if r is None or r.state != "succeeded"}


def test_master_killed_under_load_with_wait_loses_no_acknowledged_result(redis_sentinel: SentinelSet) -> None:
    figures = asyncio.run(_failover_run(redis_sentinel, _kill_master, wait_replicas=1))
    assert figures["acked_then_lost"] == 0
    assert figures["called_on_second_pass"] == 0


def test_master_killed_under_load_without_wait_is_measured(redis_sentinel: SentinelSet) -> None:
    """Without WAIT a completion the old master acknowledged and did not pass on is lost: counted
    (printed), and each such task is claimed and completed again on the second pass, never stuck."""
    figures = asyncio.run(_failover_run(redis_sentinel, _kill_master, wait_replicas=0))
    assert figures["called_on_second_pass"] == figures["not_held_after_first_pass"]


def test_sentinel_failover_under_load_with_wait_loses_no_acknowledged_result(redis_sentinel: SentinelSet) -> None:
    figures = asyncio.run(_failover_run(redis_sentinel, _sentinel_failover, wait_replicas=1))
    assert figures["acked_then_lost"] == 0
    assert figures["called_on_second_pass"] == 0


def test_a_demoted_master_is_an_outage_not_a_refusal(redis_sentinel: SentinelSet) -> None:
    """A client that still talks to the old master directly (``redis://``) gets ``READONLY`` after a
    failover: the ledger reports it as an outage to wait out."""
    redis_sentinel.wait_ready(120)
    old = redis_sentinel.master_port()

    async def main() -> None:
        client = connect(f"redis://127.0.0.1:{old}/0", max_connections=4, socket_timeout=2.0)
        ledger = Ledger(client, keys=Keys(f"d{uuid.uuid4().hex[:8]}"), lease_ms=2000)
        try:
            assert (await ledger.claim("before", FP, "worker", "classify")).decision == "claimed"
            await asyncio.to_thread(_sentinel_failover, redis_sentinel, [])
            deadline = time.monotonic() + 60
            while True:  # the demoted master answers READONLY once it follows the new one
                try:
                    await ledger.claim(f"after-{uuid.uuid4().hex}", FP, "worker", "classify")
                except LedgerUnavailable as exc:  # or the demotion closed the connection: try again
                    if "read only replica" in str(exc):
                        return
                assert time.monotonic() < deadline, "the old master kept accepting writes"
                await asyncio.sleep(0.1)
        finally:
            await close(client)

    try:
        asyncio.run(main())
    finally:
        redis_sentinel.wait_ready(120)
