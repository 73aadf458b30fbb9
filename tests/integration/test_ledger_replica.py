"""WAIT after COMPLETE against a real replica: a result is reported done only once the replica has it.

A primary and a replica (``replicaof``), both Debian's redis-server on free loopback ports. The replica
is frozen with SIGSTOP to stand for one that lags or is cut off.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from dedup.keys import Keys
from dedup.ledger import Ledger, LedgerUnavailable
from service.devtools import local

pytestmark = pytest.mark.integration

FP = "sha256:bbb"
TASKS = 20


@pytest.fixture(scope="module")
def primary_and_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[local.Server, local.Server]]:
    root: Path = tmp_path_factory.mktemp("replication")
    primary = local.start_redis(root / "primary")
    replica = local.start_redis(root / "replica", None, "--replicaof", "127.0.0.1", str(primary.port))
    try:
        client = redis.Redis(port=replica.port)
        deadline = time.monotonic() + 30
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not connect to its primary"
            time.sleep(0.1)
        client.close()
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


async def _complete_all(ledger: Ledger, prefix: str) -> list[BaseException | None]:
    """Claim ``TASKS`` tasks, then complete them all at once (they share pipelines and connections)."""
    claims = [await ledger.claim(f"{prefix}-{i}", FP, "me", "classify") for i in range(TASKS)]

    async def one(i: int) -> None:
        await ledger.complete(f"{prefix}-{i}", claims[i].fence, result='{"a":1}', digest="d", event=b"{}",
                              model="m", prompt_version="p1")

    return list(await asyncio.gather(*(one(i) for i in range(TASKS)), return_exceptions=True))


def test_complete_waits_for_the_replica_on_the_connection_that_wrote(
    primary_and_replica: tuple[local.Server, local.Server],
) -> None:
    primary, replica = primary_and_replica

    async def main() -> None:
        client = aioredis.from_url(f"redis://{primary.address}/0")
        ledger = Ledger(client, keys=Keys(f"t{uuid.uuid4().hex[:8]}"), ttl_s=600,
                        wait_replicas=1, wait_timeout_ms=300)
        try:
            assert await _complete_all(ledger, "live") == [None] * TASKS  # the replica acknowledges them

            replica.proc.send_signal(signal.SIGSTOP)
            try:
                outcomes = await _complete_all(ledger, "frozen")
            finally:
                replica.proc.send_signal(signal.SIGCONT)
            # every one of them, whichever pooled connection it ran on, waited and was refused
            assert all(isinstance(o, LedgerUnavailable) and "WAIT: 0 of 1" in str(o) for o in outcomes), outcomes
            for i in range(TASKS):  # stored on the primary: a retry re-emits it, with no model call
                stored = await ledger.get(f"frozen-{i}")
                assert stored is not None and stored.state == "succeeded"

            # the retry of a refused one: its COMPLETE finds its own result and waits for it again
            again = await ledger.complete("frozen-0", 1, result='{"a":1}', digest="d", event=b"{}",
                                          model="m", prompt_version="p1")
            assert (again.status, again.fence) == ("already", 1)
        finally:
            await client.aclose()

    asyncio.run(main())
