"""Tests for service.devtools.downstream: tickets, idempotency, the status endpoint, undos, faults and
the control endpoints over real loopback HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from service.devtools import processes
from service.devtools.downstream import DownstreamFault, FakeDownstream


@pytest.fixture(scope="module")
def api() -> Iterator[FakeDownstream]:
    with FakeDownstream(seed=3) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(api: FakeDownstream) -> None:
    api.reset()
    api.idempotent = True


@pytest.fixture(scope="module")
def client(api: FakeDownstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.base_url, timeout=5.0) as http:
        yield http


def create(client: httpx.Client, key: str | None, fields: Any = None, fence: str | None = None) -> httpx.Response:
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if fence is not None:
        headers["X-Fence"] = fence
    return client.post("/tickets", json={"title": "printer"} if fields is None else fields, headers=headers)


def by_key(client: httpx.Client, key: str) -> httpx.Response:
    return client.get(f"/tickets/by-key/{quote(key, safe='')}")


def cancel(client: httpx.Client, ticket_id: str, key: str | None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(f"/tickets/{ticket_id}/cancel", headers=headers)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    return message


# ----------------------------------------------------------------------------- tickets


def test_base_url_is_the_bare_origin(api: FakeDownstream) -> None:
    assert api.base_url == f"http://127.0.0.1:{api.port}"


def test_create_applies_the_effect(api: FakeDownstream, client: httpx.Client) -> None:
    first = create(client, "task-1:ticket", {"title": "printer", "priority": "high"}, fence="3")
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert first.json() == {
        "id": "T-000001", "key": "task-1:ticket", "fields": {"title": "printer", "priority": "high"},
        "status": "open", "fence": 3,
    }
    second = create(client, "task-2:ticket")
    assert second.status_code == 201
    assert second.json()["id"] == "T-000002" and second.json()["fence"] is None
    assert api.ticket_for("task-1:ticket") == first.json()
    assert api.ticket_for("task-3:ticket") is None
    assert client.get("/tickets").json() == {"tickets": [first.json(), second.json()]}
    stats = api.stats()
    assert stats["effects"] == 2 and stats["tickets"] == 2 and stats["requests"] == 3
    assert stats["effects_by_key"] == {"task-1:ticket": 1, "task-2:ticket": 1}


def test_a_repeated_key_is_replayed_without_an_effect(api: FakeDownstream, client: httpx.Client) -> None:
    first = create(client, "task-1:ticket", fence="1")
    again = create(client, "task-1:ticket", fence="2")
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()  # the first fence stays
    assert "another body" in error_of(create(client, "task-1:ticket", {"title": "other"}), 422)
    stats = api.stats()
    assert stats["effects_by_key"] == {"task-1:ticket": 1} and stats["replayed"] == 1 and stats["tickets"] == 1


@pytest.mark.parametrize(
    ("key", "fields", "fence"),
    [
        (None, None, None),
        ("", None, None),
        ("k", [1, 2], None),
        ("k", "text", None),
        ("k", None, "three"),
        ("k", None, "1.5"),
    ],
)
def test_malformed_creates_get_a_400(
    api: FakeDownstream, client: httpx.Client, key: str | None, fields: Any, fence: str | None
) -> None:
    error_of(create(client, key, fields, fence), 400)
    assert api.stats()["effects"] == 0 and api.tickets() == []


def test_a_body_that_is_not_json_gets_a_400(api: FakeDownstream, client: httpx.Client) -> None:
    response = client.post("/tickets", content=b"{nope", headers={"Idempotency-Key": "k"})
    assert "not valid JSON" in error_of(response, 400)
    assert api.stats()["effects"] == 0


@pytest.mark.parametrize("key", ["task-1:ticket", "run 7:step/2", "a+b?c=1&d#e%20f"])
def test_status_endpoint_finds_the_ticket_by_key(api: FakeDownstream, client: httpx.Client, key: str) -> None:
    error_of(by_key(client, key), 404)
    ticket = create(client, key).json()
    found = by_key(client, key)
    assert found.status_code == 200 and found.json() == ticket
    assert api.stats()["status_checks"] == 2


def test_cancel_is_applied_once_per_key(api: FakeDownstream, client: httpx.Client) -> None:
    ticket = create(client, "task-1:ticket").json()
    first = cancel(client, ticket["id"], "task-1:undo")
    assert first.status_code == 200 and first.json() == {**ticket, "status": "cancelled"}
    again = cancel(client, ticket["id"], "task-1:undo")
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert by_key(client, "task-1:ticket").json()["status"] == "cancelled"
    error_of(cancel(client, "T-000999", "task-9:undo"), 404)
    error_of(cancel(client, ticket["id"], None), 400)
    other = create(client, "task-2:ticket").json()
    assert "to cancel T-000001" in error_of(cancel(client, other["id"], "task-1:undo"), 422)
    stats = api.stats()
    assert stats["undos"] == 1 and stats["undos_by_key"] == {"task-1:undo": 1}
    assert api.ticket_for("task-2:ticket") == other  # still open


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    error_of(client.get("/nothing"), 404)
    error_of(client.get("/tickets/T-000001"), 404)
    error_of(client.delete("/tickets"), 405)
    error_of(client.post("/tickets/by-key/k"), 405)
    error_of(client.get("/tickets/T-000001/cancel"), 405)
    error_of(client.put("/_faults", json=[]), 405)


def test_without_idempotency_every_request_applies(api: FakeDownstream, client: httpx.Client) -> None:
    api.idempotent = False
    first = create(client, "task-1:ticket")
    second = create(client, "task-1:ticket", {"title": "other"})
    assert first.status_code == second.status_code == 201
    assert second.json()["id"] == "T-000002"
    assert by_key(client, "task-1:ticket").json() == first.json()  # the key's first ticket
    cancel(client, "T-000001", "undo")
    cancel(client, "T-000001", "undo")
    stats = api.stats()
    assert stats["effects_by_key"] == {"task-1:ticket": 2} and stats["undos_by_key"] == {"undo": 2}
    assert stats["replayed"] == 0


def test_concurrent_creates_of_one_key_apply_once(api: FakeDownstream) -> None:
    api.add_fault(DownstreamFault("delay", delay_s=0.05))  # keeps the requests in flight together
    start = threading.Barrier(16)

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=api.base_url, timeout=10.0) as http:
            start.wait()
            return create(http, "task-1:ticket")

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(post, range(16)))
    assert sorted(r.status_code for r in responses) == [200] * 15 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    stats = api.stats()
    assert stats["effects_by_key"] == {"task-1:ticket": 1} and stats["replayed"] == 15
    assert stats["faults"] == {"delay": 16}


# ----------------------------------------------------------------------------- faults


def test_error_answers_without_applying(api: FakeDownstream, client: httpx.Client) -> None:
    api.add_fault(DownstreamFault("error", match="task-1", status=503, times=1))
    error_of(create(client, "task-1:ticket"), 503)
    assert api.ticket_for("task-1:ticket") is None
    assert create(client, "task-1:ticket").status_code == 201  # times ran out
    assert api.stats()["effects_by_key"] == {"task-1:ticket": 1}


def test_effect_faults_leave_reads_alone(api: FakeDownstream, client: httpx.Client) -> None:
    api.set_faults([DownstreamFault("error", status=500), DownstreamFault("drop_before")])
    error_of(by_key(client, "task-1:ticket"), 404)  # answered normally
    assert client.get("/tickets").status_code == 200
    assert api.faults() == [DownstreamFault("error", status=500), DownstreamFault("drop_before")]


def test_delay_waits_then_acts(api: FakeDownstream, client: httpx.Client) -> None:
    api.add_fault(DownstreamFault("delay", delay_s=0.3, times=1))
    started = time.monotonic()
    assert create(client, "task-1:ticket").status_code == 201
    assert time.monotonic() - started >= 0.3
    assert api.stats()["effects"] == 1


def test_drop_before_closes_without_applying(api: FakeDownstream, client: httpx.Client) -> None:
    api.add_fault(DownstreamFault("drop_before", times=1))
    with pytest.raises(httpx.RemoteProtocolError):
        create(client, "task-1:ticket")
    assert api.ticket_for("task-1:ticket") is None
    error_of(by_key(client, "task-1:ticket"), 404)
    assert create(client, "task-1:ticket").status_code == 201


def test_drop_after_applies_then_closes(api: FakeDownstream, client: httpx.Client) -> None:
    api.add_fault(DownstreamFault("drop_after", match="task-1", times=1))
    with pytest.raises(httpx.RemoteProtocolError):
        create(client, "task-1:ticket")
    found = by_key(client, "task-1:ticket")  # the reconcile: the effect landed
    assert found.status_code == 200 and found.json()["id"] == "T-000001"
    assert create(client, "task-1:ticket").headers["idempotent-replayed"] == "true"
    assert api.stats()["effects_by_key"] == {"task-1:ticket": 1}


def test_drop_after_on_a_cancel(api: FakeDownstream, client: httpx.Client) -> None:
    ticket = create(client, "task-1:ticket").json()
    api.add_fault(DownstreamFault("drop_after", match="/cancel"))
    with pytest.raises(httpx.RemoteProtocolError):
        cancel(client, ticket["id"], "task-1:undo")
    assert api.ticket_for("task-1:ticket") == {**ticket, "status": "cancelled"}
    assert api.stats()["undos"] == 1


def test_status_error_hits_only_the_status_endpoint(api: FakeDownstream, client: httpx.Client) -> None:
    api.add_fault(DownstreamFault("status_error", match="task-1", status=500, times=2))
    assert create(client, "task-1:ticket").status_code == 201  # not a status request: untouched
    error_of(by_key(client, "task-1:ticket"), 500)
    error_of(by_key(client, "task-1:ticket"), 500)
    assert by_key(client, "task-1:ticket").status_code == 200
    assert api.stats()["faults"] == {"status_error": 2} and api.stats()["status_checks"] == 3


def test_probability_zero_never_hits(api: FakeDownstream, client: httpx.Client) -> None:
    api.add_fault(DownstreamFault("error", probability=0.0))
    assert create(client, "task-1:ticket").status_code == 201
    assert api.stats()["faults"] == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fault": "latency"},
        {"fault": "error", "status": 200},
        {"fault": "error", "times": 0},
        {"fault": "delay", "delay_s": -1},
        {"fault": "delay", "probability": 2},
        {"fault": "delay", "retry_after_s": 1},
    ],
)
def test_fault_rules_are_validated(api: FakeDownstream, client: httpx.Client, kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        DownstreamFault(**kwargs)
    api.add_fault(DownstreamFault("delay", match="keep"))
    error_of(client.post("/_faults", json=[{"fault": "error"}, kwargs]), 400)
    assert api.faults() == [DownstreamFault("delay", match="keep")]


# ----------------------------------------------------------------------------- control endpoints


def test_control_endpoints(api: FakeDownstream, client: httpx.Client) -> None:
    rules = [{"fault": "error", "match": "ctl", "status": 502, "times": 1}]
    response = client.post("/_faults", json={"faults": rules})
    assert response.status_code == 200
    assert response.json()["faults"] == [DownstreamFault("error", match="ctl", status=502, times=1).to_dict()]
    error_of(create(client, "ctl-1"), 502)
    assert client.get("/_faults").json() == {"faults": []}
    create(client, "ctl-1")
    assert client.get("/_stats").json() == api.stats()
    assert api.stats()["faults"] == {"error": 1} and api.stats()["effects"] == 1

    api.add_fault(DownstreamFault("delay"))
    assert client.delete("/_faults").json() == {"faults": []} and api.faults() == []

    assert client.get("/_config").json() == {"idempotent": True}
    assert client.post("/_config", json={"idempotent": False}).json() == {"idempotent": False}
    assert not api.idempotent
    error_of(client.post("/_config", json={"idempotent": "no"}), 400)
    error_of(client.post("/_config", json={"strict": True}), 400)
    assert not api.idempotent

    assert client.post("/_reset").json() == {"ok": True}
    assert api.stats() == {
        "requests": 0, "effects": 0, "effects_by_key": {}, "undos": 0, "undos_by_key": {}, "tickets": 0,
        "replayed": 0, "status_checks": 0, "faults": {},
    }
    assert not api.idempotent  # the mode survives a reset
    assert create(client, "again").json()["id"] == "T-000001"
    assert client.get("/health").json() == {"status": "ok"}


def test_stop_cuts_a_delay_short() -> None:
    server = FakeDownstream()
    server.start()
    try:
        server.add_fault(DownstreamFault("delay", delay_s=30))
        with httpx.Client(base_url=server.base_url) as http, pytest.raises(httpx.ReadTimeout):
            http.get("/tickets", timeout=0.1)
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 2.0 and not server.running


def test_command_line_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "service.devtools.downstream", "--port", "0", "--no-idempotent"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("downstream listening on http://127.0.0.1:")
            with httpx.Client(base_url=line.removeprefix("downstream listening on "), timeout=5.0) as http:
                assert http.get("/_config").json() == {"idempotent": False}
                assert create(http, "cli-1").status_code == 201
        finally:
            assert processes.stop(process, grace_s=10) == 0  # SIGTERM; SIGKILLed (and reaped) after 10 s
