"""A stall is visible: with a record in flight and none finishing, ``/readyz`` answers 503 naming
what holds it, and ``/healthz`` fails after the longer bound; both recover once records finish."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.app import create_app
from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM
from tests.support import classify, produce, read_topic, running, wait_for

pytestmark = pytest.mark.integration


def test_a_redis_outage_with_a_record_in_flight_is_named_by_readyz_and_fails_healthz_after_restart_s(
    make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str, tmp_path: Path,
) -> None:
    redis_server = local.start_redis(tmp_path / "redis")
    s: Settings = make_settings(redis={"url": f"redis://{redis_server.address}/0"},
                                liveness={"stall_s": 1.0, "restart_s": 4.0})
    fake_llm.latency_s = 1.5  # the record is in flight when Redis goes

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as service:
            transport = httpx.ASGITransport(app=create_app(service))
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as http:
                await wait_for(lambda: service.runner.progress.stalled_s() == 0, 10, what="idle")
                assert (await http.get("/readyz")).status_code == 200
                task_id = f"t-{uuid.uuid4().hex[:8]}"
                await asyncio.to_thread(produce, kafka_bootstrap, s.kafka.input_topic,
                                        [(task_id.encode(), classify(task_id))])
                await wait_for(lambda: service.runner.in_flight == 1, 60, what="the record in flight")
                redis_server.kill()

                async def named() -> bool:
                    r = await http.get("/readyz")
                    return r.status_code == 503 and r.json()["stalled"] == "redis outage"

                await wait_for(named, 60, 0.2, what="/readyz naming the outage", service=service)
                body = (await http.get("/readyz")).json()
                assert body["checks"]["progress"] is False and body["stalled_s"] >= 1.0
                async def unhealthy() -> bool:
                    return (await http.get("/healthz")).status_code == 503

                await wait_for(unhealthy, 60, 0.2, what="/healthz to fail after restart_s", service=service)
                assert (await http.get("/healthz")).json() == {"status": "stalled"}

                await asyncio.to_thread(redis_server.restart)

                async def ready() -> bool:
                    return (await http.get("/readyz")).status_code == 200

                await wait_for(ready, 90, 0.2, what="/readyz 200 after Redis came back", service=service)
                assert (await http.get("/healthz")).status_code == 200
                results = await asyncio.to_thread(read_topic, kafka_bootstrap, s.kafka.results_topic, expect=1,
                                                  timeout_s=60)
                assert [m.key for m in results] == [task_id.encode()]

    try:
        asyncio.run(scenario())
    finally:
        redis_server.stop()
