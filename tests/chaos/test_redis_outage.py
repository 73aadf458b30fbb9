"""Redis goes away mid-run: no model call without a ledger, readiness fails, work resumes by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.app import create_app
from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM
from tests.support import classify, metric, produce, running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_redis_outage_pauses_work_and_it_resumes(make_settings: Any, fake_llm: FakeLLM, tmp_path: Path) -> None:
    redis = local.start_redis(tmp_path / "redis")  # a server of its own: this test stops it
    try:
        s: Settings = make_settings(redis={"url": f"redis://{redis.address}/0", "socket_timeout_s": 1.0})

        async def scenario() -> None:
            async with running(s, fake_llm.base_url) as svc:
                app = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t")
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                        [(f"before-{i}".encode(), classify(f"before-{i}", f"b{i}")) for i in range(5)])
                await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 5, what="before")
                await wait_for(lambda: _ready(app), what="ready")
                await asyncio.to_thread(redis.stop)
                calls = fake_llm.stats()["requests"]
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                        [(f"during-{i}".encode(), classify(f"during-{i}", f"d{i}")) for i in range(5)])
                await wait_for(lambda: metric(svc, "agent_paused_partitions") > 0, what="partitions paused")
                assert (await app.get("/readyz")).status_code == 503
                await asyncio.sleep(2.0)
                assert fake_llm.stats()["requests"] == calls  # no model call without a ledger
                await asyncio.to_thread(redis.restart)
                await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 10, 60,
                               what="the tasks held during the outage")
                await wait_for(lambda: _ready(app), 30, what="ready again")
                # one call per task; a call that failed at the model (a timeout on a loaded machine) is retried
                failed = sum(s.value for family in svc.metrics.registry.collect() for s in family.samples
                             if s.name == "agent_llm_requests_total" and s.labels.get("outcome") != "ok")
                assert fake_llm.stats()["requests"] == 10 + failed, fake_llm.stats()
                record = await svc.ledger.get("before-0")
                assert record is not None and record.state == "succeeded"  # AOF kept the ledger
                await app.aclose()

        asyncio.run(scenario())
    finally:
        redis.stop()


async def _ready(app: httpx.AsyncClient) -> bool:
    return (await app.get("/readyz")).status_code == 200
