"""The fake model server: answers, faults and the control endpoints that steer it.

What it counts is a :class:`~service.devtools.fakellm.stats.Statistics`; how it answers (latency,
idempotent mode, tool rounds, concurrency limit) a :class:`~service.devtools.fakellm.config.Config`.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, Final

from service.devtools.fakellm.answers import completion, content, faulty_content, tool_completion
from service.devtools.fakellm.batches import PATHS as BATCH_PATHS
from service.devtools.fakellm.batches import FakeBatches
from service.devtools.fakellm.chat import MODEL_NAME, BadRequest, ChatRequest, parse_chat
from service.devtools.fakellm.config import Config, count, rules, seconds
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
from service.devtools.fakellm.prefixes import PrefixCache
from service.devtools.fakellm.scalars import SchemaError
from service.devtools.fakellm.serving import Serving
from service.devtools.fakellm.stats import Statistics
from service.devtools.fakellm.tools import ToolArguments, tool_calls

_CHAT_PATHS: Final = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODELS_PATHS: Final = frozenset({"/v1/models", "/models"})
Handler = Callable[[bytes], Awaitable[tuple[int, Any]]]


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
        self._config = Config(
            idempotent=idempotent, latency_s=seconds(latency_s, "latency_s"),
            tool_rounds=count(tool_rounds, "tool_rounds", 0),
            tool_calls_per_round=count(tool_calls_per_round, "tool_calls_per_round", 1),
            tool_arguments=rules(tool_arguments), max_concurrency=count(max_concurrency, "max_concurrency", 0),
        )
        self._rules: list[Armed[FaultRule]] = []
        self._stored: dict[str, bytes] = {}
        self._open = 0  # chat requests being answered now
        self._stats = Statistics()
        self._prefixes = PrefixCache()  # the prompt prefixes seen: reported as cached tokens
        self._routes: dict[str, dict[str, Handler]] = {
            "/_stats": {"GET": self._get_stats},
            "/_faults": {"GET": self._get_faults, "POST": self._post_faults, "DELETE": self._delete_faults},
            "/_reset": {"POST": self._post_reset},
            "/_latency": {"POST": self._post_latency},
            "/_config": {"GET": self._get_config, "POST": self._post_config},
            "/health": {"GET": self._get_health},
            "/_batch_faults": {"POST": self._post_batch_faults},
        }
        self.batches = FakeBatches(self._batch_answer)  # the Batch API, answered as chat calls are
        for path in _MODELS_PATHS:
            self._routes[path] = {"GET": self._get_models}

    # -- configuration --------------------------------------------------------------------------

    @property
    def latency_s(self) -> float:
        """Seconds every chat completion waits before it is answered."""
        return self._config.latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self._config = replace(self._config, latency_s=seconds(value, "latency_s"))

    def _latency(self) -> float:
        """This answer's wait: ``latency_s``, or a draw up to ``latency_max_s`` when that is larger."""
        low, high = self._config.latency_s, self._config.latency_max_s
        if high <= low:
            return low
        with self._lock:
            return self._rng.uniform(low, high)

    @property
    def idempotent(self) -> bool:
        """Whether a repeated Idempotency-Key gets its first valid response again."""
        return self._config.idempotent

    @idempotent.setter
    def idempotent(self, value: bool) -> None:
        self._config = replace(self._config, idempotent=bool(value))

    @property
    def tool_rounds(self) -> int:
        """Assistant tool-call rounds a conversation gets before the model answers with content."""
        return self._config.tool_rounds

    @tool_rounds.setter
    def tool_rounds(self, value: int) -> None:
        self._config = replace(self._config, tool_rounds=count(value, "tool_rounds", 0))

    @property
    def tool_calls_per_round(self) -> int:
        """Tool calls in each tool-call answer (OpenAI's parallel tool calls)."""
        return self._config.tool_calls_per_round

    @tool_calls_per_round.setter
    def tool_calls_per_round(self, value: int) -> None:
        self._config = replace(self._config, tool_calls_per_round=count(value, "tool_calls_per_round", 1))

    @property
    def tool_arguments(self) -> list[ToolArguments]:
        """The rules that choose a call's arguments; the first that matches the key and tool wins."""
        return list(self._config.tool_arguments)

    @tool_arguments.setter
    def tool_arguments(self, value: Iterable[ToolArguments | Mapping[str, Any]]) -> None:
        self._config = replace(self._config, tool_arguments=rules(value))

    def reset(self) -> None:
        """Drop every fault rule, the statistics and the stored idempotent responses; the
        configuration (latency, idempotent mode, tool rounds and argument rules) stays."""
        with self._lock:
            self._rules = []
            self._stored = {}
            self._stats = Statistics(self._open)
        self._prefixes.clear()
        self.batches.reset()

    @property
    def max_concurrency(self) -> int:
        """Chat requests answered at once; one more is refused with a 429 (0: no limit)."""
        return self._config.max_concurrency

    @max_concurrency.setter
    def max_concurrency(self, value: int) -> None:
        self._config = replace(self._config, max_concurrency=count(value, "max_concurrency", 0))

    # -- statistics -----------------------------------------------------------------------------

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
            return self._stats.snapshot(self._open)

    def last_request(self, key: str) -> dict[str, Any] | None:
        """The body of the last request with Idempotency-Key ``key``, or of the last attempt of the
        task step ``key`` (``key:<attempt>``); None if there was none."""
        with self._lock:
            return self._stats.last_request(key)

    def calls_for(self, key_substring: str) -> int:
        """Requests whose Idempotency-Key contains ``key_substring``."""
        with self._lock:
            return self._stats.calls_for(key_substring)

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
        if path.startswith(BATCH_PATHS):
            await self.batches.handle(scope, receive, send)
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
            over = 0 < self._config.max_concurrency <= self._open
            if over:
                self._stats.requests += 1
                self._stats.over_concurrency += 1
            else:
                self._open += 1
                self._stats.opened(self._open)
        if over:  # as a provider's concurrency limit answers: a 429 without Retry-After
            key = header(scope, b"idempotency-key")
            if key is not None:
                with self._lock:
                    self._stats.refused_by_key[key] += 1
                    self._stats.by_key[key] += 1
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
            self._stats.requests += 1
            if key is not None:
                self._stats.by_key[key] += 1
        body = await read_body(receive, send)
        if body is None:
            return
        if key is not None:
            with self._lock:
                self._stats.bodies[key] = body
        try:
            request = parse_chat(body)
        except BadRequest as exc:
            await self._bad_request(send, str(exc), exc.param)
            return
        request = replace(request, cached_chars=self._prefixes.seen(request.prefix))
        rule = self._pick_rule(key, body)
        await self._sleep(self._latency())
        fault = rule.fault if rule is not None else None
        if rule is not None and fault != "slow_success":
            await self._sleep(rule.delay_s)
        if await self._fail(rule, key, receive, send):
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

    async def _fail(self, rule: FaultRule | None, key: str | None, receive: Receive, send: Send) -> bool:
        """Answer as a fault that fails the request outright does (a dropped connection, an error
        status, a 429 with Retry-After); False when the rule holds no such fault."""
        if rule is None:
            return False
        if rule.fault == "disconnect":
            await drop_connection(receive, send)
            return True
        if rule.fault == "error":
            message = f"the model server failed (HTTP {rule.status})"
            await respond(send, rule.status, error_body(rule.status, message))
            return True
        if rule.fault == "rate_limit":
            if key is not None:
                with self._lock:
                    self._stats.refused_by_key[key] += 1
            headers = [
                (b"retry-after", str(math.ceil(rule.retry_after_s)).encode()),
                (b"retry-after-ms", str(round(rule.retry_after_s * 1000)).encode()),
            ]
            body_429 = error_body(429, "Rate limit reached; retry later.", code="rate_limit_exceeded")
            await respond(send, 429, body_429, headers)
            return True
        return False

    async def _bad_request(self, send: Send, message: str, param: str | None) -> None:
        with self._lock:
            self._stats.bad_requests += 1
        await respond(send, 400, error_body(400, message, param=param))

    def _pick_rule(self, key: str | None, body: bytes) -> FaultRule | None:
        """The first rule that applies to this request, counted and used up."""
        with self._lock:
            if not self._rules:
                return None
            text = key if key is not None else body.decode("utf-8", "replace")
            rule = take(self._rules, lambda rule: rule.match is None or rule.match in text, self._rng)
            if rule is not None:
                self._stats.faults[rule.fault] += 1
            return rule

    def _answer(self, request: ChatRequest, key: str | None) -> tuple[bytes, bool]:
        """A valid answer: the stored one for a repeated key in idempotent mode, else a new one:
        tool calls while the conversation has tool rounds left, the content afterwards."""
        if key is not None and self._config.idempotent:
            with self._lock:
                stored = self._stored.get(key)
                if stored is not None:
                    self._stats.replayed += 1
                    return stored, True
        if request.offers_tools and request.tool_rounds < self._config.tool_rounds:
            calls = self._tool_calls(request, key)
            response = tool_completion(request, calls, self._rng)
        else:
            calls = []
            response = completion(request, content(request.schema, self._rng), "stop", self._rng)
        with self._lock:
            self._stats.completions += 1
            self._stats.valid_completions += 1
            self._stats.tool_calls_by_name.update(call["function"]["name"] for call in calls)
            if key is not None:
                self._stats.completions_by_key[key] += 1
                if self._config.idempotent:
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
            self._stats.completions += 1
            self._stats.tool_calls_by_name.update(call["function"]["name"] for call in calls)
        return response

    def _tool_calls(self, request: ChatRequest, key: str | None, fault: str | None = None) -> list[dict[str, Any]]:
        config = self._config
        return tool_calls(request, config.tool_calls_per_round, config.tool_arguments, key, self._rng, fault)

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
        return 200, self._config.to_dict()

    async def _post_config(self, body: bytes) -> tuple[int, Any]:
        """Set the keys given; every value is checked before any is set, so a bad one changes nothing."""
        self._config = self._config.updated(json_body(body))
        return await self._get_config(body)

    async def _get_models(self, body: bytes) -> tuple[int, Any]:
        return 200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "fakellm"}]}

    async def _get_health(self, body: bytes) -> tuple[int, Any]:
        return 200, {"status": "ok"}

    def _batch_answer(self, body: bytes, invalid: bool) -> bytes:
        request = parse_chat(body)  # its lines read the prompt cache too, as a provider's batch does
        request = replace(request, cached_chars=self._prefixes.seen(request.prefix))
        return self._faulty_answer("schema_violation", request, None) if invalid else self._answer(request, None)[0]

    async def _post_batch_faults(self, body: bytes) -> tuple[int, Any]:
        self.batches.set_faults(**json_body(body))
        return 200, {"ok": True}

