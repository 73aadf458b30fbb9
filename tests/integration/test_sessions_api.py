"""``GET /sessions``, ``GET|PUT|DELETE /sessions/{id}`` against a service on the session's broker and
redis-server, the sessions seeded through ``ledger.sessions`` as tasks leave them: a session shows its
kind, version, state, summary, turns (paged) and who holds or waits for it; a PUT with the version
read replaces the state or the turns, a stale one answers 409 with the current version and changes
nothing; a correction is checked against the session's kind (a state its model refuses, turns for a
kind that keeps a state, a session of a kind not loaded here without ``force``: 422, nothing
changed); DELETE erases the session's content; a hostile id or body is refused (422), never a 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from dedup.ledger import Ledger
from dedup.sessions import Entered
from service.api.app import create_app
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import Service, build, ensure_topics
from service.sdk import Agent, AgentRegistry, Messages, Session, Step, StrictInput, system_message, user_message

pytestmark = pytest.mark.integration

READ = {"Authorization": "Bearer r3ad"}
WRITE = {"Authorization": "Bearer s3cret"}


class Text(StrictInput):
    text: str = Field(min_length=1)


class Answer(BaseModel):
    answer: str


class Reply(Step):
    name, prompt_version, output_model = "reply", "sessions-api-v1", Answer

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        assert isinstance(task_input, Text)
        return [system_message("Answer."), user_message(task_input.text)]


class Board(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[str] = []


def add(state: Board, task_input: Text, result: Any) -> Board:
    return Board(items=[*state.items, task_input.text])


def kinds() -> AgentRegistry:
    """``support`` keeps the turns, ``planner`` a board it reduces, ``plain`` declares no session."""
    return AgentRegistry([Agent("support", Text, (Reply(),), session=Session()),
                          Agent("planner", Text, (Reply(),), session=Session(state=Board, reduce=add)),
                          Agent("plain", Text, (Reply(),))])


@contextlib.asynccontextmanager
async def api(s: Settings, fake_llm: FakeLLM) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    await asyncio.to_thread(ensure_topics, s)
    service = build(s, llm_base_url=fake_llm.base_url, agents=kinds())
    try:
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
            yield service, client
    finally:
        await service.aclose()


def turn(task_id: str, text: str) -> dict[str, Any]:
    return {"task_id": task_id, "input": {"text": text}, "result": {"answer": text.upper()}, "at": 1}


async def seed(ledger: Ledger, sid: str, texts: list[str], *, holder: str | None = None,
               waiting: str | None = None, kind: str = "support") -> None:
    """Tasks of ``sid`` one after the other, each applying its turn (a ``planner`` task its board);
    then one holding, one queued."""
    sessions = ledger.sessions
    for n, text in enumerate(texts):
        entered = await sessions.enter(sid, kind, f"{sid}-t{n}", 1, 60_000, ttl_s=3600)
        assert isinstance(entered, Entered), entered
        if kind == "planner":
            update = add(Board.model_validate(entered.state or {}), Text(text=text), None).model_dump()
            assert await sessions.apply(sid, f"{sid}-t{n}", 1, entered.version, state=update) == "ok"
        else:
            assert await sessions.apply(sid, f"{sid}-t{n}", 1, entered.version, turn(f"{sid}-t{n}", text)) == "ok"
    if holder is not None:
        assert isinstance(await sessions.enter(sid, "support", holder, 3, 60_000, ttl_s=3600), Entered)
    if waiting is not None:
        assert not isinstance(await sessions.enter(sid, "support", waiting, 1, 60_000, ttl_s=3600), Entered)


def test_a_session_shows_its_turns_paged_and_who_holds_it(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(read_token="r3ad")

    async def scenario() -> None:
        async with api(s, fake_llm) as (service, client):
            await seed(service.ledger, "board/7", ["one", "two", "three"], holder="board/7-t3", waiting="late")
            r = await client.get("/sessions/board/7", headers=READ)
            assert r.status_code == 200, r.text
            view = r.json()
            assert (view["id"], view["kind"], view["version"], view["state"], view["summary"]) == (
                "board/7", "support", 3, None, None)
            assert view["turns"] == [turn(f"board/7-t{n}", t) for n, t in enumerate(["one", "two", "three"])]
            assert (view["turns_total"], view["turns_offset"]) == (3, 0)
            assert view["holder"] == "board/7-t3" and view["holder_fence"] == 3 and view["holder_until"]
            assert view["queue"] == ["board/7-t3", "late"]  # as the ledger keeps it: head first
            assert 3500 <= view["ttl_s"] <= 3600

            r = await client.get("/sessions/board/7", params={"offset": 1, "limit": 1}, headers=READ)
            assert r.status_code == 200, r.text
            page = r.json()
            assert page["turns"] == [turn("board/7-t1", "two")] and page["turns_offset"] == 1
            assert page["turns_total"] == 3
            assert (await client.get("/sessions/board/7", params={"offset": 9}, headers=READ)).json()["turns"] == []
            for bad in ({"offset": -1}, {"limit": 0}, {"limit": 100_000}):
                assert (await client.get("/sessions/board/7", params=bad, headers=READ)).status_code == 422

            await seed(service.ledger, "other", ["x"])
            r = await client.get("/sessions", headers=READ)
            assert r.status_code == 200, r.text
            assert [v["id"] for v in r.json()] == ["other", "board/7"]  # the last changed first
            assert r.json()[0]["updated"].endswith("Z")
            assert [v["id"] for v in (await client.get("/sessions", params={"limit": 1}, headers=READ)).json()] == [
                "other"]

            assert (await client.get("/sessions/nobody", headers=READ)).status_code == 404
            for path in ("/sessions", "/sessions/board/7"):
                assert (await client.get(path)).status_code == 401

    asyncio.run(scenario())


def test_put_with_the_version_read_replaces_and_a_stale_one_changes_nothing(make_settings: Any,
                                                                            fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(read_token="r3ad")

    async def scenario() -> None:
        async with api(s, fake_llm) as (service, client):
            await seed(service.ledger, "case-1", ["a", "b"])
            sessions = service.ledger.sessions
            assert await sessions.summarize("case-1", 1, "a was said", 2)

            before = await sessions.get("case-1")
            for stale in ({"version": 1, "turns": []}, {"version": 0, "turns": []},
                          {"version": 3, "turns": [turn("x", "edited")]}):
                r = await client.put("/sessions/case-1", json=stale, headers=WRITE)
                assert r.status_code == 409, r.text
                assert r.json()["version"] == 2 and "version" in r.json()["detail"]
            assert await sessions.get("case-1") == before  # nothing changed

            r = await client.put("/sessions/case-1", json={"version": 2, "turns": [turn("x", "edited")]},
                                 headers=WRITE)
            assert r.status_code == 200, r.text
            assert r.json() == {"id": "case-1", "version": 3}
            view = (await client.get("/sessions/case-1", headers=READ)).json()
            assert (view["version"], view["turns"], view["summary"]) == (3, [turn("x", "edited")], None)

            await seed(service.ledger, "board-1", ["milk", "eggs"], kind="planner")
            r = await client.put("/sessions/board-1", json={"version": 2, "state": {"items": ["milk"]}}, headers=WRITE)
            assert r.status_code == 200 and r.json() == {"id": "board-1", "version": 3}, r.text
            view = (await client.get("/sessions/board-1", headers=READ)).json()
            assert (view["version"], view["state"], view["turns"]) == (3, {"items": ["milk"]}, [])
            r = await client.put("/sessions/board-1", json={"version": 2, "state": {"items": []}}, headers=WRITE)
            assert r.status_code == 409 and r.json()["version"] == 3, r.text

            r = await client.put("/sessions/nobody", json={"version": 0, "state": 1}, headers=WRITE)
            assert r.status_code == 404 and await sessions.get("nobody") is None
            assert (await client.put("/sessions/case-1", json={"version": 3, "turns": []})).status_code == 401
            assert (await client.put("/sessions/case-1", json={"version": 3, "turns": []},
                                     headers=READ)).status_code == 401  # a read token does not write
            assert (await sessions.get("case-1")).version == 3  # type: ignore[union-attr]

    asyncio.run(scenario())


async def refused(client: httpx.AsyncClient, sid: str, body: dict[str, Any], says: str, *,
                  loc: tuple[Any, ...] | None = None, force: bool = False) -> None:
    """``body`` put on ``sid`` answers 422 saying ``says`` (at ``loc``, pydantic's errors) and changes nothing."""
    async def now() -> dict[str, Any]:
        view: dict[str, Any] = (await client.get(f"/sessions/{sid}", headers=READ)).json()
        view.pop("ttl_s")  # counts down between the reads
        return view

    before = await now()
    r = await client.put(f"/sessions/{sid}", json=body, headers=WRITE, params={"force": "true"} if force else None)
    assert r.status_code == 422, (sid, body, r.status_code, r.text)
    errors = r.json()["detail"]
    assert any(says in e["msg"] for e in errors), (says, errors)
    if loc is not None:
        assert any(tuple(e["loc"]) == loc for e in errors), (loc, errors)
    assert await now() == before  # the version the same too


def test_put_is_checked_against_the_sessions_kind(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(read_token="r3ad")

    async def scenario() -> None:
        async with api(s, fake_llm) as (service, client):
            ledger = service.ledger
            await seed(ledger, "board-2", ["milk", "eggs"], kind="planner")
            await seed(ledger, "chat-2", ["hello"])

            # a reduced kind: the state must load into its model; turns are not what it keeps
            await refused(client, "board-2", {"version": 2, "state": {"items": "milk"}}, "valid list",
                          loc=("body", "state", "items"))
            await refused(client, "board-2", {"version": 2, "state": {"items": [1]}}, "valid string",
                          loc=("body", "state", "items", 0))
            await refused(client, "board-2", {"version": 2, "state": {"itemz": []}}, "Extra inputs",
                          loc=("body", "state", "itemz"))
            await refused(client, "board-2", {"version": 2, "state": ["milk"]}, "valid dictionary",
                          loc=("body", "state"))
            await refused(client, "board-2", {"version": 2, "turns": [turn("x", "y")]}, "keeps a state",
                          loc=("body", "turns"))
            await refused(client, "board-2", {"version": 2, "state": {"items": "milk"}}, "valid list",
                          force=True)  # force is for a kind not loaded, never for a shape the kind refuses
            r = await client.put("/sessions/board-2", json={"version": 2, "state": {"items": ["bread"]}},
                                 headers=WRITE)
            assert r.status_code == 200 and r.json()["version"] == 3, r.text
            assert (await ledger.sessions.get("board-2")).state == {"items": ["bread"]}  # type: ignore[union-attr]

            # a kind of turns: each turn {task_id, input, result, at}; a state is not what it keeps
            await refused(client, "chat-2", {"version": 1, "state": {"items": []}}, "keeps the turns",
                          loc=("body", "state"))
            for field in ("input", "result", "at"):
                partial = {k: v for k, v in turn("chat-2-t9", "hi").items() if k != field}
                await refused(client, "chat-2", {"version": 1, "turns": [turn("chat-2-t0", "hello"), partial]},
                              "Field required", loc=("body", "turns", 1, field))
            r = await client.put("/sessions/chat-2", json={"version": 1, "turns": [turn("chat-2-t0", "hi")]},
                                 headers=WRITE)
            assert r.status_code == 200 and r.json()["version"] == 2, r.text
            r = await client.put("/sessions/chat-2", json={"version": 2, "turns": []}, headers=WRITE)
            assert r.status_code == 200 and r.json()["version"] == 3, r.text  # erasing the history is a shape

    asyncio.run(scenario())


def test_a_session_of_a_kind_not_loaded_is_corrected_only_with_force(make_settings: Any,
                                                                     fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(read_token="r3ad")

    async def scenario() -> None:
        async with api(s, fake_llm) as (service, client):
            ledger = service.ledger
            await seed(ledger, "old-1", ["a"], kind="retired")  # a kind this deployment no longer runs
            await seed(ledger, "old-2", ["a"], kind="plain")    # a kind that no longer declares a session
            for sid, says in (("old-1", "kind 'retired' is not loaded"), ("old-2", "declares no session")):
                await refused(client, sid, {"version": 1, "state": {"anything": 1}}, says, loc=("body",))
                for flag in ("false", "0", "maybe"):
                    r = await client.put(f"/sessions/{sid}", json={"version": 1, "state": {"x": 1}},
                                         params={"force": flag}, headers=WRITE)
                    assert r.status_code == 422, (flag, r.text)
                r = await client.put(f"/sessions/{sid}", json={"version": 1, "state": {"anything": 1}},
                                     params={"force": "true"}, headers=WRITE)
                assert r.status_code == 200 and r.json()["version"] == 2, r.text
                assert (await ledger.sessions.get(sid)).state == {"anything": 1}  # type: ignore[union-attr]
                r = await client.put(f"/sessions/{sid}", json={"version": 1, "turns": []},
                                     params={"force": "true"}, headers=WRITE)
                assert r.status_code == 409, r.text  # force skips the kind, never the version

    asyncio.run(scenario())


def test_delete_erases_every_key(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(read_token="r3ad")

    async def scenario() -> None:
        async with api(s, fake_llm) as (service, client):
            ledger = service.ledger
            await seed(ledger, "gone", ["a", "b"], holder="gone-t2", waiting="gone-t3")
            await seed(ledger, "kept", ["c"])
            assert await ledger.sessions.summarize("gone", 1, "a", 2)

            async def keys_of(sid: str) -> list[str]:
                return sorted([k.decode() async for k in ledger.client.scan_iter(match=f"*{{{sid}}}*")])

            assert len(await keys_of("gone")) == 4  # the hash, the queue, the turns, the applied marks
            assert (await client.delete("/sessions/gone")).status_code == 401
            r = await client.delete("/sessions/gone", headers=WRITE)
            assert r.status_code == 200, r.text
            assert r.json() == {"id": "gone", "deleted": True}
            # the content is gone; the live holder's turn and the waiter's place stay (docs/SESSIONS.md)
            assert await keys_of("gone") == [ledger.keys.session("gone"), ledger.keys.session_queue("gone")]
            assert not await ledger.client.hexists(ledger.keys.session("gone"), "kind")
            assert await ledger.client.zscore(ledger.keys.sessions(), "gone") is None  # not listed either
            assert await ledger.client.zscore(ledger.keys.sessions(), "kept") is not None
            assert (await client.get("/sessions/gone", headers=READ)).status_code == 404
            assert [v["id"] for v in (await client.get("/sessions", headers=READ)).json()] == ["kept"]
            assert (await client.delete("/sessions/gone", headers=WRITE)).status_code == 404
            assert (await client.get("/sessions/kept", headers=READ)).json()["version"] == 1

    asyncio.run(scenario())


HOSTILE_IDS = ["a{b}", "{", "}", "x" * 10_000, "with space", "%ED%A0%80", "caf%C3%A9", "%F0%9F%98%80"]


async def raw_call(app: Any, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> int:
    """The status the app answers to a request whose decoded path is ``path`` (any str, a lone surrogate
    too: what no HTTP client sends, what the app must still refuse cleanly)."""
    sent: list[int] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            await asyncio.sleep(3600)
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode("utf-8", "surrogatepass"), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in
                         {**headers, "content-type": "application/json", "host": "t"}.items()],
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    await app(scope, receive, send)
    return sent[0]


def test_hostile_ids_and_bodies_are_refused_cleanly(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(read_token="r3ad")

    async def scenario() -> None:
        async with api(s, fake_llm) as (service, client):
            await seed(service.ledger, "fine", ["a"])
            before = await service.ledger.sessions.get("fine")
            put = {"version": 1, "state": {"x": 1}}
            for sid in HOSTILE_IDS:
                for method in ("GET", "PUT", "DELETE"):
                    r = await client.request(method, "/sessions/" + sid, headers=WRITE,
                                             json=put if method == "PUT" else None)
                    assert r.status_code == 422, (sid[:40], method, r.status_code, r.text[:300])
                    assert "x" * 300 not in r.text  # the answer does not echo a 10 kB id
            app = create_app(service)
            for sid in ("\ud800", "a\udfffb", "{\ud83d}"):
                for method in ("GET", "PUT", "DELETE"):
                    status = await raw_call(app, method, "/sessions/" + sid, WRITE, json.dumps(put).encode())
                    assert status == 422, (sid, method, status)
            assert (await client.get("/sessions/a%0Ab", headers=READ)).status_code == 400  # a control character
            for bad_limit in ("0", "1001", "x"):
                assert (await client.get("/sessions", params={"limit": bad_limit}, headers=READ)).status_code == 422

            bodies: list[bytes] = [
                b'{"version": 1, "state": "\\ud800"}', b'{"version": 1, "turns": [{"task_id": "t", "x": "\\udfff"}]}',
                b'{"version": 1, "state": NaN}', b'{"version": 1, "state": {"a": Infinity}}',
                b'{"version": 1}', b'{"version": 1, "state": 1, "turns": []}', b'{"version": 1, "state": null}',
                b'{"version": -1, "state": 1}', b'{"version": "1", "state": 1}', b'{"version": true, "state": 1}',
                b'{"version": 1, "turns": [1]}', b'{"version": 1, "turns": [{"input": 1}]}',
                b'{"version": 1, "turns": [{"task_id": "a{b}"}]}', b'{"version": 1, "state": 1, "extra": 2}',
                b'{"version": 1, "state": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"[]", b"not json",
            ]
            for body in bodies:
                r = await client.put("/sessions/fine", content=body, headers={**WRITE, "content-type": "application/json"})
                assert r.status_code in (400, 422), (body[:60], r.status_code, r.text[:300])
            assert await service.ledger.sessions.get("fine") == before  # nothing was written

    asyncio.run(scenario())


def test_writes_need_the_admin_token_configured(make_settings: Any, fake_llm: FakeLLM) -> None:
    async def scenario() -> None:
        async with api(make_settings(reads_open=True, admin_token=None), fake_llm) as (service, client):
            await seed(service.ledger, "open", ["a"])
            assert (await client.get("/sessions/open")).status_code == 200
            assert (await client.put("/sessions/open", json={"version": 1, "state": 1})).status_code == 403
            assert (await client.delete("/sessions/open")).status_code == 403
            assert (await service.ledger.sessions.get("open")) is not None

    asyncio.run(scenario())
