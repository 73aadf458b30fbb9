"""The batch lane's poller on a real Redis and the fake model's Batch API: a worker whose upload of a
batch takes longer than the batch's lease keeps the lease (renewed while it submits), so a second
worker polling meanwhile neither uploads the batch again nor makes a second batch of it."""

from __future__ import annotations

import asyncio
import uuid

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.core.batch_settings import BatchSettings
from service.core.metrics import Metrics
from service.devtools.fakellm import FakeLLM
from service.llm.batch_api import BatchAPI, request_line
from service.pipeline.base import utcnow
from service.pipeline.batch_lane import CHAT_URL, journal_of
from service.pipeline.batch_poller import BatchPoller

GROUP = "fake:fake"


async def never_sent(topic: str, key: bytes | None, value: bytes | None, headers: object) -> None:
    raise AssertionError("no batch ended: nothing is decided")


def test_an_upload_slower_than_the_batch_lease_keeps_the_lease(redis_url: str, fake_llm: FakeLLM) -> None:
    fake_llm.batches.set_faults(upload_delay_s=2.0, delay_s=600)  # four leases long; then in progress
    settings = BatchSettings(max_age_s=0, lease_s=0.5)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}

    async def main() -> int:
        client = connect(redis_url)
        ledger = Ledger(client, keys=Keys(f"u{uuid.uuid4().hex[:8]}"), ttl_s=600)
        apis = [BatchAPI(fake_llm.base_url, "key"), BatchAPI(fake_llm.base_url, "key")]
        try:
            for i in range(3):
                await journal_of(ledger).enqueue(GROUP, f"c{i}", f"t{i}", "answer",
                                                 request_line(f"c{i}", CHAT_URL, body), 0)
            first, second = (BatchPoller(ledger, never_sent, Metrics(), settings, api, f"worker-{n}")
                             for n, api in enumerate(apis))
            uploading = asyncio.create_task(first.turn(utcnow()))
            await asyncio.sleep(0.3)  # the first worker sealed the batch, took its lease, and uploads it
            assert not uploading.done() and fake_llm.batches.stats()["uploads"] == 0
            turns = 0
            while not uploading.done():  # the second worker tries while the first uploads
                await second.turn(utcnow())
                turns += 1
                await asyncio.sleep(0.1)
            await uploading
            for _ in range(5):  # and after it, the batch submitted and held, nothing more to submit
                await second.turn(utcnow())
            sealed = await journal_of(ledger).sealed(GROUP, 1)
            assert sealed is not None and sealed.state == "submitted" and sealed.batch_id
            return turns
        finally:
            for api in apis:
                await api.aclose()
            await close(client)

    turns = asyncio.run(main())
    stats = fake_llm.batches.stats()
    assert stats["uploads"] == 1, f"the batch was uploaded twice: {stats}"
    assert stats["created_by_name"] == {f"{GROUP}:1": 1}, f"the batch was made twice: {stats}"
    assert turns >= 5, "the second worker tried during the upload"
