"""Unit tests for service.llm.LLMClient against an in-process httpx.MockTransport."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from service.errors import (
    InvalidOutput,
    LLMRateLimited,
    LLMTimeout,
    LLMUnavailable,
    PermanentError,
    RetryableError,
)
from service.llm import ChatRequest, ChatResult, LLMClient, retry_after
from service.metrics import LLM_OUTCOMES, Metrics
from service.settings import LLMSettings

BASE_URL = "http://llm.test/v1/"
API_KEY = "sk-test-secret-key-123"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
}
SECRET_PROMPT = "classified prompt text 4711"

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


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


def ok_handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=completion())


def call(
    handler: Handler,
    request: ChatRequest | None = None,
    metrics: Metrics | None = None,
    **settings: Any,
) -> ChatResult:
    """One chat() call on a fresh client; raises what chat() raises."""

    async def main() -> ChatResult:
        async with LLMClient(
            make_settings(**settings), BASE_URL, metrics or Metrics(),
            transport=httpx.MockTransport(handler),
        ) as client:
            return await client.chat(request or make_request())

    return asyncio.run(main())


def capture(handler: Handler = ok_handler) -> tuple[list[httpx.Request], Handler]:
    seen: list[httpx.Request] = []

    def wrapped(request: httpx.Request) -> httpx.Response | Awaitable[httpx.Response]:
        seen.append(request)
        return handler(request)

    return seen, wrapped


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
    value = metrics.registry.get_sample_value("agent_llm_latency_seconds_count")
    assert value is not None
    return value


def status_handler(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str | bytes):
            return httpx.Response(status, content=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raising_handler(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


# -- request shape ------------------------------------------------------------------------------


def test_json_object_body_shape() -> None:
    seen, handler = capture()
    call(handler, response_format="json_object", temperature=0.2, max_tokens=300)

    (sent,) = seen
    assert sent.method == "POST"
    assert str(sent.url) == "http://llm.test/v1/chat/completions"
    body = json.loads(sent.content)
    assert body == {
        "model": "test-model",
        "messages": make_request().messages,
        "temperature": 0.2,
        "max_tokens": 300,
        "response_format": {"type": "json_object", "schema": SCHEMA},
    }


def test_json_schema_body_shape() -> None:
    seen, handler = capture()
    call(handler, response_format="json_schema")

    body = json.loads(seen[0].content)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer_v1", "schema": SCHEMA, "strict": True},
    }


@pytest.mark.parametrize("response_format", ["json_object", "json_schema"])
def test_no_response_format_without_schema(response_format: str) -> None:
    seen, handler = capture()
    call(handler, make_request(schema=None), response_format=response_format)

    assert "response_format" not in json.loads(seen[0].content)


def test_request_max_tokens_overrides_settings() -> None:
    seen, handler = capture()
    call(handler, make_request(max_tokens=64), max_tokens=512)

    assert json.loads(seen[0].content)["max_tokens"] == 64


def test_headers() -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    seen, handler = capture()
    call(handler, make_request(traceparent=traceparent))

    headers = seen[0].headers
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert headers["idempotency-key"] == "task-42:attempt"
    assert headers["traceparent"] == traceparent
    assert headers["content-type"] == "application/json"


def test_no_traceparent_header_when_unset() -> None:
    seen, handler = capture()
    call(handler, make_request(traceparent=None))

    assert "traceparent" not in seen[0].headers


@pytest.mark.parametrize(
    ("request_timeout", "settings_timeout", "expected_read", "expected_connect"),
    [
        (None, 30.0, 30.0, 5.0),
        (2.0, 30.0, 2.0, 2.0),
        (20.0, 1.0, 20.0, 5.0),
        (None, 0.5, 0.5, 0.5),
    ],
)
def test_per_call_timeout(
    request_timeout: float | None,
    settings_timeout: float,
    expected_read: float,
    expected_connect: float,
) -> None:
    seen, handler = capture()
    call(handler, make_request(timeout_s=request_timeout), timeout_s=settings_timeout)

    timeout = seen[0].extensions["timeout"]
    assert timeout["read"] == expected_read
    assert timeout["write"] == expected_read
    assert timeout["pool"] == expected_read
    assert timeout["connect"] == expected_connect


@pytest.mark.parametrize(
    "overrides",
    [
        {"schema_name": ""},
        {"schema_name": "has space"},
        {"schema_name": "x" * 65},
        {"idempotency_key": ""},
        {"timeout_s": 0.0},
        {"timeout_s": -1.0},
        {"max_tokens": 0},
    ],
)
def test_chat_request_rejects_invalid_fields(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_request(**overrides)


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


def test_outcome_counted_once_per_attempt_across_calls() -> None:
    responses = iter(
        [
            httpx.Response(200, json=completion()),
            httpx.Response(503, json={"error": {"message": "busy"}}),
            httpx.Response(200, json=completion()),
            httpx.Response(429),
        ]
    )
    metrics = Metrics()

    async def main() -> None:
        async with LLMClient(
            make_settings(), BASE_URL, metrics,
            transport=httpx.MockTransport(lambda request: next(responses)),
        ) as client:
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


# -- rate limiting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
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
    headers = httpx.Headers({"Retry-After": "Wed, 01 Jan 2025 11:59:00 GMT"})
    assert retry_after(headers, now=now) == 0.0
    headers = httpx.Headers({"Retry-After": "Wed, 01 Jan 2025 12:00:45 GMT"})
    assert retry_after(headers, now=now) == 45.0


# -- HTTP errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
def test_retryable_statuses_are_unavailable(status: int) -> None:
    metrics = Metrics()
    with pytest.raises(LLMUnavailable) as info:
        call(status_handler(status, {"error": {"message": "try later"}}), metrics=metrics)

    assert str(status) in str(info.value)
    assert_single_outcome(metrics, "server_error")
    assert latency_count(metrics) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
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


# -- malformed responses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "<html>gateway says hi</html>",
        b"",
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


@pytest.mark.parametrize(
    "exc_type", [httpx.ReadTimeout, httpx.ConnectTimeout, httpx.WriteTimeout, httpx.PoolTimeout]
)
def test_timeout(exc_type: type[httpx.TimeoutException]) -> None:
    metrics = Metrics()
    with pytest.raises(LLMTimeout) as info:
        call(raising_handler(exc_type), metrics=metrics)

    assert "unknown" in str(info.value)
    assert isinstance(info.value.__cause__, exc_type)
    assert info.value.delay is None
    assert_single_outcome(metrics, "timeout")
    assert latency_count(metrics) == 1


@pytest.mark.parametrize(
    "exc_type", [httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError]
)
def test_connection_errors(exc_type: type[httpx.TransportError]) -> None:
    metrics = Metrics()
    with pytest.raises(LLMUnavailable) as info:
        call(raising_handler(exc_type), metrics=metrics)

    assert isinstance(info.value.__cause__, exc_type)
    assert_single_outcome(metrics, "connection_error")
    assert latency_count(metrics) == 0
    assert tokens(metrics, "input") == 0


# -- concurrency ------------------------------------------------------------------------------------


def test_semaphore_limits_concurrent_calls() -> None:
    limit = 3
    active = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.02)
        finally:
            active -= 1
        return httpx.Response(200, json=completion())

    metrics = Metrics()

    async def main() -> list[ChatResult]:
        async with LLMClient(
            make_settings(max_concurrency=limit), BASE_URL, metrics,
            transport=httpx.MockTransport(handler),
        ) as client:
            return await asyncio.gather(*(client.chat(make_request()) for _ in range(12)))

    results = asyncio.run(main())
    assert len(results) == 12
    assert peak == limit
    assert requests_total(metrics, "ok") == 12


# -- logging ------------------------------------------------------------------------------------


def test_logs_never_contain_api_key_or_prompt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    call(ok_handler)
    with pytest.raises(PermanentError):
        call(status_handler(401, {"error": {"message": "invalid key"}}))
    with pytest.raises(LLMTimeout):
        call(raising_handler(httpx.ReadTimeout))

    assert API_KEY not in caplog.text
    assert SECRET_PROMPT not in caplog.text
