"""What the browser tests of the console share: Playwright (required in CI, where
``AGENT_TEST_REQUIRE_BROWSER=1`` makes a missing browser fail instead of skipping), Debian's
chromium and the admin app served on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
import uvicorn

from service.api.app import create_app
from service.runtime.wiring import Service
from tests.support import wait_for

REQUIRED = os.environ.get("AGENT_TEST_REQUIRE_BROWSER") == "1"
if REQUIRED:
    import playwright.async_api as playwright_api
else:
    playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = os.environ.get("AGENT_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

__all__ = ["CHROMIUM", "REQUIRED", "playwright_api", "serve"]


async def serve(svc: Service) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """The service's admin app on a free loopback port, in this event loop (the ledger's)."""
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started or task.done(), 30, what="uvicorn")
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, f"http://127.0.0.1:{port}"
