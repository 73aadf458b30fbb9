"""A fake downstream for tools with side effects: a small ticketing REST API that counts every
effect per Idempotency-Key, so a chaos test can tell whether a client that lost an answer
reconciled (asked the status endpoint) or applied the effect again::

    with FakeDownstream() as api:                # a free loopback port
        api.add_fault(DownstreamFault("drop_after", match="task-7", times=1))
        ...                                      # point the service's HTTP tool at api.base_url
        assert api.stats()["effects_by_key"] == {"task-7:ticket": 1}

``python -m service.devtools.downstream --host H --port P`` serves it in the foreground until
SIGTERM or SIGINT; tests in another process steer it through the control endpoints.

Endpoints (JSON; ``base_url`` is ``http://host:port``)
    ``POST /tickets``: the body (an object) becomes a ticket's ``fields``; ``Idempotency-Key`` is
    required (400 without) and ``X-Fence`` (an integer) is recorded. The first request for a key
    applies the effect: 201 and ``{"id": "T-000001", "key", "fields", "status": "open", "fence"}``.
    A repeated key gets 200, the same ticket and ``Idempotent-Replayed: true``; 422 if its body
    differs, as providers answer a key reused for another request.

    ``GET /tickets/by-key/{key}`` (URL-encoded): the key's ticket, or 404. What a reconcile asks.

    ``POST /tickets/{id}/cancel`` with an ``Idempotency-Key`` of its own: the undo (the status
    becomes ``cancelled``); a repeated key is replayed; an unknown id is 404.

    ``GET /tickets``: ``{"tickets": [...]}``, every ticket.

Non-idempotent mode
    With ``idempotent=False`` every create and cancel applies its effect, as a downstream that
    ignores the header does: only a client that reconciles before it retries keeps every
    ``effects_by_key`` value at 1. A key's ticket is then the first one created with it.

Faults
    An ordered list of :class:`DownstreamFault`; the first rule that matches a request is applied.
    ``match`` is a substring of the request's Idempotency-Key or of its decoded path; ``times``
    counts down the requests a rule still applies to. Every fault waits ``delay_s`` first.

    - ``delay``: then act normally (any ticket endpoint).
    - ``error``: a create or cancel answers ``status`` without applying its effect.
    - ``drop_before``: a create or cancel closes the connection without applying its effect.
    - ``drop_after``: a create or cancel applies its effect, then closes the connection without
      an answer: the client cannot know that it landed.
    - ``status_error``: the status endpoint (``GET /tickets/by-key/...``) answers ``status``;
      with a 5xx the client cannot tell whether the ticket exists; with 409 it is in progress.
    - ``status_pending``: the status endpoint answers 200 ``{"key", "status": "pending"}``, as a
      downstream that has the call and not yet its result does; ``status_accepted``: 202
      ``{"key", "status": "accepted"}``, the same said with the status code.

Control endpoints (JSON)
    ``GET /_stats``, ``GET|POST|DELETE /_faults`` (POST replaces the rules), ``POST /_reset``
    (drops the tickets, the statistics and the rules, not the mode), ``GET|POST /_config``
    (``{"idempotent": bool}``), ``GET /health``.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final
from urllib.parse import unquote

from service.devtools.fakellm.faults import Armed, FaultRules, Rule, take
from service.devtools.fakellm.http import (
    Receive,
    Scope,
    Send,
    drop_connection,
    dumps,
    error_body,
    header,
    json_body,
    read_body,
    respond,
)
from service.devtools.fakellm.serving import Serving, serve_until_stopped

FAULTS: Final = ("delay", "error", "drop_before", "drop_after", "status_error", "status_pending", "status_accepted")
_EFFECTS: Final = frozenset({"create", "cancel"})  # the actions that change something
_FENCE: Final = re.compile(r"-?[0-9]{1,18}")
_REPLAYED: Final = (b"idempotent-replayed", b"true")

Handler = Callable[[bytes], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True, slots=True)
class DownstreamFault(Rule):
    """One fault to inject into the downstream; see the module docstring for what each does."""

    KNOWN: ClassVar[tuple[str, ...]] = FAULTS

    def hits(self, action: str, key: str | None, path: str) -> bool:
        if self.fault in ("status_error", "status_pending", "status_accepted") and action != "status":
            return False
        if self.fault in ("error", "drop_before", "drop_after") and action not in _EFFECTS:
            return False
        return self.match is None or self.match in path or (key is not None and self.match in key)


def as_fault(rule: DownstreamFault | Mapping[str, Any]) -> DownstreamFault:
    return rule if isinstance(rule, DownstreamFault) else DownstreamFault.from_dict(rule)


class Refused(Exception):
    """A request the API turns down with ``status`` and an error body, changing nothing."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FakeDownstream(Serving, FaultRules[DownstreamFault]):
    """A ticketing REST API with side effects counted per Idempotency-Key (and an ASGI app).

    All public methods are thread-safe: the server runs on its own thread and event loop.
    """

    _as_rule = staticmethod(as_fault)

    def __init__(self, host: str = "127.0.0.1", port: int = 0, idempotent: bool = True,
                 seed: int | None = None) -> None:
        super().__init__(host, port)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._idempotent = idempotent
        self._rules: list[Armed[DownstreamFault]] = []
        self._reset_state()
        self._routes: dict[str, dict[str, Handler]] = {
            "/_stats": {"GET": self._get_stats},
            "/_faults": {"GET": self._get_faults, "POST": self._post_faults, "DELETE": self._delete_faults},
            "/_reset": {"POST": self._post_reset},
            "/_config": {"GET": self._get_config, "POST": self._post_config},
            "/health": {"GET": self._get_health},
        }

    # -- configuration --------------------------------------------------------------------------

    @property
    def idempotent(self) -> bool:
        """Whether a repeated Idempotency-Key is replayed instead of applied again."""
        return self._idempotent

    @idempotent.setter
    def idempotent(self, value: bool) -> None:
        self._idempotent = bool(value)

    def reset(self) -> None:
        """Drop every ticket, rule and statistic; the mode stays."""
        with self._lock:
            self._rules = []
            self._reset_state()

    # -- state ----------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._tickets: dict[str, dict[str, Any]] = {}  # id -> ticket
        self._by_key: dict[str, str] = {}  # create key -> the id of its first ticket
        self._cancels: dict[str, str] = {}  # cancel key -> the id of the ticket it cancelled
        self._requests = 0
        self._replayed = 0
        self._status_checks = 0
        self._effects: Counter[str] = Counter()
        self._undos: Counter[str] = Counter()
        self._fault_counts: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        """A snapshot of what the API saw and did.

        ``requests``: requests to the ticket endpoints; ``effects``, ``effects_by_key``: tickets
        created, in all and per Idempotency-Key (a correct client keeps each at 1); ``undos``,
        ``undos_by_key``: cancels applied; ``tickets``: tickets that exist; ``replayed``: repeated
        keys answered without an effect; ``status_checks``: requests to the status endpoint;
        ``faults``: applications per fault.
        """
        with self._lock:
            return {
                "requests": self._requests,
                "effects": self._effects.total(),
                "effects_by_key": dict(self._effects),
                "undos": self._undos.total(),
                "undos_by_key": dict(self._undos),
                "tickets": len(self._tickets),
                "replayed": self._replayed,
                "status_checks": self._status_checks,
                "faults": dict(self._fault_counts),
            }

    def ticket_for(self, key: str) -> dict[str, Any] | None:
        """The ticket created with Idempotency-Key ``key`` (the first one), or None."""
        with self._lock:
            ticket_id = self._by_key.get(key)
            return dict(self._tickets[ticket_id]) if ticket_id is not None else None

    def tickets(self) -> list[dict[str, Any]]:
        """Every ticket, oldest first."""
        with self._lock:
            return [dict(ticket) for ticket in self._tickets.values()]

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        segments = _segments(scope)
        method: str = scope["method"]
        if segments[:1] == ["tickets"]:
            await self._ticket_request(scope, receive, send, segments)
            return
        path = "/" + "/".join(segments)
        route = self._routes.get(path)
        if route is None or method not in route:
            status = 404 if route is None else 405
            await respond(send, status, error_body(status, f"{method} {path} is not served"))
            return
        body = await read_body(receive, send)
        if body is None:
            return
        try:
            status, payload = await route[method](body)
        except (ValueError, TypeError) as exc:
            await respond(send, 400, error_body(400, str(exc)))
            return
        await respond(send, status, dumps(payload))

    async def _ticket_request(self, scope: Scope, receive: Receive, send: Send, segments: list[str]) -> None:
        try:
            action = _action(segments, scope["method"])
        except Refused as exc:
            await respond(send, exc.status, error_body(exc.status, str(exc)))
            return
        with self._lock:
            self._requests += 1
            if action == "status":
                self._status_checks += 1
        body = await read_body(receive, send)
        if body is None:
            return
        key = header(scope, b"idempotency-key")
        rule = self._pick_rule(action, key, "/" + "/".join(segments))
        if rule is not None:
            await self._sleep(rule.delay_s)
        if rule is not None and rule.fault == "drop_before":
            await drop_connection(receive, send)
            return
        if rule is not None and rule.fault in ("status_pending", "status_accepted"):
            pending = rule.fault == "status_pending"
            await respond(send, 200 if pending else 202,
                          dumps({"key": segments[2], "status": "pending" if pending else "accepted"}))
            return
        if rule is not None and rule.fault in ("error", "status_error"):
            await respond(send, rule.status, error_body(rule.status, f"the downstream failed (HTTP {rule.status})"))
            return
        try:
            status, ticket, replayed = self._act(action, segments, body, key, header(scope, b"x-fence"))
            response = dumps(ticket)
        except Refused as exc:
            status, response, replayed = exc.status, error_body(exc.status, str(exc)), False
        if rule is not None and rule.fault == "drop_after":
            await drop_connection(receive, send)
            return
        await respond(send, status, response, [_REPLAYED] if replayed else ())

    def _pick_rule(self, action: str, key: str | None, path: str) -> DownstreamFault | None:
        """The first rule that applies to this request, counted and used up."""
        with self._lock:
            rule = take(self._rules, lambda rule: rule.hits(action, key, path), self._rng)
            if rule is not None:
                self._fault_counts[rule.fault] += 1
            return rule

    # -- the effects ----------------------------------------------------------------------------

    def _act(self, action: str, segments: list[str], body: bytes, key: str | None,
             fence: str | None) -> tuple[int, Any, bool]:
        """The status, body and whether it is a replay; each check and effect under one lock, so
        concurrent requests with one key apply it once."""
        if action == "list":
            return 200, {"tickets": self.tickets()}, False
        if action == "status":
            return self._status(segments[2])
        if not key:
            raise Refused(400, "the Idempotency-Key header is required")
        if action == "create":
            return self._create(_fields(body), key, _fence(fence))
        return self._cancel(segments[1], key)

    def _create(self, fields: dict[str, Any], key: str, fence: int | None) -> tuple[int, Any, bool]:
        with self._lock:
            known = self._by_key.get(key)
            if known is not None and self._idempotent:
                ticket = self._tickets[known]
                if ticket["fields"] != fields:
                    raise Refused(422, f"Idempotency-Key {key!r} was used with another body")
                self._replayed += 1
                return 200, dict(ticket), True
            ticket_id = f"T-{len(self._tickets) + 1:06d}"
            ticket = {"id": ticket_id, "key": key, "fields": fields, "status": "open", "fence": fence}
            self._tickets[ticket_id] = ticket
            self._by_key.setdefault(key, ticket_id)
            self._effects[key] += 1
            return 201, dict(ticket), False

    def _cancel(self, ticket_id: str, key: str) -> tuple[int, Any, bool]:
        with self._lock:
            cancelled = self._cancels.get(key)
            if cancelled is not None and self._idempotent:
                if cancelled != ticket_id:
                    raise Refused(422, f"Idempotency-Key {key!r} was used to cancel {cancelled}")
                self._replayed += 1
                return 200, dict(self._tickets[cancelled]), True
            ticket = self._tickets.get(ticket_id)
            if ticket is None:
                raise Refused(404, f"no ticket {ticket_id!r}")
            ticket["status"] = "cancelled"
            self._cancels.setdefault(key, ticket_id)
            self._undos[key] += 1
            return 200, dict(ticket), False

    def _status(self, key: str) -> tuple[int, Any, bool]:
        with self._lock:
            ticket_id = self._by_key.get(key)
            if ticket_id is None:
                raise Refused(404, f"no ticket for Idempotency-Key {key!r}")
            return 200, dict(self._tickets[ticket_id]), False

    # -- control endpoints ----------------------------------------------------------------------

    async def _get_stats(self, body: bytes) -> tuple[int, Any]:
        return 200, self.stats()

    async def _get_faults(self, body: bytes) -> tuple[int, Any]:
        return 200, {"faults": [rule.to_dict() for rule in self.faults()]}

    async def _post_faults(self, body: bytes) -> tuple[int, Any]:
        data = json_body(body)
        if isinstance(data, dict) and "faults" in data:
            data = data["faults"]
        if not isinstance(data, list):
            raise ValueError("expected a JSON array of fault rules")
        self.set_faults(data)
        return await self._get_faults(body)

    async def _delete_faults(self, body: bytes) -> tuple[int, Any]:
        self.clear_faults()
        return 200, {"faults": []}

    async def _post_reset(self, body: bytes) -> tuple[int, Any]:
        self.reset()
        return 200, {"ok": True}

    async def _get_config(self, body: bytes) -> tuple[int, Any]:
        return 200, {"idempotent": self.idempotent}

    async def _post_config(self, body: bytes) -> tuple[int, Any]:
        data = json_body(body)
        if not isinstance(data, dict) or set(data) - {"idempotent"}:
            raise ValueError('expected {"idempotent": <bool>}')
        idempotent = data.get("idempotent", self._idempotent)
        if not isinstance(idempotent, bool):
            raise ValueError("idempotent must be true or false")
        self.idempotent = idempotent
        return await self._get_config(body)

    async def _get_health(self, body: bytes) -> tuple[int, Any]:
        return 200, {"status": "ok"}


