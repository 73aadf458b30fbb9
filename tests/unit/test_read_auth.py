"""Who may read task records and dead letters, and how GET /dlq bounds its cost (no broker needed)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from service.api import peeking
from service.api.app import create_app
from service.api.security import READS_DISABLED
from service.core.settings import Settings
from service.pipeline import dlq

READ = {"Authorization": "Bearer r3ad-token"}
ADMIN = {"Authorization": "Bearer adm1n-token"}
READS = ("/tasks/some-task", "/dlq")


class FakeLedger:
    async def get(self, task_id: str) -> None:
        return None


def client(**settings: Any) -> httpx.AsyncClient:
    s = Settings(**{"admin_token": None, "read_token": None, "reads_open": False, **settings})
    from consumers.progress import Progress

    service = SimpleNamespace(settings=s, ledger=FakeLedger(), runner=SimpleNamespace(progress=Progress()))
    transport = httpx.ASGITransport(app=create_app(service))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.fixture(autouse=True)
def no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlq, "peek", lambda *a, **kw: [])


async def statuses(c: httpx.AsyncClient, headers: dict[str, str] | None = None) -> list[httpx.Response]:
    return [await c.get(path, headers=headers) for path in READS]


def test_reads_are_refused_when_no_token_is_configured() -> None:
    async def scenario() -> None:
        async with client() as c:
            for headers in (None, READ, ADMIN, {"Authorization": "Bearer "}):
                for r in await statuses(c, headers):
                    assert r.status_code == 403 and r.json() == {"detail": READS_DISABLED}

    asyncio.run(scenario())


def test_a_wrong_or_missing_token_answers_401() -> None:
    async def scenario() -> None:
        async with client(read_token="r3ad-token", admin_token="adm1n-token") as c:
            for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic cjNhZC10b2tlbg=="},
                            {"Authorization": "Bearer r3ad-token-and-more"}):
                for r in await statuses(c, headers):
                    assert r.status_code == 401, (r.request.url, headers)
                    assert r.headers["www-authenticate"] == "Bearer" and r.json()["detail"]

    asyncio.run(scenario())


def test_the_read_token_reads_but_does_not_write() -> None:
    async def scenario() -> None:
        async with client(read_token="r3ad-token", admin_token="adm1n-token") as c:
            task, letters = await statuses(c, READ)
            assert task.status_code == 404 and task.json() == {"detail": "unknown task"}
            assert letters.status_code == 200 and letters.json() == []
            r = await c.post("/dlq/replay", json={"reason": "exhausted"}, headers=READ)
            assert r.status_code == 401

    asyncio.run(scenario())


def test_the_admin_token_reads_too() -> None:
    async def scenario() -> None:
        for settings in ({"admin_token": "adm1n-token"}, {"admin_token": "adm1n-token", "read_token": "r3ad-token"}):
            async with client(**settings) as c:
                task, letters = await statuses(c, ADMIN)
                assert (task.status_code, letters.status_code) == (404, 200), settings

    asyncio.run(scenario())


def test_reads_open_opens_reads_but_not_writes() -> None:
    async def scenario() -> None:
        async with client(reads_open=True) as c:
            task, letters = await statuses(c)
            assert (task.status_code, letters.status_code) == (404, 200)
            r = await c.post("/dlq/replay", json={"reason": "exhausted"})
            assert r.status_code == 403

    asyncio.run(scenario())


def test_one_dlq_peek_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[dict[str, Any]] = []

    def slow_peek(kafka: Any, limit: int, partition: int | None, **kw: Any) -> list[Any]:
        calls.append({"limit": limit, **kw})
        started.set()
        assert release.wait(10)
        return []

    monkeypatch.setattr(dlq, "peek", slow_peek)

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with client(read_token="r3ad-token") as c:
            first = asyncio.create_task(c.get("/dlq", headers=READ))
            assert await asyncio.to_thread(started.wait, 10)
            second = await c.get("/dlq", headers=READ)
            release.set()
            done = await first
            third = await c.get("/dlq", headers=READ)  # the slot is free again
            return done, second, third

    first, second, third = asyncio.run(scenario())
    assert first.status_code == 200 and third.status_code == 200
    assert second.status_code == 429 and second.headers["retry-after"] == "1" and second.json()["detail"]
    assert len(calls) == 2 and all(call["timeout_s"] == peeking.DLQ_PEEK_TIMEOUT_S for call in calls)


def test_an_abandoned_peek_keeps_the_slot_until_its_thread_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()

    def slow_peek(*a: Any, **kw: Any) -> list[Any]:
        started.set()
        assert release.wait(10)
        return []

    monkeypatch.setattr(dlq, "peek", slow_peek)

    async def scenario() -> int:
        async with client(read_token="r3ad-token") as c:
            first = asyncio.create_task(c.get("/dlq", headers=READ))
            assert await asyncio.to_thread(started.wait, 10)
            first.cancel()  # the client hangs up; the peek's thread runs on
            with pytest.raises(asyncio.CancelledError):
                await first
            busy = (await c.get("/dlq", headers=READ)).status_code
            release.set()
            return busy

    assert asyncio.run(scenario()) == 429
    assert peeking._peek_slot.acquire(timeout=10)  # given back once the thread ended
    peeking._peek_slot.release()


def test_health_and_readiness_need_no_token_and_the_schema_documents_401_and_403() -> None:
    async def scenario() -> dict[str, Any]:
        async with client(read_token="r3ad-token") as c:
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            spec: dict[str, Any] = (await c.get("/openapi.json")).json()
            return spec

    spec = asyncio.run(scenario())
    for path in ("/tasks/{task_id}", "/dlq"):
        op = spec["paths"][path]["get"]
        assert {"401", "403"} <= set(op["responses"]) and op["security"], path
    assert "429" in spec["paths"]["/dlq"]["get"]["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_a_path_with_control_characters_is_a_bad_request_not_a_missing_route() -> None:
    """Such a path misses the router's patterns: it must not answer 404 before the token check."""

    async def scenario() -> None:
        async with client(read_token="r3ad-token") as c:
            for path in ("/tasks/%0Aabc", "/tasks/a%00b", "/tasks/%7F", "/dlq%0A"):
                for headers in (None, READ):
                    r = await c.get(path, headers=headers)
                    assert r.status_code == 400, (path, headers, r.status_code)
                    assert r.json() == {"detail": "control characters in the request path"}
            assert (await c.get("/tasks/ok-id", headers=READ)).status_code == 404  # the route still matches

    asyncio.run(scenario())
