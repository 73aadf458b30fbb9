"""``agent-service schedule list|show`` on the session's redis-server: the schedules the settings
declare, each with its state in the ledger (last slot, counts, next fire time, lateness, holder), as
a table or JSON; an unknown name exits 1."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.cli.main import main
from service.core.schedule_spec import to_ms

pytestmark = pytest.mark.integration

SCHEDULES = [
    {"name": "hourly", "kind": "classify", "every_s": 3600, "input": {"text": "check", "labels": ["a", "b"]}},
    {"name": "nightly", "kind": "classify", "cron": "0 2 * * *", "timezone": "Europe/Paris", "jitter_s": 300,
     "catch_up": "all", "max_catch_up": 3, "input": {"text": "day {slot_date}", "labels": ["a", "b"]}},
]


def _env(monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str) -> None:
    for name in ("AGENT_AGENTS", "AGENT_KINDS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AGENT_REDIS__URL", redis_url)
    monkeypatch.setenv("AGENT_REDIS__KEY_PREFIX", prefix)
    monkeypatch.setenv("AGENT_SCHEDULER__SCHEDULES", json.dumps(SCHEDULES))


def _handled(redis_url: str, prefix: str, top: datetime) -> None:
    """The ledger as a replica leaves it: hourly started 3 h back, two slots produced, one skipped."""
    async def body() -> None:
        client = connect(redis_url)
        try:
            schedules = Ledger(client, keys=Keys(prefix), ttl_s=600).schedules
            start = to_ms(top - timedelta(hours=3))
            assert await schedules.start("hourly", start)
            assert await schedules.lease("hourly", "replica-7", 60_000)
            assert await schedules.advance("hourly", "replica-7", start, to_ms(top - timedelta(hours=1)), 2, 1,
                                           to_ms(top - timedelta(hours=1))) == "ok"
        finally:
            await close(client)

    asyncio.run(body())


def test_schedule_list_and_show(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                redis_url: str) -> None:
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    _env(monkeypatch, redis_url, prefix)
    top = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    _handled(redis_url, prefix, top)

    assert main(["schedule", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "WHEN", "CATCH_UP", "LAST", "PRODUCED", "SKIPPED", "NEXT_FIRE",
                                "LATE_S", "HOLDER"]
    hourly, nightly = (re.split(r"\s{2,}", line) for line in lines[1:3])
    assert hourly[:7] == ["hourly", "classify", "every 3600s", "latest",
                          (top - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"), "2", "1"]
    assert hourly[9] == "replica-7" and 0 <= float(hourly[8]) <= 3601  # this hour's slot: due since the hour
    assert nightly[:7] == ["nightly", "classify", "0 2 * * * Europe/Paris ~300s", "all<=3", "-", "0", "0"]

    assert main(["schedule", "list", "--json"]) == 0
    views = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in views] == ["hourly", "nightly"]
    assert views[0]["last"] == (top - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (views[0]["produced"], views[0]["skipped"], views[0]["holder"]) == (2, 1, "replica-7")
    assert views[0]["next_slot"] == top.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert views[1]["seen"] is False and views[1]["last"] is None

    assert main(["schedule", "show", "hourly", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in shown.items() if k != "late_s"} == {k: v for k, v in views[0].items() if k != "late_s"}

    assert main(["schedule", "show", "nightly"]) == 0
    text = capsys.readouterr().out
    assert "cron" in text and "0 2 * * *" in text and "Europe/Paris" in text

    assert main(["schedule", "show", "weekly"]) == 1
    assert "unknown schedule 'weekly'" in capsys.readouterr().err


def test_schedule_list_without_schedules(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         redis_url: str) -> None:
    _env(monkeypatch, redis_url, f"cli{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("AGENT_SCHEDULER__SCHEDULES", "[]")
    assert main(["schedule", "list"]) == 0
    assert capsys.readouterr().out.startswith("no schedules")
