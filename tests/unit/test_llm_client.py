"""Unit tests for service.llm.client.LLMClient against real HTTP servers on free loopback ports.

Every test talks HTTP over a socket: an aiohttp ``RawTestServer`` whose handler returns an
``aiohttp.web`` response, a plain asyncio server that writes raw (often broken) bytes, a port
where nothing listens, or a listener whose accept queue is full. Nothing in the HTTP layer is
mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from multidict import CIMultiDict
from pydantic import SecretStr

from service.core.errors import (
    EndpointFault,
    InvalidOutput,
    LLMRateLimited,
    LLMTimeout,
    LLMUnavailable,
    PermanentError,
    RetryableError,
)
from service.core.metrics import LLM_OUTCOMES, Metrics
from service.core.settings import LLMSettings
from service.llm.client import ChatRequest, ChatResult, LLMClient
from service.llm.responses import retry_after
from service.llm.scrub import scrub

API_KEY = "sk-test-secret-key-123"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
}
SECRET_PROMPT = "classified prompt text 4711"
CHAT_PATH = "/v1/chat/completions"
TIMEOUT_S = 0.2  # the short timeout of the tests that wait for one
STALL_S = 3.0  # a handler that stalls: far past TIMEOUT_S (cancelled when the client hangs up)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def make_settings(**overrides: Any) -> LLMSettings:
    values: dict[str, Any] = {"api_key": SecretStr(API_KEY), "model": "test-model"}
    values.update(overrides)
    return LLMSettings(**values)


def make_request(**overrides: Any) -> ChatRequest:
    values: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": SECRET_PROMPT},
        ],
        "schema": SCHEMA,
        "schema_name": "answer_v1",
        "idempotency_key": "task-42:attempt",
    }
    values.update(overrides)
    return ChatRequest(**values)


def completion(
    content: str | None = '{"answer": "yes"}',
    finish_reason: str | None = "stop",
    usage: dict[str, Any] | None = None,
    message_extra: dict[str, Any] | None = None,
    model: str = "served-model",
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    message.update(message_extra or {})
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
    }
    body["usage"] = usage if usage is not None else {
        "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
    }
    return body


# -- servers --------------------------------------------------------------------------------------


async def ok_handler(request: web.BaseRequest) -> web.StreamResponse:
    return web.json_response(completion())


def status_handler(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> Handler:
    """Answer every request with ``status``: no body for None, str/bytes as is, else JSON."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if body is None:
            return web.Response(status=status, headers=headers)
        if isinstance(body, str):
            return web.Response(status=status, text=body, headers=headers)
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return handler


