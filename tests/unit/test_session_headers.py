"""Hostile ``agent.session`` headers (docs/SESSIONS.md, "Naming a session"): a record whose headers
name two sessions is the dead letter ``schema`` whichever comes first, never a guess; the same
session named twice (a producer that sets the header again on a retry) is that session."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.agents.tasks import decode_task
from service.core.errors import PoisonError


def _value(**extra: Any) -> bytes:
    return json.dumps({"task_id": "t-1", "kind": "chat", "input": {"text": "hi"}, **extra}).encode()


@pytest.mark.parametrize("headers", [
    [("agent.session", b"s-1"), ("agent.session", b"s-2")],
    [("agent.session", b"s-2"), ("agent.session", b"s-1")],
    [("agent.session", b"s-1"), ("traceparent", b"x"), ("agent.session", b"s-1"), ("agent.session", b"s-2")],
])
@pytest.mark.parametrize("field", [None, "s-1"])
def test_two_headers_naming_different_sessions_are_schema(headers: list[tuple[str, bytes]],
                                                          field: str | None) -> None:
    value = _value(session=field) if field else _value()
    with pytest.raises(PoisonError) as caught:
        decode_task(value, headers, 10_000)
    assert caught.value.reason == "schema"
    assert "different sessions" in str(caught.value)


@pytest.mark.parametrize("second", [b"s-2", b"a b", b"\xff", b"x" * 5000])
def test_a_second_header_is_checked_like_the_first(second: bytes) -> None:
    with pytest.raises(PoisonError) as caught:
        decode_task(_value(), [("agent.session", b"s-1"), ("agent.session", second)], 10_000)
    assert caught.value.reason == "schema"


def test_the_same_session_named_twice_is_that_session() -> None:
    twice = [("agent.session", b"s-1"), ("agent.session", b"s-1")]
    assert decode_task(_value(), twice, 10_000).session == "s-1"
    assert decode_task(_value(session="s-1"), twice, 10_000).session == "s-1"
    assert decode_task(_value(), [("agent.session", b"s-1"), ("agent.session", None)], 10_000).session == "s-1"  # type: ignore[list-item]
    with pytest.raises(PoisonError, match="different sessions"):
        decode_task(_value(session="s-2"), twice, 10_000)
