"""The console's security without a broker: login sets a signed role cookie (never the token), reads
need a session, writes the admin role and the session's CSRF token, every page forbids outside
loads and escapes what it shows."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

import httpx

from service.api.app import create_app
from service.core.settings import Settings

READ_TOKEN, ADMIN_TOKEN = "r3ad-token", "adm1n-token"


class FakeLedger:
    async def get(self, task_id: str) -> None:
        return None


def client(**settings: Any) -> httpx.AsyncClient:
    s = Settings(**{"admin_token": ADMIN_TOKEN, "read_token": READ_TOKEN, "reads_open": False, **settings})
    service = SimpleNamespace(settings=s, ledger=FakeLedger(), publisher=SimpleNamespace(send=None), metrics=None)
    transport = httpx.ASGITransport(app=create_app(service))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


async def login(c: httpx.AsyncClient, token: str) -> httpx.Response:
    page = await c.get("/ui/login")
    return await c.post("/ui/login", data={"csrf": csrf_of(page.text), "token": token, "next": "/ui/tasks"})


def test_reads_need_a_session_and_the_cookie_holds_the_role_not_the_token() -> None:
    async def scenario() -> None:
        async with client() as c:
            r = await c.get("/ui/tasks")
            assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
            page = await c.get("/ui/login")
            assert "default-src 'self'" in page.headers["content-security-policy"]
            wrong = await c.post("/ui/login", data={"csrf": csrf_of(page.text), "token": "nope"})
            assert wrong.status_code == 303 and "error=" in wrong.headers["location"]
            no_csrf = await c.post("/ui/login", data={"token": READ_TOKEN})
            assert no_csrf.status_code == 403
            ok = await login(c, READ_TOKEN)
            assert ok.status_code == 303 and ok.headers["location"] == "/ui/tasks"
            cookie = ok.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
            assert READ_TOKEN not in cookie and "Secure" not in cookie  # plain http here
            assert (await c.get("/ui/tasks")).status_code == 200

    asyncio.run(scenario())


def test_writes_need_the_admin_role_and_the_csrf_token_of_the_session() -> None:
    async def scenario() -> None:
        async with client() as c:
            await login(c, READ_TOKEN)
            page = await c.get("/ui/tasks")
            csrf = csrf_of(page.text)  # the logout form's
            r = await c.post("/ui/tasks/t-1/decision", data={"csrf": csrf, "decision": "approved"})
            assert r.status_code == 403 and "admin" in r.text
        async with client() as c:
            await login(c, ADMIN_TOKEN)
            r = await c.post("/ui/tasks/t-1/decision", data={"csrf": "forged", "decision": "approved"})
            assert r.status_code == 403 and "CSRF" in r.text
            r = await c.post("/ui/dlq/replay", data={"sel": "0:1", "confirm": "yes"})
            assert r.status_code == 403
            csrf = csrf_of((await c.get("/ui/tasks")).text)
            r = await c.post("/ui/tasks/t-1/decision", data={"csrf": csrf, "decision": "approved"})
            assert r.status_code == 404  # through to parking.decide: the fake ledger knows no task
            out = await c.post("/ui/logout", data={"csrf": csrf})
            assert out.status_code == 303
            assert (await c.get("/ui/tasks")).status_code == 303  # the session is gone
        async with client() as other:  # a cookie signed by another process's secret is no session
            other.cookies.set("agent_console", "forged.cookie.value", path="/ui")
            assert (await other.get("/ui/tasks")).status_code == 303

    asyncio.run(scenario())


def test_reads_open_needs_no_login_and_what_a_page_echoes_is_escaped() -> None:
    async def scenario() -> None:
        async with client(reads_open=True, read_token=None) as c:
            r = await c.get("/ui/tasks", params={"id": "<script>alert(1)</script>"})
            assert r.status_code == 400
            assert "<script>alert" not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
            assert (await c.get("/ui/login", params={"next": "//evil.example/"})).text.count("//evil") == 0

    asyncio.run(scenario())


def test_the_cookie_is_secure_over_https() -> None:
    async def scenario() -> None:
        s = Settings(admin_token=ADMIN_TOKEN, read_token=None, reads_open=False)
        service = SimpleNamespace(settings=s, ledger=FakeLedger())
        transport = httpx.ASGITransport(app=create_app(service))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="https://t") as c:
            ok = await login(c, ADMIN_TOKEN)
            assert ok.status_code == 303 and "Secure" in ok.headers["set-cookie"]

    asyncio.run(scenario())


def test_the_step_journal_is_shown_in_the_order_of_needs() -> None:
    from service.api.console_views import step_rows as _step_rows

    graph = {"summarize": ("extract", "classify"), "extract": (), "classify": ("extract",)}
    steps = {name: {"digest": f"d-{name}", "prompt_version": "v1"} for name in ("summarize", "classify", "extract")}
    steps["extract-part-001"] = {"digest": "d-part", "prompt_version": "v1"}
    rows = _step_rows({"steps": steps}, graph)
    assert [r["name"] for r in rows] == ["extract", "extract-part-001", "classify", "summarize"]
    assert [r["depth"] for r in rows] == [0, 0, 1, 2]
    assert rows[1]["part"] and rows[3]["needs"] == ("extract", "classify")
    # a kind the registry no longer knows: the journal alone, each step on its own
    assert {r["name"] for r in _step_rows({"steps": steps}, None)} == set(steps)


def test_dead_letters_of_the_last_hour_are_counted_from_the_snapshots_the_overview_keeps() -> None:
    from collections import deque

    from service.api.console_views import recent as _recent

    history: deque[tuple[float, dict[str, float]]] = deque()
    assert _recent(history, 0.0, {"decode": 5.0}) == ({}, 0.0)  # nothing seen before
    assert _recent(history, 30.0, {"decode": 7.0}) == ({"decode": 2.0}, 30.0)  # not a minute yet: no snapshot
    for minute in range(1, 70):
        recent, window = _recent(history, minute * 60.0, {"decode": 5.0 + minute, "schema": float(minute > 65)})
    # an hour back from minute 69 is minute 9 (decode 14); the schema letter came in the last hour
    assert recent == {"decode": 60.0, "schema": 1.0} and window == 3600.0