def slow_handler(delay_s: float, then: Handler = ok_handler) -> Handler:
    """Wait ``delay_s`` before answering like ``then``."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(delay_s)
        return await then(request)

    return handler


async def stalled_body_handler(request: web.BaseRequest) -> web.StreamResponse:
    """Send the status, the headers and the start of the body, then stall."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = 1000
    await response.prepare(request)
    await response.write(b'{"id": "chatcmpl-1", "choices": [')
    await asyncio.sleep(STALL_S)
    return response


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def capture(handler: Handler = ok_handler) -> tuple[list[Seen], Handler]:
    seen: list[Seen] = []

    async def wrapped(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        seen.append(Seen(request.method, request.path, request.query_string, CIMultiDict(request.headers), body))
        return await handler(request)

    return seen, wrapped


@contextlib.asynccontextmanager
async def http_server(handler: Handler) -> AsyncIterator[str]:
    """A real aiohttp server on a free loopback port; yields the base URL (``.../v1/``)."""
    async with RawTestServer(handler) as server:
        yield str(server.make_url("/v1/"))


@contextlib.asynccontextmanager
async def raw_server(reply: bytes, *, reset: bool = False) -> AsyncIterator[str]:
    """A plain TCP server that reads one whole request, writes ``reply`` and hangs up.

    With ``reset`` it hangs up with a TCP RST instead of a FIN.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(_content_length(head))
            writer.write(reply)
            await writer.drain()
            if reset:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1/"


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@contextlib.contextmanager
def nothing_listening() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1/"


@contextlib.contextmanager
def full_accept_queue() -> Iterator[str]:
    """A listener that never accepts and whose accept queue is full: connecting hangs."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        while True:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.settimeout(0.05)
            try:
                probe.connect(address)
            except TimeoutError:  # the kernel now drops our SYNs: the queue is full
                probe.close()
                break
            fillers.append(probe)
            assert len(fillers) < 16, "the accept queue never filled up"
        yield f"http://127.0.0.1:{address[1]}/v1/"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# -- calling --------------------------------------------------------------------------------------


async def chat_once(
    base_url: str, request: ChatRequest | None, metrics: Metrics | None, settings: dict[str, Any]
) -> ChatResult:
    async with LLMClient(make_settings(**settings), base_url, metrics or Metrics()) as client:
        return await client.chat(request or make_request())


def call(
    handler: Handler,
    request: ChatRequest | None = None,
    metrics: Metrics | None = None,
    **settings: Any,
) -> ChatResult:
    """One chat() call on a fresh client against a fresh server; raises what chat() raises."""

    async def main() -> ChatResult:
        async with http_server(handler) as base_url:
            return await chat_once(base_url, request, metrics, settings)

    return asyncio.run(main())


def call_raw(
    reply: bytes, *, reset: bool = False, metrics: Metrics | None = None, **settings: Any
) -> ChatResult:
    """One chat() call against a server that answers with the raw bytes ``reply``."""

    async def main() -> ChatResult:
        async with raw_server(reply, reset=reset) as base_url:
            return await chat_once(base_url, None, metrics, settings)

    return asyncio.run(main())


def call_url(base_url: str, metrics: Metrics | None = None, **settings: Any) -> ChatResult:
    return asyncio.run(chat_once(base_url, None, metrics, settings))


# -- metrics --------------------------------------------------------------------------------------


def requests_total(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("agent_llm_requests_total", {"outcome": outcome})
    assert value is not None
    return value


def outcome_counts(metrics: Metrics) -> dict[str, float]:
    return {outcome: requests_total(metrics, outcome) for outcome in LLM_OUTCOMES}


def assert_single_outcome(metrics: Metrics, outcome: str) -> None:
    counts = outcome_counts(metrics)
    assert counts[outcome] == 1
    assert sum(counts.values()) == 1, counts


def tokens(metrics: Metrics, direction: str) -> float:
    value = metrics.registry.get_sample_value("agent_llm_tokens_total", {"direction": direction})
    assert value is not None
    return value


def latency_count(metrics: Metrics) -> float:
    """Latency observations, over every kind and endpoint."""
    return sum(sample.value for family in metrics.registry.collect() for sample in family.samples
               if sample.name == "agent_llm_latency_seconds_count")


def test_latency_is_labelled_by_kind_and_endpoint_and_an_unknown_one_is_other() -> None:
    metrics = Metrics()
    metrics.name_models(kinds=["classify", "extract"], endpoints=["primary", "fallback-1"])

    async def main() -> None:
        async with http_server(ok_handler) as base_url:
            for endpoint, kind in (("fallback-1", "classify"), ("fallback-1", "nope"), ("elsewhere", None)):
                async with LLMClient(make_settings(), base_url, metrics, endpoint=endpoint) as client:
                    await client.chat(make_request(kind=kind))

    asyncio.run(main())
    count = "agent_llm_latency_seconds_count"
    assert metrics.registry.get_sample_value(count, {"kind": "classify", "endpoint": "fallback-1"}) == 1
    assert metrics.registry.get_sample_value(count, {"kind": "other", "endpoint": "fallback-1"}) == 1
    assert metrics.registry.get_sample_value(count, {"kind": "other", "endpoint": "other"}) == 1
    assert latency_count(metrics) == 3


# -- request shape ------------------------------------------------------------------------------


def test_json_object_body_shape() -> None:
    seen, handler = capture()
    call(handler, response_format="json_object", temperature=0.2, max_tokens=300)

    (sent,) = seen
    assert sent.method == "POST"
    assert sent.path == CHAT_PATH  # the trailing slash of the base URL is not doubled
    assert sent.query_string == ""
    assert sent.json() == {
        "model": "test-model",
        "messages": make_request().messages,
        "temperature": 0.2,
        "max_tokens": 300,
        "response_format": {"type": "json_object", "schema": SCHEMA},
    }


def test_a_step_may_name_its_own_model_and_temperature() -> None:
    seen, handler = capture()
    call(handler, make_request(model="step-model", temperature=0.0), response_format="json_object", temperature=0.7)
    assert (seen[0].json()["model"], seen[0].json()["temperature"]) == ("step-model", 0.0)


@pytest.mark.parametrize("temperature", [-0.1, 2.5, float("nan")])
def test_a_temperature_outside_0_to_2_is_refused(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        make_request(temperature=temperature)


def test_json_schema_body_shape() -> None:
    seen, handler = capture()
    call(handler, response_format="json_schema")

    assert seen[0].json()["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer_v1", "schema": SCHEMA, "strict": True},
    }


@pytest.mark.parametrize("response_format", ["json_object", "json_schema"])
def test_no_response_format_without_schema(response_format: str) -> None:
    seen, handler = capture()
    call(handler, make_request(schema=None), response_format=response_format)

    assert "response_format" not in seen[0].json()


def test_request_max_tokens_overrides_settings() -> None:
    seen, handler = capture()
    call(handler, make_request(max_tokens=64), max_tokens=512)

    assert seen[0].json()["max_tokens"] == 64


def test_non_ascii_messages_arrive_intact_as_utf8() -> None:
    messages = [{"role": "user", "content": "Grüße aus Köln ✓ — 東京"}]
    seen, handler = capture()
    call(handler, make_request(messages=messages))

    assert seen[0].json()["messages"] == messages
    assert "Grüße".encode() in seen[0].body


def test_headers() -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    seen, handler = capture()
    call(handler, make_request(traceparent=traceparent))

    headers = seen[0].headers
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert headers["idempotency-key"] == "task-42:attempt"
    assert headers["traceparent"] == traceparent
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert headers.getall("idempotency-key") == ["task-42:attempt"]


def test_no_traceparent_header_when_unset() -> None:
    seen, handler = capture()
    call(handler, make_request(traceparent=None))

    assert "traceparent" not in seen[0].headers


@pytest.mark.parametrize(
    "overrides",
    [
        {"schema_name": ""},
        {"schema_name": "has space"},
        {"schema_name": "x" * 65},
        {"idempotency_key": ""},
        {"timeout_s": 0.0},
        {"timeout_s": -1.0},
        {"timeout_s": float("nan")},
        {"timeout_s": float("inf")},
        {"max_tokens": 0},
    ],
)
def test_chat_request_rejects_invalid_fields(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_request(**overrides)


# -- per-call timeout -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_timeout", "settings_timeout"),
    [
        (TIMEOUT_S, 30.0),  # the request's own timeout wins over a longer settings one
        (None, TIMEOUT_S),  # without one, the settings timeout applies
    ],
)
def test_call_gives_up_after_its_timeout(request_timeout: float | None, settings_timeout: float) -> None:
    metrics = Metrics()
    started = time.perf_counter()
    with pytest.raises(LLMTimeout):
        call(
            slow_handler(STALL_S), make_request(timeout_s=request_timeout), metrics,
            timeout_s=settings_timeout,
        )
    elapsed = time.perf_counter() - started

    assert TIMEOUT_S * 0.9 <= elapsed < 1.5
    assert_single_outcome(metrics, "timeout")


def test_request_timeout_longer_than_settings_timeout_lets_a_slow_answer_through() -> None:
    metrics = Metrics()
    result = call(
        slow_handler(3 * TIMEOUT_S / 2), make_request(timeout_s=5.0), metrics, timeout_s=TIMEOUT_S / 2,
    )

    assert result.content == '{"answer": "yes"}'
    assert result.latency_s >= 3 * TIMEOUT_S / 2 * 0.9
    assert_single_outcome(metrics, "ok")


def test_timeout_covers_the_whole_body() -> None:
    """Headers in time but a body that stalls: the timeout still ends the call."""
    metrics = Metrics()
    started = time.perf_counter()
    with pytest.raises(LLMTimeout):
        call(stalled_body_handler, make_request(timeout_s=TIMEOUT_S), metrics)

    assert time.perf_counter() - started < 1.5
    assert_single_outcome(metrics, "timeout")


# -- success --------------------------------------------------------------------------------------


def test_success_result_and_metrics() -> None:
    metrics = Metrics()
    result = call(ok_handler, metrics=metrics)

    assert result.content == '{"answer": "yes"}'
    assert result.finish_reason == "stop"
    assert result.model == "served-model"
    assert result.prompt_tokens == 11
    assert result.completion_tokens == 7
    assert result.latency_s >= 0
    assert_single_outcome(metrics, "ok")
    assert tokens(metrics, "input") == 11
    assert tokens(metrics, "output") == 7
    assert latency_count(metrics) == 1


def test_success_without_usage_counts_no_tokens() -> None:
    body = completion()
    del body["usage"]
    del body["model"]
    metrics = Metrics()
    result = call(status_handler(200, body), metrics=metrics)

    assert (result.prompt_tokens, result.completion_tokens) == (0, 0)
    assert result.model == "test-model"
    assert tokens(metrics, "input") == 0
    assert tokens(metrics, "output") == 0
    assert_single_outcome(metrics, "ok")


def test_gzip_encoded_answer_is_decompressed() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = gzip.compress(json.dumps(completion()).encode())
        return web.Response(
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    assert call(handler).content == '{"answer": "yes"}'


def test_outcome_counted_once_per_attempt_across_calls() -> None:
    responses: Iterator[Callable[[], web.Response]] = iter(
        [
            lambda: web.json_response(completion()),
            lambda: web.json_response({"error": {"message": "busy"}}, status=503),
            lambda: web.json_response(completion()),
            lambda: web.Response(status=429),
        ]
    )

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return next(responses)()

    metrics = Metrics()

    async def main() -> None:
        async with http_server(handler) as base_url, LLMClient(make_settings(), base_url, metrics) as client:
            for _ in range(4):
                with contextlib.suppress(RetryableError):
                    await client.chat(make_request())

    asyncio.run(main())
    counts = outcome_counts(metrics)
    assert counts["ok"] == 2
    assert counts["server_error"] == 1
    assert counts["rate_limited"] == 1
    assert sum(counts.values()) == 4
    assert latency_count(metrics) == 4
    assert tokens(metrics, "input") == 22


def test_closed_client_refuses_to_chat() -> None:
    async def main() -> None:
        async with http_server(ok_handler) as base_url:
            client = LLMClient(make_settings(), base_url, Metrics())
            await client.chat(make_request())
            await client.aclose()
            await client.aclose()  # idempotent
            with pytest.raises(RuntimeError):
                await client.chat(make_request())

    asyncio.run(main())


# -- rate limiting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),
        ({}, None),
        ({"Retry-After": "whenever"}, None),
        ({"Retry-After": "-3"}, None),
        ({"Retry-After": "nan"}, None),
    ],
)
def test_rate_limited_delay(headers: dict[str, str], expected: float | None) -> None:
    metrics = Metrics()
    with pytest.raises(LLMRateLimited) as info:
        call(status_handler(429, {"error": {"message": "slow down"}}, headers), metrics=metrics)

    assert info.value.delay == expected
    assert_single_outcome(metrics, "rate_limited")
    assert latency_count(metrics) == 1


def test_rate_limited_delay_from_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    headers = {"Retry-After": format_datetime(when, usegmt=True)}
    with pytest.raises(LLMRateLimited) as info:
        call(status_handler(429, None, headers))

    assert info.value.delay is not None
    assert 25 <= info.value.delay <= 31


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    headers = CIMultiDict({"Retry-After": "Wed, 01 Jan 2025 11:59:00 GMT"})
    assert retry_after(headers, now=now) == 0.0
    headers = CIMultiDict({"Retry-After": "Wed, 01 Jan 2025 12:00:45 GMT"})
    assert retry_after(headers, now=now) == 45.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"RETRY-AFTER": "3"}, 3.0),
        ({"retry-after": "3"}, 3.0),
        ({"Retry-After-MS": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after-ms": "-5", "Retry-After": "2"}, 2.0),
        ({"Retry-After": "  4  "}, 4.0),
        ({"Retry-After": "inf"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_headers_case_insensitively(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(CIMultiDict(headers)) == expected


# -- HTTP errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
def test_retryable_statuses_are_unavailable(status: int) -> None:
    metrics = Metrics()
    with pytest.raises(LLMUnavailable) as info:
        call(status_handler(status, {"error": {"message": "try later"}}), metrics=metrics)

    assert str(status) in str(info.value)
    assert "try later" in str(info.value)
    assert info.value.delay is None
    assert_single_outcome(metrics, "server_error")
    assert latency_count(metrics) == 1


def test_unavailable_carries_retry_after() -> None:
    with pytest.raises(LLMUnavailable) as info:
        call(status_handler(503, {"error": {"message": "busy"}}, {"Retry-After": "3"}))

    assert info.value.delay == 3.0


@pytest.mark.parametrize(("status", "reason"), [(401, "auth"), (403, "auth"), (404, "not_found")])
def test_auth_and_not_found_are_endpoint_faults(status: int, reason: str) -> None:
    metrics = Metrics()
    body = {"error": {"message": "model 'nope' does not exist", "type": "invalid_request_error"}}
    with pytest.raises(EndpointFault) as info:
        call(status_handler(status, body), metrics=metrics)

    assert info.value.reason == reason
    assert not isinstance(info.value, (RetryableError, PermanentError))
    assert str(status) in str(info.value)
    assert "model 'nope' does not exist" in str(info.value)
    assert_single_outcome(metrics, "client_error")


def test_endpoint_fault_message_is_short_and_scrubbed() -> None:
    key = "sk-proj-" + "A1b2C3d4" * 6
    message = f"Incorrect API key provided: {key}. Sent: Bearer {API_KEY} " + "z" * 1000
    with pytest.raises(EndpointFault) as info:
        call(status_handler(401, {"error": {"message": message}}))

    text = str(info.value)
    assert key not in text and API_KEY not in text
    assert "Incorrect API key provided" in text and "[redacted]" in text
    assert len(text) < 250


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("sk-abcdef1234567890", "sk-abcdef1234567890"),
        ("Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
        ("api_key=hunter2hunter2", "hunter2hunter2"),
        ("token: 0123456789abcdef", "0123456789abcdef"),
        ("dGhpcyBpcyBhIHNlY3JldCB0b2tlbiB2YWx1ZTEyMw==", "dGhpcyBpcyBhIHNlY3JldCB0b2tlbiB2YWx1ZTEyMw"),
        ("0123456789abcdef0123456789abcdef01234567", "0123456789abcdef0123456789abcdef01234567"),
    ],
)
def test_scrub_removes_key_like_strings(text: str, secret: str) -> None:
    cleaned = scrub(f"error: {text} (see docs)")
    assert secret not in cleaned and "[redacted]" in cleaned
    assert cleaned.startswith("error: ") and cleaned.endswith(" (see docs)")


def test_scrub_keeps_ordinary_text() -> None:
    text = "model 'meta-llama-3.1-70b-instruct-turbo-2024-07-18' does not exist (HTTP 404)"
    assert scrub(text) == text


@pytest.mark.parametrize("status", [400, 413, 422])
def test_other_client_errors_are_permanent(status: int) -> None:
    metrics = Metrics()
    body = {"error": {"message": "model 'nope' does not exist", "type": "invalid_request_error"}}
    with pytest.raises(PermanentError) as info:
        call(status_handler(status, body), metrics=metrics)

    assert not isinstance(info.value, RetryableError)
    message = str(info.value)
    assert str(status) in message
    assert "model 'nope' does not exist" in message
    assert_single_outcome(metrics, "client_error")


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(status: int) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == CHAT_PATH:
            return web.Response(status=status, headers={"Location": "/v2/chat/completions"})
        return web.json_response(completion())

    seen, wrapped = capture(handler)
    metrics = Metrics()
    with pytest.raises(PermanentError) as info:
        call(wrapped, metrics=metrics)

    assert str(status) in str(info.value)
    assert [sent.path for sent in seen] == [CHAT_PATH]
    assert_single_outcome(metrics, "client_error")


def test_permanent_error_message_is_truncated() -> None:
    long_message = "x" * 5000
    with pytest.raises(PermanentError) as info:
        call(status_handler(400, {"error": {"message": long_message}}))

    assert "x" * 300 not in str(info.value)
    assert "x" * 200 in str(info.value)


def test_permanent_error_with_plain_text_body() -> None:
    with pytest.raises(PermanentError) as info:
        call(status_handler(400, "bad request: " + "y" * 1000))

    assert "bad request" in str(info.value)
    assert "y" * 300 not in str(info.value)


# -- response size ------------------------------------------------------------------------------

LIMIT = 4096


def _big_completion() -> dict[str, Any]:
    return completion(json.dumps({"answer": "a" * (2 * LIMIT)}))


async def _chunked_big_handler(request: web.BaseRequest) -> web.StreamResponse:
    """A body over the limit without a Content-Length: chunked, in small pieces."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    data = json.dumps(_big_completion()).encode()
    for start in range(0, len(data), 512):
        await response.write(data[start:start + 512])
    await response.write_eof()
    return response


@pytest.mark.parametrize(
    "handler",
    [status_handler(200, _big_completion()), _chunked_big_handler],
    ids=["content-length", "chunked"],
)
def test_body_over_the_limit_is_too_large(handler: Handler) -> None:
    metrics = Metrics()
    with pytest.raises(InvalidOutput) as info:
        call(handler, metrics=metrics, max_response_bytes=LIMIT)

    assert info.value.kind == "too_large"
    assert str(LIMIT) in str(info.value)
    assert_single_outcome(metrics, "invalid_output")
    assert latency_count(metrics) == 1


def test_gzip_body_is_limited_after_decompression() -> None:
    data = gzip.compress(json.dumps(_big_completion()).encode())
    assert len(data) < LIMIT
    handler = status_handler(200, data, {"Content-Encoding": "gzip", "Content-Type": "application/json"})
    with pytest.raises(InvalidOutput) as info:
        call(handler, max_response_bytes=LIMIT)

    assert info.value.kind == "too_large"


def test_body_under_the_limit_passes() -> None:
    body = completion(json.dumps({"answer": "a" * (LIMIT // 2)}))
    assert call(status_handler(200, body), max_response_bytes=LIMIT).content.startswith('{"answer"')


def test_large_error_body_is_cut_not_too_large() -> None:
    with pytest.raises(LLMUnavailable) as info:
        call(status_handler(503, "overloaded " + "q" * (4 * LIMIT)), max_response_bytes=LIMIT)

    assert "overloaded" in str(info.value)


def test_max_response_bytes_defaults_to_8_mib() -> None:
    assert LLMSettings().max_response_bytes == 8 * 1024 * 1024


# -- malformed responses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "<html>gateway says hi</html>",
        b"",
        b"\xff\xfe not utf-8",
        [],
        {"object": "chat.completion"},
        {"choices": []},
        {"choices": [{"index": 0, "finish_reason": "stop"}]},
        {"choices": [{"message": "not an object"}]},
        {"choices": [{"message": {"role": "assistant", "content": ["parts"]}}]},
    ],
)
def test_malformed_success_body_is_unavailable(body: Any) -> None:
    metrics = Metrics()
    with pytest.raises(LLMUnavailable) as info:
        call(status_handler(200, body), metrics=metrics)

    assert "malformed" in str(info.value)
    assert_single_outcome(metrics, "server_error")


# -- unusable answers ---------------------------------------------------------------------------


def test_truncated_answer() -> None:
    metrics = Metrics()
    usage = {"prompt_tokens": 20, "completion_tokens": 512}
    handler = status_handler(200, completion('{"answer": "ye', "length", usage))
    with pytest.raises(InvalidOutput) as info:
        call(handler, metrics=metrics)

    assert info.value.kind == "truncated"
    assert_single_outcome(metrics, "truncated")
    assert tokens(metrics, "input") == 20
    assert tokens(metrics, "output") == 512


@pytest.mark.parametrize(
    "body",
    [
        completion("", "content_filter"),
        completion(None, "stop", message_extra={"refusal": "I can't help with that."}),
    ],
)
def test_refused_answer(body: dict[str, Any]) -> None:
    metrics = Metrics()
    with pytest.raises(InvalidOutput) as info:
        call(status_handler(200, body), metrics=metrics)

    assert info.value.kind == "refused"
    assert_single_outcome(metrics, "refused")
    assert tokens(metrics, "input") == 11
    assert tokens(metrics, "output") == 7


def test_null_refusal_field_is_not_a_refusal() -> None:
    body = completion(message_extra={"refusal": None})
    assert call(status_handler(200, body)).content == '{"answer": "yes"}'


@pytest.mark.parametrize("content", ["", "   \n\t", None])
def test_empty_answer(content: str | None) -> None:
    metrics = Metrics()
    with pytest.raises(InvalidOutput) as info:
        call(status_handler(200, completion(content)), metrics=metrics)

    assert info.value.kind == "empty"
    assert_single_outcome(metrics, "invalid_output")


# -- transport failures -------------------------------------------------------------------------


def _timeout_before_headers(metrics: Metrics) -> ChatResult:
    return call(slow_handler(STALL_S), make_request(timeout_s=TIMEOUT_S), metrics)


def _timeout_in_body(metrics: Metrics) -> ChatResult:
    return call(stalled_body_handler, make_request(timeout_s=TIMEOUT_S), metrics)


def _timeout_connecting(metrics: Metrics) -> ChatResult:
    with full_accept_queue() as base_url:
        return call_url(base_url, metrics, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize(
    ("scenario", "cause"),
    [
        (_timeout_before_headers, TimeoutError),
        (_timeout_in_body, TimeoutError),
        (_timeout_connecting, TimeoutError),  # connect and total timeouts are equal below 5 s
    ],
    ids=["before-headers", "in-body", "connecting"],
)
def test_timeout(scenario: Callable[[Metrics], ChatResult], cause: type[BaseException]) -> None:
    metrics = Metrics()
    started = time.perf_counter()
    with pytest.raises(LLMTimeout) as info:
        scenario(metrics)

    assert time.perf_counter() - started < 1.5
    assert "unknown" in str(info.value)
    assert isinstance(info.value.__cause__, cause)
    assert info.value.delay is None
    assert_single_outcome(metrics, "timeout")
    assert latency_count(metrics) == 1
    assert tokens(metrics, "input") == 0


def _refused(metrics: Metrics) -> ChatResult:
    with nothing_listening() as base_url:
        return call_url(base_url, metrics)


def _closed_before_answering(metrics: Metrics) -> ChatResult:
    return call_raw(b"", metrics=metrics)


def _reset_before_answering(metrics: Metrics) -> ChatResult:
    return call_raw(b"", reset=True, metrics=metrics)


def _closed_mid_body(metrics: Metrics) -> ChatResult:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"choices\": ["
    return call_raw(reply, metrics=metrics)


def _closed_mid_chunked_body(metrics: Metrics) -> ChatResult:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"cho\r\n"
    return call_raw(reply, metrics=metrics)


def _dns_failure(metrics: Metrics) -> ChatResult:
    return call_url("http://nonexistent.invalid/v1/", metrics)


@pytest.mark.parametrize(
    ("scenario", "cause"),
    [(_refused, aiohttp.ClientConnectorError), (_dns_failure, aiohttp.ClientConnectorDNSError)],
    ids=["refused", "dns"],
)
def test_unreachable_endpoint_is_an_endpoint_fault(
    scenario: Callable[[Metrics], ChatResult], cause: type[BaseException]
) -> None:
    metrics = Metrics()
    with pytest.raises(EndpointFault) as info:
        scenario(metrics)

    assert info.value.reason == "unreachable"
    assert "unreachable" in str(info.value)
    assert isinstance(info.value.__cause__, cause)
    assert_single_outcome(metrics, "connection_error")
    assert latency_count(metrics) == 0


@pytest.mark.parametrize(
    ("scenario", "cause"),
    [
        (_closed_before_answering, aiohttp.ServerDisconnectedError),
        (_reset_before_answering, aiohttp.ClientOSError),
        (_closed_mid_body, aiohttp.ClientPayloadError),
        (_closed_mid_chunked_body, aiohttp.ClientPayloadError),
    ],
    ids=["closed-before-answering", "reset", "closed-mid-body", "closed-mid-chunked-body"],
)
def test_connection_errors(scenario: Callable[[Metrics], ChatResult], cause: type[BaseException]) -> None:
    metrics = Metrics()
    with pytest.raises(LLMUnavailable) as info:
        scenario(metrics)

    assert "unreachable" in str(info.value)
    assert isinstance(info.value.__cause__, cause)
    assert_single_outcome(metrics, "connection_error")
    assert latency_count(metrics) == 0
    assert tokens(metrics, "input") == 0


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc Nope\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["status-line", "status-code", "content-length", "chunk-size"],
)
def test_unreadable_response_is_unavailable(reply: bytes) -> None:
    metrics = Metrics()
    with pytest.raises(LLMUnavailable) as info:
        call_raw(reply, metrics=metrics)

    assert isinstance(info.value, RetryableError)
    assert isinstance(info.value.__cause__, aiohttp.ClientResponseError)
    assert_single_outcome(metrics, "server_error")
    assert tokens(metrics, "input") == 0


# -- concurrency ------------------------------------------------------------------------------------


def test_semaphore_limits_concurrent_calls() -> None:
    limit = 3
    active = 0
    peak = 0

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.05)
        finally:
            active -= 1
        return web.json_response(completion())

    metrics = Metrics()

    async def main() -> list[ChatResult]:
        async with (
            http_server(handler) as base_url,
            LLMClient(make_settings(max_concurrency=limit), base_url, metrics) as client,
        ):
            return await asyncio.gather(*(client.chat(make_request()) for _ in range(12)))

    results = asyncio.run(main())
    assert len(results) == 12
    assert peak == limit
    assert requests_total(metrics, "ok") == 12


@pytest.mark.parametrize(("max_concurrency", "max_open", "peak"), [(None, None, 100), (None, 40, 40), (10, None, 10)])
def test_calls_open_at_once_follow_the_caller_unless_capped(
    max_concurrency: int | None, max_open: int | None, peak: int,
) -> None:
    """No cap set: every call goes at once (the in-flight window is the bound, not a pool of 64);
    the wiring's ``max_open``, or a ``max_concurrency`` set on purpose, caps the calls and the pool alike."""
    active = 0
    seen = 0

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal active, seen
        active += 1
        seen = max(seen, active)
        try:
            await asyncio.sleep(0.2)
        finally:
            active -= 1
        return web.json_response(completion())

    async def main() -> None:
        async with (
            http_server(handler) as base_url,
            LLMClient(make_settings(max_concurrency=max_concurrency), base_url, Metrics(), max_open=max_open) as client,
        ):
            await asyncio.gather(*(client.chat(make_request()) for _ in range(100)))

    asyncio.run(main())
    assert seen == peak


def test_waiting_for_a_slot_does_not_spend_the_timeout() -> None:
    """Three calls through one slot, each answered in 0.1 s: the last waits 0.2 s for the slot,
    yet its 0.25 s timeout (and its latency) only covers its own exchange."""
    delay_s = 0.1
    metrics = Metrics()

    async def main() -> list[ChatResult]:
        async with (
            http_server(slow_handler(delay_s)) as base_url,
            LLMClient(make_settings(max_concurrency=1), base_url, metrics) as client,
        ):
            request = make_request(timeout_s=2.5 * delay_s)
            return await asyncio.gather(*(client.chat(request) for _ in range(3)))

    results = asyncio.run(main())
    assert requests_total(metrics, "ok") == 3
    assert all(delay_s * 0.9 <= result.latency_s < 2 * delay_s for result in results)


# -- logging ------------------------------------------------------------------------------------


def test_logs_never_contain_api_key_or_prompt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    call(ok_handler)
    with pytest.raises(EndpointFault):
        call(status_handler(401, {"error": {"message": "invalid key"}}))
    with pytest.raises(PermanentError):
        call(status_handler(400, {"error": {"message": "bad request"}}))
    with pytest.raises(LLMTimeout):
        call(slow_handler(STALL_S), make_request(timeout_s=TIMEOUT_S))
    with pytest.raises(EndpointFault), nothing_listening() as base_url:
        call_url(base_url)

    assert "LLM request ok" in caplog.text  # the client did log at DEBUG
    assert API_KEY not in caplog.text
    assert SECRET_PROMPT not in caplog.text
