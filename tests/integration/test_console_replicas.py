"""Console sessions across two replicas sharing a real redis-server: a logout on one replica is
refused on the other, and the revocation is kept in Redis only as long as the session could live."""

from __future__ import annotations

import asyncio
import re
import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.api.app import create_app
from service.core.settings import Settings

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "adm1n-token"


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def test_a_logout_on_one_replica_holds_on_the_other_and_its_record_expires(redis_url: str) -> None:
    from service.api.console import SESSION_MAX_AGE_S

    prefix = f"t{uuid.uuid4().hex[:8]}"
    s = Settings(admin_token=ADMIN_TOKEN, reads_open=False, redis={"url": redis_url, "key_prefix": prefix})

    async def scenario() -> None:
        client = connect(redis_url)
        try:
            def app() -> Any:
                ledger = Ledger(client, keys=Keys(prefix), ttl_s=600)
                service = SimpleNamespace(settings=s, ledger=ledger, publisher=SimpleNamespace(send=None),
                                          metrics=None)
                return create_app(service)  # type: ignore[arg-type]

            a, b = app(), app()
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://t") as on_a, \
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=b), base_url="http://t") as on_b:
                page = await on_a.get("/ui/login")
                ok = await on_a.post("/ui/login", data={"csrf": csrf_of(page.text), "token": ADMIN_TOKEN})
                assert ok.status_code == 303
                on_b.cookies = on_a.cookies
                kept = dict(on_a.cookies)  # what a stolen or replayed cookie would be
                assert (await on_b.get("/ui/tasks")).status_code == 200
                csrf = csrf_of((await on_a.get("/ui/tasks")).text)
                out = await on_a.post("/ui/logout", data={"csrf": csrf})
                assert out.status_code == 303
                for name, value in kept.items():
                    on_b.cookies.set(name, value, path="/ui")
                refused = await on_b.get("/ui/tasks")
                assert refused.status_code == 303 and refused.headers["location"].startswith("/ui/login")
                r = await on_b.post("/ui/tasks/t-1/decision", data={"csrf": csrf, "decision": "approved"})
                assert r.status_code == 401  # no session any more: nothing is decided
            revoked = [k async for k in client.scan_iter(match=f"{prefix}:console:revoked:*")]
            assert len(revoked) == 1, revoked
            ttl = await client.ttl(revoked[0])
            assert 0 < ttl <= SESSION_MAX_AGE_S  # gone from Redis when the cookie could no longer be used
        finally:
            await close(client)

    asyncio.run(scenario())
