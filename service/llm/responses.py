"""What an endpoint's HTTP response means: a status to an error, a body to the answer in it.

Each function raises the :mod:`service.core.errors` exception that matches what it finds; see
:mod:`service.llm.client` for the whole table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from service.core.errors import (
    AgentError,
    EndpointFault,
    InvalidOutput,
    LLMRateLimited,
    LLMUnavailable,
    PermanentError,
)
from service.llm.scrub import scrub

_MAX_ERROR_CHARS = 300
_MAX_FAULT_CHARS = 160


@dataclass(frozen=True, slots=True)
class HTTPResponse:
    """What came back on the wire: the status, the headers and the whole body."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes

    def json(self) -> Any:
        """The body as JSON: orjson for speed; what it refuses (NaN, integers beyond 64 bits) is read
        by the standard library, so the two accept exactly the same bodies."""
        try:
            return orjson.loads(self.body)
        except ValueError:
            return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def raise_for_status(response: HTTPResponse) -> None:
    """Raise the error a non-2xx status means: the endpoint's (429, auth, not found) or the task's."""
    status = response.status
    if status == 429:
        delay = retry_after(response.headers)
        raise LLMRateLimited("LLM endpoint rate-limited the request (HTTP 429)", delay=delay)
    if status in (408, 409) or status >= 500:
        raise LLMUnavailable(
            f"LLM endpoint failed (HTTP {status}): {_error_message(response)}",
            delay=retry_after(response.headers),
        )
    if status in (401, 403):
        raise EndpointFault(
            "auth",
            f"LLM endpoint rejected the credentials (HTTP {status}): "
            f"{_error_message(response, _MAX_FAULT_CHARS)}",
        )
    if status == 404:
        raise EndpointFault(
            "not_found",
            f"LLM endpoint or model not found (HTTP 404): "
            f"{_error_message(response, _MAX_FAULT_CHARS)}",
        )
    if not 200 <= status < 300:
        raise PermanentError(
            f"LLM endpoint refused the request (HTTP {status}): {_error_message(response)}"
        )


def json_object(response: HTTPResponse) -> dict[str, Any]:
    """The body of a 2xx response, which must be a JSON object."""
    status = response.status
    try:
        body = response.json()
    except ValueError as exc:
        raise LLMUnavailable(
            f"malformed LLM response (HTTP {status}): body is not JSON"
        ) from exc
    if not isinstance(body, dict):
        raise LLMUnavailable(f"malformed LLM response (HTTP {status}): body is not an object")
    return body


def first_choice(body: Mapping[str, Any], status: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``choices[0]`` and its ``message``."""
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(message, dict):
        raise LLMUnavailable(
            f"malformed LLM response (HTTP {status}): missing choices[0].message"
        )
    return choice, message


def answer(choice: Mapping[str, Any], message: Mapping[str, Any], status: int,
           completion_tokens: int) -> tuple[str, str, tuple[dict[str, str], ...]]:
    """The content, finish reason and tool calls of a whole answer; a truncated, refused or empty
    one is :class:`InvalidOutput`, and so is a tool call that is not ``{id, function: {name,
    arguments}}`` (a call's arguments are the caller's to check: it answers the model)."""
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise LLMUnavailable(
            f"malformed LLM response (HTTP {status}): message content is not a string"
        )
    raw_reason = choice.get("finish_reason")
    finish_reason = raw_reason if isinstance(raw_reason, str) and raw_reason else "unknown"
    if finish_reason == "length":
        raise InvalidOutput(
            "truncated",
            f"LLM answer truncated at {completion_tokens} completion tokens "
            "(finish_reason=length)",
        )
    if finish_reason == "content_filter" or message.get("refusal"):
        raise InvalidOutput("refused", f"LLM refused to answer (finish_reason={finish_reason})")
    calls = tool_calls(message.get("tool_calls"))
    if calls:
        return content or "", finish_reason, calls
    if content is None or not content.strip():
        raise InvalidOutput("empty", f"LLM answer is empty (finish_reason={finish_reason})")
    return content, finish_reason, ()


def tool_calls(raw: Any) -> tuple[dict[str, str], ...]:
    """The tool calls of an answer as ``{"id", "name", "arguments"}``; none for a missing or empty list."""
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list):
        raise InvalidOutput("schema", "tool_calls is not a list")
    calls: list[dict[str, str]] = []
    for index, item in enumerate(raw):
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            raise InvalidOutput("schema", f"tool_calls[{index}] has no function")
        name, arguments, call_id = function.get("name"), function.get("arguments"), item.get("id")
        if isinstance(arguments, dict):  # some servers send the object itself
            arguments = json.dumps(arguments, separators=(",", ":"))
        if not isinstance(name, str) or not name or not isinstance(arguments, str):
            raise InvalidOutput("schema", f"tool_calls[{index}] needs a function name and arguments")
        call_id = call_id[:100] if isinstance(call_id, str) and call_id else ""
        if not call_id or any(c["id"] == call_id for c in calls):  # each result must answer one call
            call_id = f"call-{index}"
        calls.append({"id": call_id, "name": name[:100], "arguments": arguments})
    return tuple(calls)


def retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds the endpoint asks us to wait, or None when it does not say (or says nonsense).

    ``retry-after-ms`` (milliseconds) wins over ``Retry-After``, which is either a number of
    seconds or an HTTP-date. ``headers`` must look names up case-insensitively, as every HTTP
    library's header map does.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000.0

    header = headers.get("retry-after")
    if header is None:
        return None
    header = header.strip()
    try:
        value = float(header)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def token_count(value: object) -> int:
    """A token count as reported, or 0 when it is not a count."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def _error_message(response: HTTPResponse, limit: int = _MAX_ERROR_CHARS) -> str:
    """The endpoint's own error message, scrubbed of anything key-like, at most ``limit`` characters."""
    text = response.text
    message: object = text
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            message = error
    rendered = message if isinstance(message, str) else str(message)
    rendered = scrub(" ".join(rendered.split()))
    if len(rendered) > limit:
        rendered = rendered[: limit - 3] + "..."
    return rendered or "(no error message)"


def outcome_of(exc: AgentError) -> str:
    """The ``agent_llm_requests`` outcome label for an error raised from a response."""
    if isinstance(exc, EndpointFault):
        return "connection_error" if exc.reason == "unreachable" else "client_error"
    if isinstance(exc, LLMRateLimited):
        return "rate_limited"
    if isinstance(exc, LLMUnavailable):
        return "server_error"
    if isinstance(exc, PermanentError):
        return "client_error"
    if isinstance(exc, InvalidOutput):
        if exc.kind in ("truncated", "refused"):
            return exc.kind
        return "invalid_output"
    return "server_error"
