"""The console's Schedules page in a real browser (Debian's chromium driven by Playwright), against a
service on the session's broker and redis-server: reached from the navigation once logged in, it
shows each declared schedule with its clock, catch-up policy, last slot, counts, next slot and how
late it is; a schedule whose due slot waits past its grace stands out.

Screenshots go to ``$AGENT_TEST_ARTIFACTS/console`` (the test's tmp_path without it).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.core.schedule_spec import to_ms
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import build, ensure_topics
from tests.support.browser import CHROMIUM, REQUIRED, playwright_api, serve

pytestmark = [pytest.mark.integration]

READ_TOKEN = "r3ad-schedules"
LABELS = ["ok", "broken"]
SCHEDULES = [
    {"name": "hourly", "kind": "classify", "every_s": 3600, "catch_up": "all", "max_catch_up": 4,
     "input": {"text": "check {slot}", "labels": LABELS}},
    {"name": "nightly-report", "kind": "classify", "cron": "0 2 * * *", "timezone": "Europe/Paris",
     "jitter_s": 300, "tenant": "acme", "priority": "batch", "input": {"text": "day {slot_date}", "labels": LABELS}},
]


@pytest.mark.skipif(not REQUIRED and not Path(CHROMIUM).exists(),
                    reason="needs Debian's chromium (apt-get install chromium)")
def test_the_schedules_page_in_a_browser(make_settings: Any, fake_llm: FakeLLM, artifacts: Path) -> None:
    s = make_settings(read_token=READ_TOKEN, scheduler={"schedules": SCHEDULES})
    top = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    last = top - timedelta(hours=2)  # the slot of an hour ago is due and not produced: an hour late

    async def scenario() -> None:
        await asyncio.to_thread(ensure_topics, s)
        svc = build(s, llm_base_url=fake_llm.base_url)
        try:
            schedules = svc.ledger.schedules
            assert await schedules.start("hourly", to_ms(top - timedelta(hours=5)))
            assert await schedules.lease("hourly", "replica-3", 60_000)
            assert await schedules.advance("hourly", "replica-3", to_ms(top - timedelta(hours=5)), to_ms(last),
                                           2, 1, to_ms(last)) == "ok"
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
                page = await browser.new_page(viewport={"width": 1400, "height": 700})
                await page.goto(base + "/ui/schedules")
                assert "/ui/login" in page.url  # reads need a session
                await page.fill("#token", READ_TOKEN)
                await page.click("#login")
                assert page.url.endswith("/ui/schedules")
                await page.goto(base + "/ui")
                await page.click("nav >> text=Schedules")
                assert page.url.endswith("/ui/schedules")
                await page.screenshot(path=str(artifacts / "20-schedules.png"), full_page=True)

                hourly = page.locator("#schedule-hourly")
                cells = [c.strip() for c in await hourly.locator("td").all_inner_texts()]
                assert cells[:7] == ["hourly", "classify", "every 3600 s", "all (at most 4)",
                                     last.strftime("%Y-%m-%dT%H:%M:%SZ"), "2", "1"]
                assert cells[7] == (top - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")  # next slot
                assert cells[8].startswith((top - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S"))  # no jitter
                assert cells[9].endswith(" s") and float(cells[9][:-2]) >= 3600
                assert cells[10] == "replica-3"
                assert "bad" in (await hourly.get_attribute("class") or "")  # late past its grace: it stands out

                nightly = page.locator("#schedule-nightly-report")
                cells = [c.strip() for c in await nightly.locator("td").all_inner_texts()]
                assert cells[0] == "nightly-report tenant acme batch"
                assert cells[2] == "0 2 * * * Europe/Paris jitter 300 s" and cells[3] == "latest"
                assert cells[4] == "not run yet" and cells[9] == "on time" and cells[10] == "-"
                assert "bad" not in (await nightly.get_attribute("class") or "")
            finally:
                await browser.close()

    asyncio.run(scenario())
