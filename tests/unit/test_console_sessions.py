"""Console sessions behind more than one replica: every replica built from the same settings signs
and checks cookies and CSRF tokens with the same key, and what a replica keeps of revoked sessions
ends with the sessions' lifetime."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

import httpx
from pydantic import SecretStr

from service.api.app import create_app
from service.core.settings import Settings

READ_TOKEN, ADMIN_TOKEN = "r3ad-token", "adm1n-token"


class FakeLedger:  # no Redis client: the console keeps revoked sessions in the process
    async def get(self, task_id: str) -> None:
        return None


def app_of(settings: Settings) -> Any:
    service = SimpleNamespace(settings=settings, ledger=FakeLedger(), publisher=SimpleNamespace(send=None),
                              metrics=None)
    return create_app(service)  # type: ignore[arg-type]


def client_of(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def settings(**extra: Any) -> Settings:
    return Settings(**{"admin_token": ADMIN_TOKEN, "read_token": READ_TOKEN, "reads_open": False, **extra})


async def cross(s: Settings) -> None:
    """Log in on one replica, then read and write on the other with that cookie and CSRF token."""
    a, b = app_of(s), app_of(s)
    async with client_of(a) as on_a, client_of(b) as on_b:
        page = await on_a.get("/ui/login")
        ok = await on_a.post("/ui/login", data={"csrf": csrf_of(page.text), "token": ADMIN_TOKEN, "next": "/ui"})
        assert ok.status_code == 303 and ok.headers["location"] == "/ui"
        on_b.cookies = on_a.cookies
        page_b = await on_b.get("/ui/tasks")
        assert page_b.status_code == 200, "the other replica refused the session"
        csrf_a = csrf_of((await on_a.get("/ui/tasks")).text)
        assert csrf_of(page_b.text) == csrf_a
        r = await on_b.post("/ui/tasks/t-1/decision", data={"csrf": csrf_a, "decision": "approved"})
        assert r.status_code == 404  # through the CSRF check to parking.decide: the fake ledger knows no task


def test_two_replicas_of_the_same_settings_accept_each_others_sessions_and_csrf_tokens() -> None:
    asyncio.run(cross(settings()))


def test_a_configured_session_secret_signs_the_sessions_and_a_login_form_works_across_replicas() -> None:
    s = settings(http={"session_secret": "a-shared-secret-of-the-fleet"})
    assert isinstance(s.http.session_secret, SecretStr)
    asyncio.run(cross(s))

    async def login_form_across() -> None:  # the login form from one replica, posted to the other
        async with client_of(app_of(s)) as on_a, client_of(app_of(s)) as on_b:
            page = await on_a.get("/ui/login")
            on_b.cookies = on_a.cookies
            ok = await on_b.post("/ui/login", data={"csrf": csrf_of(page.text), "token": READ_TOKEN, "next": "/ui"})
            assert ok.status_code == 303 and ok.headers["location"] == "/ui"

    asyncio.run(login_form_across())


def test_the_key_follows_the_secret_and_the_tokens() -> None:
    from service.api.console import session_key

    assert session_key(settings()) == session_key(settings())
    assert session_key(settings()) != session_key(settings(admin_token="another"))
    shared = settings(http={"session_secret": "s3cret"})
    assert session_key(shared) == session_key(settings(admin_token="another", http={"session_secret": "s3cret"}))
    assert session_key(shared) != session_key(settings())
    assert ADMIN_TOKEN.encode() not in session_key(settings())


def test_revoked_sessions_kept_in_the_process_are_pruned_when_their_lifetime_ends() -> None:
    from service.api.console import SESSION_MAX_AGE_S, Sessions

    now = [1_000.0]
    sessions = Sessions(b"k" * 32, clock=lambda: now[0])

    async def scenario() -> None:
        cookie, session = sessions.issue("admin")
        assert await sessions.read(cookie) is not None
        await sessions.revoke(session)
        assert await sessions.read(cookie) is None
        assert len(sessions.revoked_here) == 1
        now[0] += SESSION_MAX_AGE_S + 1  # the cookie itself has expired: nothing left to remember
        sessions.issue("read")  # any later use prunes
        assert len(sessions.revoked_here) == 0

    asyncio.run(scenario())
