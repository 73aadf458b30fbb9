"""The console's Sessions pages in a real browser (Debian's chromium driven by Playwright), against a
service on the session's broker and redis-server: reached from the navigation once logged in, the
list shows the recently changed sessions, the last first; a session's page shows its kind, version,
holder, queue, summary and state, and its turns a page at a time, each linked to its task; an
unknown or invalid id says so.

Screenshots go to ``$AGENT_TEST_ARTIFACTS/console`` (the test's tmp_path without it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dedup.ledger import Ledger
from dedup.sessions import Entered
from service.api.sessions import TURNS_PAGE
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import build, ensure_topics
from tests.support.browser import CHROMIUM, REQUIRED, playwright_api, serve

pytestmark = [pytest.mark.integration]

READ_TOKEN = "r3ad-sessions"
TURNS = TURNS_PAGE + 5  # two pages


async def seed(ledger: Ledger) -> None:
    """``board`` with more turns than a page, a summary, a state, a holder and a waiter; ``quiet`` after it."""
    sessions = ledger.sessions
    for sid, count in (("board", TURNS), ("quiet", 1)):
        for n in range(count):
            task = f"{sid}-{n}"
            entered = await sessions.enter(sid, "planner", task, 1, 60_000)
            assert isinstance(entered, Entered)
            turn = {"task_id": task, "input": {"item": f"item {n}"}, "result": {"ok": True}, "at": n}
            state = {"items": n + 1} if sid == "board" and n == count - 1 else None
            assert await sessions.apply(sid, task, 1, entered.version, turn, state) == "ok"
        if sid == "board":
            assert await sessions.summarize("board", 3, "three items were added", TURNS)
            assert isinstance(await sessions.enter("board", "planner", "board-next", 2, 60_000), Entered)
            assert not isinstance(await sessions.enter("board", "planner", "board-later", 1, 60_000), Entered)


@pytest.mark.skipif(not REQUIRED and not Path(CHROMIUM).exists(),
                    reason="needs Debian's chromium (apt-get install chromium)")
def test_the_sessions_pages_in_a_browser(make_settings: Any, fake_llm: FakeLLM, artifacts: Path) -> None:
    s = make_settings(read_token=READ_TOKEN)

    async def scenario() -> None:
        await asyncio.to_thread(ensure_topics, s)
        svc = build(s, llm_base_url=fake_llm.base_url)
        try:
            await seed(svc.ledger)
            server, task, base = await serve(svc)
            try:
                await browse(base)
            finally:
                server.should_exit = True
                await asyncio.wait_for(task, 30)
        finally:
            await svc.aclose()

    async def browse(base: str) -> None:
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--headless=new"])
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 900})
                await page.goto(base + "/ui/sessions")
                assert "/ui/login" in page.url  # reads need a login
                await page.fill("#token", READ_TOKEN)
                await page.click("#login")
                assert page.url.endswith("/ui/sessions")
                await page.goto(base + "/ui")
                await page.click("nav >> text=Sessions")
                assert page.url.endswith("/ui/sessions")
                await page.screenshot(path=str(artifacts / "30-sessions.png"), full_page=True)
                rows = [c.strip() for c in await page.locator("#sessions td:first-child").all_inner_texts()]
                assert rows == ["quiet", "board"]  # the last changed first

                await page.click("#sessions >> text=board")
                assert page.url.endswith("/ui/sessions/board")
                await page.screenshot(path=str(artifacts / "31-session.png"), full_page=True)
                assert (await page.inner_text("#version")).strip() == str(TURNS)
                assert (await page.inner_text("#holder")).startswith("board-next")
                assert (await page.inner_text("#queue")).split() == ["board-next", "board-later"]
                assert "three items were added" in await page.inner_text("#summary")
                assert f'"items": {TURNS}' in await page.inner_text("#state")
                assert await page.locator("#turns tr").count() == TURNS_PAGE + 1  # a page, and the header
                first = [c.strip() for c in await page.locator("#turn-0 td").all_inner_texts()]
                assert first[:3] == ["0", "board-0", "0"] and "item 0" in first[3]

                await page.click("#later")
                assert await page.locator("#turns tr").count() == 5 + 1  # the rest
                assert await page.locator(f"#turn-{TURNS - 1}").count() == 1
                assert await page.locator("#later").count() == 0
                await page.click(f"#turn-{TURNS - 1} >> text=board-{TURNS - 1}")
                assert page.url.endswith(f"/ui/tasks/board-{TURNS - 1}")  # the turn's task

                await page.goto(base + "/ui/sessions")
                await page.fill("#session-id", "quiet")
                await page.click("#open-session")
                assert (await page.inner_text("#session-name")).strip() == "quiet"
                for path, status in (("/ui/sessions/nobody", 404), ("/ui/sessions/a%7Bb%7D", 400),
                                     ("/ui/sessions?id=" + "x" * 5000, 400)):
                    answer = await page.goto(base + path)
                    assert answer is not None and answer.status == status, (path[:40], answer and answer.status)
                    assert await page.locator("#error").count() == 1
            finally:
                await browser.close()

    asyncio.run(scenario())
