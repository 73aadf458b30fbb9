"""``GET /schedules`` and ``GET /schedules/{name}`` against a service on the session's broker and
redis-server: every declared schedule with its declaration, what the ledger keeps of it (``last``,
counts, the newest fire time, the lease's holder) and what follows from it (the next slot, its fire
time, how late it is); an unknown name answers 404, a read without a token 401."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from service.api.app import create_app
from service.core.schedule_spec import to_ms
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import Service, build, ensure_topics

pytestmark = pytest.mark.integration

READ = {"Authorization": "Bearer r3ad"}
HOURLY = {"name": "hourly", "kind": "classify", "every_s": 3600, "catch_up": "all", "max_catch_up": 5,
          "input": {"text": "check {slot}", "labels": ["ok", "broken"]}}
NIGHTLY = {"name": "nightly", "kind": "classify", "cron": "30 2 * * *", "timezone": "Europe/Paris",
           "jitter_s": 300, "tenant": "acme", "priority": "batch", "deadline_s": 900,
           "input": {"text": "the day before {slot_date}", "labels": ["ok", "broken"]}}


@contextlib.asynccontextmanager
async def api(s: Settings, fake_llm: FakeLLM) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    await asyncio.to_thread(ensure_topics, s)
    service = build(s, llm_base_url=fake_llm.base_url)
    try:
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
            yield service, client
    finally:
        await service.aclose()


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_schedules_show_their_declaration_ledger_state_and_next_slot(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(read_token="r3ad", scheduler={"schedules": [HOURLY, NIGHTLY]})

    async def scenario() -> None:
        async with api(s, fake_llm) as (service, client):
            r = await client.get("/schedules", headers=READ)
            assert r.status_code == 200, r.text
            fresh = r.json()
            assert [v["name"] for v in fresh] == ["hourly", "nightly"]  # declared order
            hourly = fresh[0]
            assert hourly["seen"] is False and hourly["last"] is None and hourly["holder"] is None
            assert (hourly["produced"], hourly["skipped"], hourly["last_fired"]) == (0, 0, None)
            assert hourly["late_s"] <= 60  # not seen yet: it starts at now - grace, no history

            # the ledger as a replica leaves it: started 3 h back, one slot produced, one replica leasing
            now = datetime.now(UTC)
            top = now.replace(minute=0, second=0, microsecond=0)
            schedules = service.ledger.schedules
            assert await schedules.start("hourly", to_ms(top - timedelta(hours=3)))
            assert await schedules.lease("hourly", "replica-1", 60_000)
            answer = await schedules.advance("hourly", "replica-1", to_ms(top - timedelta(hours=3)),
                                             to_ms(top - timedelta(hours=2)), 1, 2, to_ms(top - timedelta(hours=2)))
            assert answer == "ok"

            r = await client.get("/schedules/hourly", headers=READ)
            assert r.status_code == 200, r.text
            view = r.json()
            assert view["seen"] is True and view["holder"] == "replica-1"
            assert view["last"] == (top - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
            assert (view["produced"], view["skipped"]) == (1, 2)
            assert parse(view["last_fired"]) == top - timedelta(hours=2)
            assert parse(view["next_slot"]) == parse(view["next_fire"]) == top - timedelta(hours=1)  # no jitter
            late = (datetime.now(UTC) - (top - timedelta(hours=1))).total_seconds()
            assert late - 60 <= view["late_s"] <= late + 1  # due an hour ago and more, not produced
            assert {k: view[k] for k in ("kind", "every_s", "cron", "timezone", "catch_up", "max_catch_up",
                                         "grace_s", "deadline_s", "tenant", "priority", "jitter_s")} == {
                "kind": "classify", "every_s": 3600, "cron": None, "timezone": "UTC", "catch_up": "all",
                "max_catch_up": 5, "grace_s": 60.0, "deadline_s": 3600.0, "tenant": None,
                "priority": "interactive", "jitter_s": 0.0}

            r = await client.get("/schedules/nightly", headers=READ)
            assert r.status_code == 200, r.text
            nightly = r.json()
            assert (nightly["cron"], nightly["every_s"], nightly["timezone"]) == ("30 2 * * *", None, "Europe/Paris")
            assert (nightly["tenant"], nightly["priority"], nightly["deadline_s"]) == ("acme", "batch", 900.0)
            slot, fire = parse(nightly["next_slot"]), parse(nightly["next_fire"])
            local = slot.astimezone(ZoneInfo("Europe/Paris"))
            assert (local.hour, local.minute) == (2, 30)  # read in its zone, shown in UTC
            assert timedelta(0) <= fire - slot <= timedelta(seconds=300)  # within the jitter
            assert nightly["late_s"] == 0.0 and fire > datetime.now(UTC) - timedelta(seconds=60)

            listed = (await client.get("/schedules", headers=READ)).json()
            assert listed[0]["last"] == view["last"] and listed[0]["produced"] == 1

            r = await client.get("/schedules/weekly", headers=READ)
            assert r.status_code == 404 and r.json() == {"detail": "unknown schedule"}
            for path in ("/schedules", "/schedules/hourly"):
                r = await client.get(path)
                assert r.status_code == 401, r.text

    asyncio.run(scenario())


def test_no_schedules_is_an_empty_list(make_settings: Any, fake_llm: FakeLLM) -> None:
    async def scenario() -> None:
        async with api(make_settings(reads_open=True), fake_llm) as (_, client):
            r = await client.get("/schedules")
            assert r.status_code == 200 and r.json() == [], r.text
            assert (await client.get("/schedules/hourly")).status_code == 404

    asyncio.run(scenario())
