"""The fake model server: answers, faults, statistics and the control endpoints that steer it."""

from __future__ import annotations

import json
import math
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ClassVar, Final

from service.devtools.fakellm.answers import completion, content, faulty_content, tool_completion
from service.devtools.fakellm.chat import MODEL_NAME, BadRequest, ChatRequest, parse_chat
from service.devtools.fakellm.faults import TOOL_FAULTS, Armed, FaultRule, FaultRules, as_rule, take
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
from service.devtools.fakellm.scalars import SchemaError
from service.devtools.fakellm.serving import Serving
from service.devtools.fakellm.tools import ToolArguments, as_tool_arguments, tool_calls

_CHAT_PATHS: Final = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODELS_PATHS: Final = frozenset({"/v1/models", "/models"})
_CONFIG_KEYS: Final = frozenset({
    "idempotent", "latency_s", "latency_max_s", "tool_rounds", "tool_calls_per_round", "tool_arguments",
    "max_concurrency",
})

Handler = Callable[[bytes], Awaitable[tuple[int, Any]]]


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0: {value!r}")
    return float(value)


def _count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}: {value!r}")
    return value


def _rules(value: Any) -> tuple[ToolArguments, ...]:
    if not isinstance(value, Iterable) or isinstance(value, str | bytes | Mapping):
        raise ValueError("tool_arguments must be a list of rules")
    return tuple(as_tool_arguments(rule) for rule in value)


