"""A record that waits is listed with why and until when, and its wait ends in an outcome: a revoked
key (only a probe may call, none comes for a long time) holds a task at most AGENT_LLM__MAX_WAIT_S,
then it is dead-lettered ``unavailable``, to be replayed once the endpoint is back."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from service.api.app import create_app
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM, FaultRule
from tests.support import classify, metric, produce, read_topic, running, wait_for

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer s3cret"}


def test_a_wait_for_an_unusable_endpoint_is_listed_and_ends_as_unavailable(make_settings: Any,
                                                                        fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(llm={"max_wait_s": 4.0, "breaker_open_s": 600.0})
    fake_llm.add_fault(FaultRule("error", status=401))  # the key is revoked: the endpoint's fault

    async def scenario() -> list[dict[str, Any]]:
        async with running(s, fake_llm.base_url) as svc:
            transport = httpx.ASGITransport(app=create_app(svc))
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as api:
                produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(b"w-1", classify("w-1"))])

                async def listed() -> list[dict[str, Any]]:
                    answer = await api.get("/waiting", headers=AUTH)
                    assert answer.status_code == 200
                    return list(answer.json())

                await wait_for(listed, 30, what="the task listed as waiting", service=svc)
                waiting = await listed()
                await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "unavailable"}) == 1, 30,
                               what="the wait to end as a dead letter", service=svc)
                assert await listed() == []
                assert (await api.get("/waiting")).status_code == 401  # read access only with a token
                return waiting

    waiting = asyncio.run(scenario())
    assert [w["task_id"] for w in waiting] == ["w-1"]
    assert waiting[0]["why"] == "endpoint (degraded:auth)"
    assert 0 <= waiting[0]["ends_in_s"] <= 4.0
    assert fake_llm.calls_for("w-1") == 1  # the call that met the revoked key; the wait made none
    letters = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    assert [m.headers["dlq.reason"] for m in letters] == [b"unavailable"]
    assert b"degraded:auth" in letters[0].headers["dlq.error"]
