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
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from dedup.keys import Keys
from dedup.ledger import Ledger, LedgerUnavailable
from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM
from tests.support import classify, metric, produce, read_topic, running, succeeded, wait_for

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


def test_a_result_refused_for_too_few_replicas_is_published_only_once_they_hold_it(
    primary_and_replica: tuple[local.Server, local.Server], make_settings: Any, fake_llm: FakeLLM,
) -> None:
    """The COMPLETE is stored but WAIT finds no replica: the record is retried, and the retry, which
    finds the task succeeded, waits for the replica too before it publishes."""
    primary, replica = primary_and_replica
    s: Settings = make_settings(redis={"url": f"redis://{primary.address}/0"},
                                ledger={"wait_replicas": 1, "wait_timeout_ms": 200})

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            async def stored() -> bool:
                record = await svc.ledger.get("rw-1")
                return record is not None and record.state == "succeeded"

            replica.proc.send_signal(signal.SIGSTOP)
            try:
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"rw-1", classify("rw-1"))])
                await wait_for(stored, 60, what="the stored result")
                await asyncio.sleep(3.0)  # the record is retried many times over while the replica is frozen
                assert metric(svc, "agent_results_published_total") == 0
                record = await svc.ledger.get("rw-1")
                assert record is not None and not record.published
            finally:
                replica.proc.send_signal(signal.SIGCONT)
            await wait_for(lambda: metric(svc, "agent_results_published_total") == 1, 60, what="the result")

    asyncio.run(scenario())
    assert len(succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))) == 1
    assert fake_llm.calls_for("rw-1") == 1
