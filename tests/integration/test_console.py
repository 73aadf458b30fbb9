"""The operator console in a real browser: Debian's chromium driven by Playwright, against a service
on the session's broker and redis-server, its admin app served by uvicorn on a loopback port.

Screenshots of every page go to ``$AGENT_TEST_ARTIFACTS/console`` (the test's tmp_path without it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.devtools.downstream import FakeDownstream
from service.devtools.fakellm import FakeLLM, ToolArguments
from service.runtime.wiring import Service
from tests.support import metric, produce, running, task_value, wait_for
from tests.support.browser import CHROMIUM, REQUIRED, playwright_api, serve

pytestmark = [pytest.mark.integration]

READ_TOKEN, ADMIN_TOKEN = "r3ad-console", "adm1n-console"
NO_REFUND = {"title": "Broken parcel", "priority": "normal", "refund": 0}
BIG_REFUND = {"title": "Refund the order", "priority": "urgent", "refund": 500}
XSS = '<script>alert("xss")</script><img src=x onerror=alert(2)>'


@pytest.fixture
def downstream() -> Iterator[FakeDownstream]:
    with FakeDownstream(idempotent=False) as api:
        yield api


def ticket(task_id: str, message: str) -> bytes:
    return task_value("support_ticket", {"customer": "Ada", "message": message}, task_id)


async def state_of(svc: Service, task_id: str) -> str | None:
    record = await svc.ledger.get(task_id)
    return record.state if record is not None else None


@pytest.mark.skipif(not REQUIRED and not Path(CHROMIUM).exists(),
                    reason="needs Debian's chromium (apt-get install chromium)")
def test_the_console_in_a_browser(make_settings: Any, fake_llm: FakeLLM, downstream: FakeDownstream,
                                  artifacts: Path) -> None:
    fake_llm.tool_arguments = [ToolArguments("open_ticket", BIG_REFUND, match="appr-"),
                               ToolArguments("open_ticket", NO_REFUND)]
    s = make_settings(tools={"tickets_url": downstream.base_url, "sweep_interval_s": 0.3},
                      admin_token=ADMIN_TOKEN, read_token=READ_TOKEN)
    dialogs: list[str] = []

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [
                (b"ok-1", ticket("ok-1", "My parcel arrived broken.")),
                (b"appr-yes", ticket("appr-yes", "Refund me!")),
                (b"appr-no", ticket("appr-no", "Refund me too!")),
                (b"xss-1", XSS.encode()),  # not JSON: dead-lettered as decode, its payload shown as text
            ])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1, 60,
                           what="the plain ticket", service=svc)
            for t in ("appr-yes", "appr-no"):
                await wait_for(lambda t=t: _is(svc, t, "waiting_approval"), 60, what=f"{t} parked", service=svc)
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "decode"}) == 1, 60,
                           what="the poison record", service=svc)
            server, task, base = await serve(svc)
            try:
                await browse(svc, base)
            finally:
                server.should_exit = True
                await asyncio.wait_for(task, 30)

    async def browse(svc: Service, base: str) -> None:
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--headless=new"])
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})

                async def on_dialog(dialog: Any) -> None:
                    dialogs.append(dialog.message)
                    await dialog.dismiss()

                page.on("dialog", on_dialog)

                async def shot(name: str) -> None:
                    await page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)

                # reads need a session: the login form, with the read token
                await page.goto(base + "/ui")
                assert "/ui/login" in page.url
                await page.fill("#token", "wrong")
                await page.click("#login")
                assert await page.locator("#login-error").is_visible()
                await shot("01-login")
                await page.fill("#token", READ_TOKEN)
                await page.click("#login")
                assert page.url.rstrip("/").endswith("/ui")
                assert (await page.locator("#parked").inner_text()).strip() == "2"
                await shot("02-overview")

                # a task that succeeded: state, tool call and its key, where its result was published
                await page.goto(base + "/ui/tasks")
                await page.fill("#task-id", "ok-1")
                await page.click("#lookup")
                assert await page.inner_text("#state") == "succeeded"
                assert "ok-1/file/1" in await page.inner_text("#tool-calls")
                assert s.kafka.input_topic in await page.inner_text("#published")
                assert "\"reply\"" in await page.inner_text("#result")
                await shot("03-task-succeeded")

                # the read role cannot decide: the form is refused, and so is a forged POST
                await page.goto(base + "/ui/parked")
                await shot("04-parked")
                row = page.locator("tr", has_text="appr-yes")
                await row.locator("button.approved").click()
                assert "admin" in await page.inner_text("#error")
                await shot("05-refused-without-admin")
                forged = await page.request.post(base + "/ui/dlq/replay", form={"sel": "0:0", "confirm": "yes"})
                assert forged.status == 403
                assert await state_of(svc, "appr-yes") == "waiting_approval"

                # the admin approves one (it runs and succeeds) and rejects the other (dead-lettered)
                await page.click("#logout")
                assert "/ui/login" in page.url
                await page.goto(base + "/ui/parked")
                await page.fill("#token", ADMIN_TOKEN)
                await page.click("#login")
                assert page.url.endswith("/ui/parked")
                row = page.locator("tr", has_text="appr-yes")
                await row.locator("input[name=reason]").fill("checked the order")
                await row.locator("button.approved").click()
                await wait_for(lambda: _is(svc, "appr-yes", "succeeded"), 60, what="appr-yes done", service=svc)
                await page.goto(base + "/ui/tasks/appr-yes")
                assert await page.inner_text("#state") == "succeeded"
                assert "approved" in await page.inner_text("#decisions")
                assert "approval:approved" in await page.inner_text("#audit")
                await shot("06-task-approved")
                assert downstream.stats()["effects_by_key"].get("appr-yes/file/1") == 1

                await page.goto(base + "/ui/parked")
                row = page.locator("tr", has_text="appr-no")
                await row.locator("input[name=reason]").fill("not covered")
                await row.locator("button.rejected").click()
                await wait_for(lambda: _is(svc, "appr-no", "dead"), 60, what="appr-no dead", service=svc)
                await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "rejected"}) == 1, 30,
                               what="the rejection's dead letter", service=svc)
                await page.goto(base + "/ui/tasks?id=appr-no")
                assert await page.inner_text("#state") == "dead"
                await shot("07-task-dead")

                # the poison record's payload renders as text: no script runs
                await page.goto(base + "/ui/dlq?reason=decode")
                letters = page.locator("#letters")
                assert "xss-1" in await letters.inner_text() and "rejected" not in await letters.inner_text()
                await shot("08-dlq-decode")
                await letters.locator("a").first.click()
                assert await page.inner_text("#letter-reason") == "decode"
                payload = page.locator("#payload")
                assert await payload.is_visible() and XSS in await payload.inner_text()
                await shot("09-dead-letter")

                # filter by reason, select the rejected task's letter and replay it after confirming
                await page.goto(base + "/ui/dlq")
                await page.select_option("#reason", "rejected")
                await page.click("#filter")
                rows = page.locator("#letters tr", has_text="appr-no")
                assert await rows.count() == 1 and "xss-1" not in await page.inner_text("#letters")
                await rows.locator("input[type=checkbox]").check()
                await shot("10-dlq-rejected")
                await page.click("#replay")
                assert "Replay 1 dead letter" in await page.inner_text("h1")
                await shot("11-replay-confirm")
                await page.click("#confirm")
                assert "replayed 1," in await page.inner_text("#summary")
                await shot("12-replay-report")
                assert "yes" in await page.locator("#report tr", has_text="appr-no").inner_text()  # revived
                # the ledger revived the task and dropped its rejection: it runs again and waits for a
                # decision once more, without calling the downstream
                await wait_for(lambda: _is(svc, "appr-no", "waiting_approval"), 60, what="appr-no parked again",
                               service=svc)
                await page.goto(base + "/ui/parked")
                assert await page.locator("tr", has_text="appr-no").count() == 1
                assert "appr-no/file/1" not in downstream.stats()["effects_by_key"]
                await page.goto(base + "/ui")
                await shot("13-overview-after")
            finally:
                await browser.close()

    asyncio.run(scenario())
    assert dialogs == []


async def _is(svc: Service, task_id: str, state: str) -> bool:
    return await state_of(svc, task_id) == state