class FakeLLM(Serving, FaultRules[FaultRule]):
    """A fault-injecting OpenAI-compatible chat-completions server (and ASGI app).

    All public methods are thread-safe: the server runs on its own thread and event loop.
    """

    _as_rule = staticmethod(as_rule)
    base_path: ClassVar[str] = "/v1"  # where OpenAI clients expect the API

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        seed: int | None = None,
        idempotent: bool = False,
        tool_rounds: int = 1,
        tool_calls_per_round: int = 1,
        tool_arguments: Iterable[ToolArguments | Mapping[str, Any]] = (),
        max_concurrency: int = 0,
    ) -> None:
        super().__init__(host, port)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._latency_s = _seconds(latency_s, "latency_s")
        self._latency_max_s = 0.0  # above latency_s: each answer waits a uniform draw between the two
        self._idempotent = idempotent
        self._tool_rounds = _count(tool_rounds, "tool_rounds", 0)
        self._tool_calls_per_round = _count(tool_calls_per_round, "tool_calls_per_round", 1)
        self._tool_arguments = _rules(tool_arguments)
        self._rules: list[Armed[FaultRule]] = []
        self._stored: dict[str, bytes] = {}
        self._open = 0  # chat requests being answered now
        self._max_concurrency = _count(max_concurrency, "max_concurrency", 0)  # 0: no limit
        self._reset_stats()
        self._routes: dict[str, dict[str, Handler]] = {
            "/_stats": {"GET": self._get_stats},
            "/_faults": {"GET": self._get_faults, "POST": self._post_faults, "DELETE": self._delete_faults},
            "/_reset": {"POST": self._post_reset},
            "/_latency": {"POST": self._post_latency},
            "/_config": {"GET": self._get_config, "POST": self._post_config},
            "/health": {"GET": self._get_health},
        }
        for path in _MODELS_PATHS:
            self._routes[path] = {"GET": self._get_models}

    # -- configuration --------------------------------------------------------------------------

    @property
    def latency_s(self) -> float:
        """Seconds every chat completion waits before it is answered."""
        return self._latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self._latency_s = _seconds(value, "latency_s")

    def _latency(self) -> float:
        """This answer's wait: ``latency_s``, or a draw up to ``latency_max_s`` when that is larger."""
        low, high = self._latency_s, self._latency_max_s
        if high <= low:
            return low
        with self._lock:
            return self._rng.uniform(low, high)

    @property
    def idempotent(self) -> bool:
        """Whether a repeated Idempotency-Key gets its first valid response again."""
        return self._idempotent

    @idempotent.setter
    def idempotent(self, value: bool) -> None:
        self._idempotent = bool(value)

    @property
    def tool_rounds(self) -> int:
        """Assistant tool-call rounds a conversation gets before the model answers with content."""
        return self._tool_rounds

    @tool_rounds.setter
    def tool_rounds(self, value: int) -> None:
        self._tool_rounds = _count(value, "tool_rounds", 0)

    @property
    def tool_calls_per_round(self) -> int:
        """Tool calls in each tool-call answer (OpenAI's parallel tool calls)."""
        return self._tool_calls_per_round

    @tool_calls_per_round.setter
    def tool_calls_per_round(self, value: int) -> None:
        self._tool_calls_per_round = _count(value, "tool_calls_per_round", 1)

    @property
    def tool_arguments(self) -> list[ToolArguments]:
        """The rules that choose a call's arguments; the first that matches the key and tool wins."""
        return list(self._tool_arguments)

    @tool_arguments.setter
    def tool_arguments(self, value: Iterable[ToolArguments | Mapping[str, Any]]) -> None:
        self._tool_arguments = _rules(value)

    def reset(self) -> None:
        """Drop every fault rule, the statistics and the stored idempotent responses; the
        configuration (latency, idempotent mode, tool rounds and argument rules) stays."""
        with self._lock:
            self._rules = []
            self._stored = {}
            self._reset_stats()

    @property
    def max_concurrency(self) -> int:
        """Chat requests answered at once; one more is refused with a 429 (0: no limit)."""
        return self._max_concurrency

    @max_concurrency.setter
    def max_concurrency(self, value: int) -> None:
        self._max_concurrency = _count(value, "max_concurrency", 0)

    # -- statistics -----------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self._requests = 0
        self._completions = 0
        self._valid_completions = 0
        self._replayed = 0
        self._bad_requests = 0
        self._over_concurrency = 0
        self._fault_counts: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()
        self._completions_by_key: Counter[str] = Counter()
        self._refused_by_key: Counter[str] = Counter()  # 429s: refused before any model work
        self._tool_calls_by_name: Counter[str] = Counter()
        self._last_body: dict[str, bytes] = {}
        self._peak_open = self._open

    def stats(self) -> dict[str, Any]:
        """A snapshot of what the server saw and did.

        ``requests``: chat-completion requests; ``completions``: answers generated, the faulty
        ones included; ``valid_completions``: schema-valid answers generated (normal, latency,
        slow_success); ``replayed``: idempotent replays; ``bad_requests``: 400s for malformed
        requests; ``faults``: applications per fault; ``by_key``: requests per Idempotency-Key;
        ``completions_by_key``: valid completions per Idempotency-Key; ``by_step`` and
        ``completions_by_step``: the same per task step, the key without its attempt number (the
        service sends ``<task>:<step>:<attempt>``, one key per attempt); ``tool_calls``: tool calls
        answered, the faulty ones included; ``tool_calls_by_name``: the same per tool name; ``open``:
        chat requests being answered now; ``peak_open``: the most open at once since the last reset;
        ``over_concurrency``: requests refused with a 429 because ``max_concurrency`` were open;
        ``refused_by_key``: 429s (a ``rate_limit`` fault or over ``max_concurrency``) per Idempotency-Key.
        """
        with self._lock:
            return {
                "requests": self._requests,
                "completions": self._completions,
                "valid_completions": self._valid_completions,
                "replayed": self._replayed,
                "bad_requests": self._bad_requests,
                "faults": dict(self._fault_counts),
                "by_key": dict(self._by_key),
                "completions_by_key": dict(self._completions_by_key),
                "by_step": _per_step(self._by_key),
                "completions_by_step": _per_step(self._completions_by_key),
                "tool_calls": self._tool_calls_by_name.total(),
                "tool_calls_by_name": dict(self._tool_calls_by_name),
                "open": self._open,
                "peak_open": self._peak_open,
                "over_concurrency": self._over_concurrency,
                "refused_by_key": dict(self._refused_by_key),
            }

    def last_request(self, key: str) -> dict[str, Any] | None:
        """The body of the last request with Idempotency-Key ``key``, or of the last attempt of the
        task step ``key`` (``key:<attempt>``); None if there was none."""
        with self._lock:
            body = self._last_body.get(key)
            if body is None:
                attempts = [k for k in self._last_body if _step_of(k) == key]
                body = self._last_body[max(attempts, key=_attempt_of)] if attempts else None
        return json.loads(body) if body is not None else None

    def calls_for(self, key_substring: str) -> int:
        """Requests whose Idempotency-Key contains ``key_substring``."""
        with self._lock:
            return sum(n for key, n in self._by_key.items() if key_substring in key)

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path in _CHAT_PATHS:
            if method == "POST":
                await self._chat(scope, receive, send)
            else:
                await respond(send, 405, error_body(405, f"{method} is not allowed on {path}"))
            return
        route = self._routes.get(path.rstrip("/") or "/")
        if route is None and path.startswith("/v1/"):  # control endpoints also answer below the base URL
            route = self._routes.get(path[3:].rstrip("/"))
        if route is None:
            await respond(send, 404, error_body(404, f"no route for {path}"))
            return
        handler = route.get(method)
        if handler is None:
            await respond(send, 405, error_body(405, f"{method} is not allowed on {path}"))
            return
        body = await read_body(receive, send)
        if body is None:
            return
        try:
            status, payload = await handler(body)
        except (ValueError, TypeError) as exc:
            await respond(send, 400, error_body(400, str(exc)))
            return
        await respond(send, status, dumps(payload))

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._lock:
            over = 0 < self._max_concurrency <= self._open
            if over:
                self._requests += 1
                self._over_concurrency += 1
            else:
                self._open += 1
                self._peak_open = max(self._peak_open, self._open)
        if over:  # as a provider's concurrency limit answers: a 429 without Retry-After
            key = header(scope, b"idempotency-key")
            if key is not None:
                with self._lock:
                    self._refused_by_key[key] += 1
                    self._by_key[key] += 1
            if await read_body(receive, send) is not None:
                body_429 = error_body(429, "Too many concurrent requests.", code="concurrency_limit_exceeded")
                await respond(send, 429, body_429)
            return
        try:
            await self._answer_chat(scope, receive, send)
        finally:
            with self._lock:
                self._open -= 1

    async def _answer_chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = header(scope, b"idempotency-key")
        with self._lock:
            self._requests += 1
            if key is not None:
                self._by_key[key] += 1
        body = await read_body(receive, send)
        if body is None:
            return
        if key is not None:
            with self._lock:
                self._last_body[key] = body
        try:
            request = parse_chat(body)
        except BadRequest as exc:
            await self._bad_request(send, str(exc), exc.param)
            return
        rule = self._pick_rule(key, body)
        await self._sleep(self._latency())
        fault = rule.fault if rule is not None else None
        if rule is not None and fault != "slow_success":
            await self._sleep(rule.delay_s)

        if fault == "disconnect":
            await drop_connection(receive, send)
            return
        if rule is not None and fault == "error":
            message = f"the model server failed (HTTP {rule.status})"
            await respond(send, rule.status, error_body(rule.status, message))
            return
        if rule is not None and fault == "rate_limit":
            if key is not None:
                with self._lock:
                    self._refused_by_key[key] += 1
            headers = [
                (b"retry-after", str(math.ceil(rule.retry_after_s)).encode()),
                (b"retry-after-ms", str(round(rule.retry_after_s * 1000)).encode()),
            ]
            body_429 = error_body(429, "Rate limit reached; retry later.", code="rate_limit_exceeded")
            await respond(send, 429, body_429, headers)
            return

        try:
            if fault is None or fault in ("latency", "slow_success"):
                response, replayed = self._answer(request, key)
            else:
                response, replayed = self._faulty_answer(fault, request, key), False
        except BadRequest as exc:
            await self._bad_request(send, str(exc), exc.param)
            return
        except SchemaError as exc:
            await self._bad_request(send, f"invalid response_format schema: {exc}", "response_format")
            return
        if rule is not None and fault == "slow_success":
            await self._sleep(rule.delay_s)
        await respond(send, 200, response, [(b"idempotent-replayed", b"true")] if replayed else ())

    async def _bad_request(self, send: Send, message: str, param: str | None) -> None:
        with self._lock:
            self._bad_requests += 1
        await respond(send, 400, error_body(400, message, param=param))

    def _pick_rule(self, key: str | None, body: bytes) -> FaultRule | None:
        """The first rule that applies to this request, counted and used up."""
        with self._lock:
            if not self._rules:
                return None
            text = key if key is not None else body.decode("utf-8", "replace")
            rule = take(self._rules, lambda rule: rule.match is None or rule.match in text, self._rng)
            if rule is not None:
                self._fault_counts[rule.fault] += 1
            return rule

    def _answer(self, request: ChatRequest, key: str | None) -> tuple[bytes, bool]:
        """A valid answer: the stored one for a repeated key in idempotent mode, else a new one:
        tool calls while the conversation has tool rounds left, the content afterwards."""
        if key is not None and self._idempotent:
            with self._lock:
                stored = self._stored.get(key)
                if stored is not None:
                    self._replayed += 1
                    return stored, True
        if request.offers_tools and request.tool_rounds < self._tool_rounds:
            calls = self._tool_calls(request, key)
            response = tool_completion(request, calls, self._rng)
        else:
            calls = []
            response = completion(request, content(request.schema, self._rng), "stop", self._rng)
        with self._lock:
            self._completions += 1
            self._valid_completions += 1
            self._tool_calls_by_name.update(call["function"]["name"] for call in calls)
            if key is not None:
                self._completions_by_key[key] += 1
                if self._idempotent:
                    response = self._stored.setdefault(key, response)
        return response, False

    def _faulty_answer(self, fault: str, request: ChatRequest, key: str | None) -> bytes:
        if fault in TOOL_FAULTS and request.offers_tools:  # whatever the rounds: the model misbehaves
            calls = self._tool_calls(request, key, fault)
            response = tool_completion(request, calls, self._rng)
        else:
            calls = []
            text, reason, refusal = faulty_content(fault, request, self._rng)
            response = completion(request, text, reason, self._rng, refusal)
        with self._lock:
            self._completions += 1
            self._tool_calls_by_name.update(call["function"]["name"] for call in calls)
        return response

    def _tool_calls(self, request: ChatRequest, key: str | None, fault: str | None = None) -> list[dict[str, Any]]:
        return tool_calls(request, self._tool_calls_per_round, self._tool_arguments, key, self._rng, fault)

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

    async def _post_latency(self, body: bytes) -> tuple[int, Any]:
        data = json_body(body)
        if not isinstance(data, dict) or "latency_s" not in data:
            raise ValueError('expected {"latency_s": <seconds>}')
        self.latency_s = data["latency_s"]
        return 200, {"latency_s": self.latency_s}

    async def _get_config(self, body: bytes) -> tuple[int, Any]:
        return 200, {
            "idempotent": self.idempotent,
            "latency_s": self.latency_s,
            "latency_max_s": self._latency_max_s,
            "tool_rounds": self.tool_rounds,
            "tool_calls_per_round": self.tool_calls_per_round,
            "tool_arguments": [rule.to_dict() for rule in self._tool_arguments],
            "max_concurrency": self.max_concurrency,
        }

    async def _post_config(self, body: bytes) -> tuple[int, Any]:
        """Set the keys given; every value is checked before any is set, so a bad one changes nothing."""
        data = json_body(body)
        if not isinstance(data, dict) or set(data) - _CONFIG_KEYS:
            raise ValueError(f"expected an object with any of: {', '.join(sorted(_CONFIG_KEYS))}")
        idempotent = data.get("idempotent", self._idempotent)
        if not isinstance(idempotent, bool):
            raise ValueError("idempotent must be true or false")
        latency_s = _seconds(data.get("latency_s", self._latency_s), "latency_s")
        latency_max_s = _seconds(data.get("latency_max_s", self._latency_max_s), "latency_max_s")
        rounds = _count(data.get("tool_rounds", self._tool_rounds), "tool_rounds", 0)
        per_round = _count(data.get("tool_calls_per_round", self._tool_calls_per_round), "tool_calls_per_round", 1)
        rules = _rules(data["tool_arguments"]) if "tool_arguments" in data else self._tool_arguments
        max_concurrency = _count(data.get("max_concurrency", self._max_concurrency), "max_concurrency", 0)
        self._idempotent, self._latency_s, self._latency_max_s = idempotent, latency_s, latency_max_s
        self._tool_rounds, self._tool_calls_per_round, self._tool_arguments = rounds, per_round, rules
        self._max_concurrency = max_concurrency
        return await self._get_config(body)

    async def _get_models(self, body: bytes) -> tuple[int, Any]:
        model = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "fakellm"}
        return 200, {"object": "list", "data": [model]}

    async def _get_health(self, body: bytes) -> tuple[int, Any]:
        return 200, {"status": "ok"}


def _step_of(key: str) -> str:
    """``<task>:<step>`` of an Idempotency-Key ``<task>:<step>:<attempt>`` (other keys as they are)."""
    head, _, tail = key.rpartition(":")
    return head if head and tail.isdigit() else key


def _attempt_of(key: str) -> int:
    tail = key.rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


def _per_step(by_key: Counter[str]) -> dict[str, int]:
    steps: Counter[str] = Counter()
    for key, n in by_key.items():
        steps[_step_of(key)] += n
    return dict(steps)
