"""``agent-service session list|show|delete`` on the session's redis-server: the sessions the ledger
lists, one session with its turns, holder and queue (text or JSON, as ``GET /sessions/{id}`` shows
it), and erasure; an unknown or invalid id exits 1 and says why."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from dedup.sessions import Entered
from service.cli.main import main

pytestmark = pytest.mark.integration


def _env(monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str) -> None:
    for name in ("AGENT_AGENTS", "AGENT_KINDS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AGENT_REDIS__URL", redis_url)
    monkeypatch.setenv("AGENT_REDIS__KEY_PREFIX", prefix)


def _in_ledger(redis_url: str, prefix: str, body: Any) -> Any:
    async def run() -> Any:
        client = connect(redis_url)
        try:
            return await body(Ledger(client, keys=Keys(prefix), ttl_s=600))
        finally:
            await close(client)

    return asyncio.run(run())


async def _seed(ledger: Ledger) -> None:
    """``board`` with two turns and a task holding it; ``other`` with one turn, changed last."""
    sessions = ledger.sessions
    for sid, texts in (("board", ["buy milk", "call Ann"]), ("other", ["hello"])):
        for n, text in enumerate(texts):
            task = f"{sid}-t{n}"
            entered = await sessions.enter(sid, "support", task, 1, 60_000)
            assert isinstance(entered, Entered)
            turn = {"task_id": task, "input": {"text": text}, "result": {"answer": "ok"}, "at": n}
            assert await sessions.apply(sid, task, 1, entered.version, turn) == "ok"
        if sid == "board":
            assert isinstance(await sessions.enter(sid, "support", "board-t2", 4, 60_000), Entered)


def test_session_list_show_and_delete(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      redis_url: str) -> None:
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    _env(monkeypatch, redis_url, prefix)
    _in_ledger(redis_url, prefix, _seed)

    assert main(["session", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "UPDATED"]
    assert [line.split()[0] for line in lines[1:]] == ["other", "board"]
    assert main(["session", "list", "--json", "--limit", "1"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["id"] for v in listed] == ["other"] and listed[0]["updated"].endswith("Z")

    assert main(["session", "show", "board", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["kind"], shown["version"], shown["holder"], shown["queue"]) == ("support", 2, "board-t2", ["board-t2"])
    assert [t["input"]["text"] for t in shown["turns"]] == ["buy milk", "call Ann"] and shown["turns_total"] == 2

    assert main(["session", "show", "board"]) == 0
    text = capsys.readouterr().out
    assert "support" in text and "board-t2" in text and "buy milk" in text and "call Ann" in text

    assert main(["session", "delete", "board"]) == 0
    assert "erased" in capsys.readouterr().out
    assert _in_ledger(redis_url, prefix, lambda ledger: ledger.sessions.get("board")) is None
    assert main(["session", "show", "board"]) == 1
    assert "unknown session" in capsys.readouterr().err
    assert main(["session", "delete", "board"]) == 1
    assert "unknown session" in capsys.readouterr().err
    assert main(["session", "list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["other"]

    for hostile in ("a{b}", "x" * 10_000, "\udcff", "with space"):
        for command in ("show", "delete"):
            assert main(["session", command, hostile]) == 1
            assert "invalid session id" in capsys.readouterr().err
    assert _in_ledger(redis_url, prefix, lambda ledger: ledger.sessions.get("other")) is not None


def test_session_list_when_there_are_none(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                          redis_url: str) -> None:
    _env(monkeypatch, redis_url, f"cli{uuid.uuid4().hex[:8]}")
    assert main(["session", "list"]) == 0
    assert capsys.readouterr().out.startswith("no sessions")