def _segments(scope: Scope) -> list[str]:
    """The path's segments, each percent-decoded on its own, so an encoded '/' stays in its segment."""
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        return [s for s in str(scope["path"]).split("/") if s]
    return [unquote(s) for s in raw.decode("latin-1").split("/") if s]


def _action(segments: list[str], method: str) -> str:
    """Which ticket endpoint a request asks for: list, create, status or cancel."""
    match segments:
        case ["tickets"]:
            allowed = {"GET": "list", "POST": "create"}
        case ["tickets", "by-key", _]:
            allowed = {"GET": "status"}
        case ["tickets", _, "cancel"]:
            allowed = {"POST": "cancel"}
        case _:
            raise Refused(404, f"no route for /{'/'.join(segments)}")
    if method not in allowed:
        raise Refused(405, f"{method} is not allowed on /{'/'.join(segments)}")
    return allowed[method]


def _fields(body: bytes) -> dict[str, Any]:
    try:
        fields = json_body(body)
    except ValueError as exc:
        raise Refused(400, str(exc)) from exc
    if not isinstance(fields, dict):
        raise Refused(400, "the body must be a JSON object")
    return fields


def _fence(text: str | None) -> int | None:
    if text is None:
        return None
    if not _FENCE.fullmatch(text.strip()):
        raise Refused(400, f"X-Fence must be an integer: {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.devtools.downstream",
        description="Serve a fake ticketing API that counts side effects per Idempotency-Key until stopped.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--idempotent", action=argparse.BooleanOptionalAction, default=True,
                        help="replay repeated Idempotency-Keys instead of applying them again (default)")
    parser.add_argument("--seed", type=int, default=None, help="make fault probabilities reproducible")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")

    return serve_until_stopped(FakeDownstream(args.host, args.port, idempotent=args.idempotent, seed=args.seed),
                               "downstream")


if __name__ == "__main__":
    sys.exit(main())
