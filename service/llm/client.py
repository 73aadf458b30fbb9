"""Client for an OpenAI-compatible ``/chat/completions`` endpoint.

One :meth:`LLMClient.chat` call is exactly one HTTP attempt. Retries, backoff and attempt
budgets belong to the caller; this module only translates what happened on the wire into
the exceptions of :mod:`service.core.errors`:

    timeout                          LLMTimeout        (outcome unknown)
    connect refused, DNS failure     EndpointFault("unreachable")
    reset / disconnect / proto       LLMUnavailable
    401, 403                         EndpointFault("auth")
    404                              EndpointFault("not_found")
    429                              LLMRateLimited    (delay from retry-after-ms / Retry-After)
    408, 409, 5xx                    LLMUnavailable
    other 4xx (and 3xx)              PermanentError
    2xx body over max_response_bytes InvalidOutput("too_large") (error bodies are cut instead)
    2xx with a malformed body        LLMUnavailable
    finish_reason "length"           InvalidOutput("truncated")
    content filter / refusal         InvalidOutput("refused")
    empty content                    InvalidOutput("empty")

Every attempt increments ``agent_llm_requests_total`` exactly once, with one of
:data:`service.core.metrics.LLM_OUTCOMES` (``client_error`` for auth/not_found, ``connection_error``
for unreachable). Messages put in exceptions are short and pass through :func:`service.llm.scrub.scrub`, so an
endpoint that echoes a key (``sk-...``, ``Bearer ...``) cannot leak it into logs or dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import re
import socket
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson

from service.core.errors import (
    AgentError,
    EndpointFault,
    InvalidOutput,
    LLMTimeout,
    LLMUnavailable,
)
from service.core.metrics import Metrics
from service.core.settings import LLMSettings
from service.llm.responses import (
    HTTPResponse,
    answer,
    first_choice,
    json_object,
    outcome_of,
    raise_for_status,
    token_count,
)

logger = logging.getLogger(__name__)

_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_READ_CHUNK = 64 * 1024
_MAX_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat completion to ask for."""

    messages: list[dict[str, Any]]
    schema: dict[str, Any] | None  # JSON schema of the expected output
    schema_name: str  # [A-Za-z0-9_-]{1,64}
    idempotency_key: str  # stable for the work: sent as header Idempotency-Key
    timeout_s: float | None = None  # overrides settings.timeout_s (a deadline may shorten it)
    max_tokens: int | None = None
    traceparent: str | None = None  # forwarded as the `traceparent` header when set
    model: str | None = None  # overrides settings.model (a step may name its own)
    temperature: float | None = None  # overrides settings.temperature
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI function-calling tool specs offered to the model
    tool_choice: str | None = None  # "auto", "none", "required" (None: the endpoint's default)
    kind: str | None = None  # the task's kind: a label of the latency metric, never sent
    # the prefix the request shares with the step's others (service.llm.affinity), sent as OpenAI's
    # prompt_cache_key where the endpoint takes it
    cache_key: str | None = None

    def __post_init__(self) -> None:
        if not _SCHEMA_NAME.fullmatch(self.schema_name):
            raise ValueError(f"schema_name must match [A-Za-z0-9_-]{{1,64}}: {self.schema_name!r}")
        if not self.idempotency_key:
            raise ValueError("idempotency_key must not be empty")
        timeout_s = self.timeout_s
        if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds: {self.timeout_s!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1: {self.max_tokens!r}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise ValueError(f"temperature must be within 0..2: {self.temperature!r}")


@dataclass(frozen=True, slots=True)
class ChatResult:
    """The model's answer to one :class:`ChatRequest`."""

    content: str
    finish_reason: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cached_tokens: int = 0  # of prompt_tokens, those the endpoint read from its prompt cache
    # the tools the model asked to call instead of answering: {"id", "name", "arguments"}, arguments
    # as the model wrote them (a JSON text, checked by the caller)
    tool_calls: tuple[dict[str, str], ...] = ()


class LLMClient:
    """Async client for ``{base_url}/chat/completions``; one HTTP attempt per :meth:`chat`.

    The HTTP client is aiohttp: its connection pool hands out a free keep-alive connection in
    constant time, where httpx/httpcore checks every pooled connection on each request (a
    ``getpeername`` and a readability probe per connection), which cost the service most of its
    CPU at a few hundred requests a second.
    """

    def __init__(self, settings: LLMSettings, base_url: str, metrics: Metrics, *, max_open: int | None = None,
                 endpoint: str = "primary") -> None:
        """``max_open``: the calls open at once (the wiring derives it from the in-flight window, see
        :mod:`service.runtime.limits`); None takes ``settings.max_concurrency``, and when that is unset
        too the caller's own concurrency is the only bound. ``endpoint``: its name in the metrics."""
        self._settings = settings
        self._endpoint = endpoint
        self._metrics = metrics
        self._url = f"{base_url.rstrip('/')}/chat/completions"
        self.max_open = max_open if max_open is not None else settings.max_concurrency
        self._semaphore = asyncio.Semaphore(self.max_open) if self.max_open is not None else None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _client(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running event loop."""
        if self._closed:
            raise RuntimeError("LLMClient is closed")
        if self._session is None:
            # as many connections as calls may be open: the pool is never a second, hidden cap (0: no limit)
            connector = aiohttp.TCPConnector(limit=self.max_open or 0, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"Accept": "application/json", "Content-Type": "application/json"},
                raise_for_status=False,
                auto_decompress=True,
            )
        return self._session

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. Safe to call more than once."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Send one chat completion request and return the answer.

        Raises the :mod:`service.core.errors` exception that matches the failure; never retries.
        """
        timeout_s = request.timeout_s if request.timeout_s is not None else self._settings.timeout_s
        payload = _encode(self._payload(request))
        headers = self._headers(request)
        logger.debug(
            "LLM request schema=%s idempotency_key=%s timeout=%.3fs",
            request.schema_name, request.idempotency_key, timeout_s,
        )
        response, latency = await self._exchange(payload, headers, request, timeout_s)
        self._metrics.model_latency(request.kind, self._endpoint).observe(latency)
        try:
            result = self._interpret(response, latency, request.kind)
        except AgentError as exc:
            self._count(outcome_of(exc))
            logger.debug(
                "LLM request failed schema=%s idempotency_key=%s status=%d latency=%.3fs: %s",
                request.schema_name, request.idempotency_key, response.status, latency,
                type(exc).__name__,
            )
            raise
        self._count("ok")
        logger.debug(
            "LLM request ok schema=%s idempotency_key=%s latency=%.3fs tokens=%d/%d",
            request.schema_name, request.idempotency_key, latency,
            result.prompt_tokens, result.completion_tokens,
        )
        return result

    async def _exchange(self, payload: bytes, headers: dict[str, str], request: ChatRequest,
                        timeout_s: float) -> tuple[HTTPResponse, float]:
        """One POST within the cap on open calls: the response and its latency, or the failure on
        the wire translated (see the module docstring) and counted."""
        async with self._semaphore or contextlib.nullcontext():
            started = time.perf_counter()
            try:
                response = await self._post(payload, headers, timeout_s)
            except TimeoutError as exc:  # aiohttp's own timeouts subclass it too
                latency = time.perf_counter() - started
                self._metrics.model_latency(request.kind, self._endpoint).observe(latency)
                self._count("timeout")
                logger.debug(
                    "LLM request timed out schema=%s idempotency_key=%s after %.3fs (%s)",
                    request.schema_name, request.idempotency_key, latency, type(exc).__name__,
                )
                raise LLMTimeout(
                    f"LLM request timed out after {latency:.3f}s ({type(exc).__name__}); "
                    "the outcome is unknown: the endpoint may have completed it"
                ) from exc
            except AgentError as exc:  # the body was over max_response_bytes
                self._metrics.model_latency(request.kind, self._endpoint).observe(time.perf_counter() - started)
                self._count(outcome_of(exc))
                raise
            except (aiohttp.ClientConnectorError, ConnectionRefusedError, socket.gaierror) as exc:
                # nothing listens there, or the name does not resolve: no task can succeed
                self._count("connection_error")
                logger.debug(
                    "LLM endpoint unreachable schema=%s idempotency_key=%s: %s",
                    request.schema_name, request.idempotency_key, type(exc).__name__,
                )
                raise EndpointFault(
                    "unreachable", f"LLM endpoint unreachable: {type(exc).__name__}"
                ) from exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
                self._count("connection_error")
                logger.debug(
                    "LLM connection failed schema=%s idempotency_key=%s: %s",
                    request.schema_name, request.idempotency_key, type(exc).__name__,
                )
                raise LLMUnavailable(f"LLM endpoint unreachable: {type(exc).__name__}") from exc
            except aiohttp.ClientError as exc:
                # e.g. a malformed status line or headers: a response arrived but is unreadable
                self._count("server_error")
                raise LLMUnavailable(
                    f"LLM endpoint sent an unreadable response: {type(exc).__name__}"
                ) from exc
            return response, time.perf_counter() - started

    async def _post(self, payload: bytes, headers: dict[str, str], timeout_s: float) -> HTTPResponse:
        """One POST; the whole exchange, body included, within ``timeout_s``."""
        async with self._client().post(
            self._url, data=payload, headers=headers, timeout=_timeout(timeout_s), allow_redirects=False,
        ) as response:
            limit = self._settings.max_response_bytes
            ok = 200 <= response.status < 300
            length = response.content_length
            if ok and length is not None and length > limit:
                raise InvalidOutput(
                    "too_large", f"LLM response of {length} bytes is over the {limit}-byte limit"
                )
            if ok and length is not None and "Content-Encoding" not in response.headers:
                # announced, within the limit and not compressed (so the body is that long): one read
                return HTTPResponse(response.status, response.headers, await response.read())
            parts: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(_READ_CHUNK):
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    if ok:
                        raise InvalidOutput(
                            "too_large", f"LLM response is over the {limit}-byte limit"
                        )
                    break  # an error body: its start is enough for the message
            body = b"".join(parts)[:limit]
            return HTTPResponse(response.status, response.headers, body)

    # -- request ------------------------------------------------------------------------------

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        """The body, its stable parts first (the model, the tools, the schema, then the messages,
        which a step orders system prompt, session summary and history, the task's own last) and the
        per-call values after: a server that caches a prefix of the request text keeps the most."""
        settings = self._settings
        payload: dict[str, Any] = {"model": request.model or settings.model}
        if request.tools:
            payload["tools"] = list(request.tools)
            if request.tool_choice is not None:
                payload["tool_choice"] = request.tool_choice
        if request.schema is not None:
            if settings.response_format == "json_schema":
                payload["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": request.schema_name,
                        "schema": request.schema,
                        "strict": True,
                    },
                }
            else:
                payload["response_format"] = {"type": "json_object", "schema": request.schema}
        payload["messages"] = request.messages
        payload["temperature"] = settings.temperature if request.temperature is None else request.temperature
        payload["max_tokens"] = request.max_tokens if request.max_tokens is not None else settings.max_tokens
        if request.cache_key is not None and settings.prompt_cache_key:
            payload["prompt_cache_key"] = request.cache_key
        return payload

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The body :meth:`chat` would send for ``request``: a batch lane's request line carries it."""
        return self._payload(request)

    def read_answer(self, body: dict[str, Any], kind: str | None = None) -> ChatResult:
        """A chat completion's body answered through a batch (a line of its output), read as
        :meth:`chat` reads an answer: tokens counted, a truncated, refused or empty answer raised."""
        prompt_tokens, completion_tokens, cached_tokens = self._count_tokens(body.get("usage"), kind)
        choice, message = first_choice(body, 200)
        content, finish_reason, tool_calls = answer(choice, message, 200, completion_tokens)
        model = body.get("model")
        return ChatResult(content=content, finish_reason=finish_reason, tool_calls=tool_calls,
                          model=model if isinstance(model, str) and model else self._settings.model,
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          cached_tokens=cached_tokens, latency_s=0.0)

    def _headers(self, request: ChatRequest) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self._settings.api_key.get_secret_value()}",
            "Idempotency-Key": request.idempotency_key,
        }
        if request.traceparent:
            headers["traceparent"] = request.traceparent
        return headers

    # -- response -----------------------------------------------------------------------------

    def _interpret(self, response: HTTPResponse, latency: float, kind: str | None = None) -> ChatResult:
        """Turn one HTTP response into a result, or raise the matching error."""
        raise_for_status(response)
        body = json_object(response)
        prompt_tokens, completion_tokens, cached_tokens = self._count_tokens(body.get("usage"), kind)
        choice, message = first_choice(body, response.status)
        model = body.get("model")
        content, finish_reason, tool_calls = answer(choice, message, response.status, completion_tokens)
        return ChatResult(
            tool_calls=tool_calls,
            content=content,
            finish_reason=finish_reason,
            model=model if isinstance(model, str) and model else self._settings.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            latency_s=latency,
        )

    def _count_tokens(self, usage: object, kind: str | None) -> tuple[int, int, int]:
        """Record the tokens the endpoint reports spending, and of the prompt's those it read from its
        cache (``usage.prompt_tokens_details.cached_tokens``); missing counts are zero."""
        if not isinstance(usage, dict):
            return 0, 0, 0
        prompt_tokens = token_count(usage.get("prompt_tokens"))
        completion_tokens = token_count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = min(prompt_tokens, token_count(details.get("cached_tokens"))) if isinstance(details, dict) else 0
        if prompt_tokens:
            self._metrics.tokens_in.inc(prompt_tokens)
            prompt, cached_counter = self._metrics.prompt_tokens(kind, self._endpoint)
            prompt.inc(prompt_tokens)
            if cached:
                cached_counter.inc(cached)
        if completion_tokens:
            self._metrics.tokens_out.inc(completion_tokens)
        return prompt_tokens, completion_tokens, cached

    def _count(self, outcome: str) -> None:
        child = self._metrics.llm_outcome.get(outcome)
        (child if child is not None else self._metrics.llm_requests.labels(outcome=outcome)).inc()


@functools.lru_cache(maxsize=256)
def _timeout(timeout_s: float) -> aiohttp.ClientTimeout:
    """The whole exchange within ``timeout_s``; connecting within at most 5 s of it (one frozen
    object per distinct value: most calls share the configured timeout)."""
    return aiohttp.ClientTimeout(total=timeout_s, connect=min(_MAX_CONNECT_TIMEOUT_S, timeout_s))


def _encode(payload: dict[str, Any]) -> bytes:
    """The request body: orjson where it can write the payload (about ten times faster than the
    standard library), else the standard library (integers beyond 64 bits, non-string keys)."""
    try:
        return orjson.dumps(payload)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(payload, ensure_ascii=False).encode()
