"""A 429's Retry-After is shared through Redis: another replica waits it out without being told."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from dedup.client import close, connect
from service.core.metrics import Metrics
from service.llm.guard import EndpointGuard

pytestmark = pytest.mark.integration


def test_retry_after_reaches_other_replicas_through_redis(redis_url: str) -> None:
    async def scenario() -> float:
        client = connect(redis_url)
        prefix = f"t{uuid.uuid4().hex[:8]}"
        try:
            a = EndpointGuard("http://llm:8080/v1", Metrics(), redis=client, key_prefix=prefix)
            b = EndpointGuard("http://llm:8080/v1", Metrics(), redis=client, key_prefix=prefix)
            other = EndpointGuard("http://other:8080/v1", Metrics(), redis=client, key_prefix=prefix)
            await a.retry_after(1.0)  # replica A got a 429 with Retry-After: 1
            await a.retry_after(0.2)  # a shorter one later never shortens the wait
            start = time.monotonic()
            await other.acquire(retry=False)  # another endpoint is not held back
            assert time.monotonic() - start < 0.2
            await b.acquire(retry=False)  # replica B never saw the 429
            return time.monotonic() - start
        finally:
            await close(client)

    waited = asyncio.run(scenario())
    assert 0.8 <= waited < 3.0


def test_concurrent_retry_after_writes_keep_the_longest_wait(redis_url: str) -> None:
    """Replicas writing at once: the shared wait ends up the longest one, never a shorter one."""

    async def scenario() -> int:
        client = connect(redis_url)
        prefix = f"t{uuid.uuid4().hex[:8]}"
        try:
            guards = [
                EndpointGuard("http://llm:8080/v1", Metrics(), redis=client, key_prefix=prefix)
                for _ in range(8)
            ]
            delays = [0.5, 5.0, 1.0, 0.2, 3.0, 0.1, 4.0, 2.0]
            await asyncio.gather(*(g.retry_after(d) for g, d in zip(guards, delays, strict=True)))
            return int(await client.pttl(guards[0].shared_key))
        finally:
            await close(client)

    assert 4500 < asyncio.run(scenario()) <= 5000
