"""What the fake model server saw and did: requests, answers, faults and refusals, per
Idempotency-Key and per task step, and the last body each key sent."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any


class Statistics:
    """The counts of one period: since the server started or was last reset (a reset starts a new
    one). It holds no lock: :class:`~service.devtools.fakellm.server.FakeLLM` changes and reads it
    under its own."""

    def __init__(self, open_now: int = 0) -> None:
        self.requests = 0
        self.completions = 0
        self.valid_completions = 0
        self.replayed = 0
        self.bad_requests = 0
        self.over_concurrency = 0
        self.faults: Counter[str] = Counter()
        self.by_key: Counter[str] = Counter()
        self.completions_by_key: Counter[str] = Counter()
        self.refused_by_key: Counter[str] = Counter()  # 429s: refused before any model work
        self.tool_calls_by_name: Counter[str] = Counter()
        self.bodies: dict[str, bytes] = {}  # the last body of each Idempotency-Key
        self.peak_open = open_now

    def opened(self, open_now: int) -> None:
        """A chat request is being answered, ``open_now`` with it."""
        self.peak_open = max(self.peak_open, open_now)

    def snapshot(self, open_now: int) -> dict[str, Any]:
        """The counts as :meth:`FakeLLM.stats` reports them, ``open_now`` requests being answered."""
        return {
            "requests": self.requests,
            "completions": self.completions,
            "valid_completions": self.valid_completions,
            "replayed": self.replayed,
            "bad_requests": self.bad_requests,
            "faults": dict(self.faults),
            "by_key": dict(self.by_key),
            "completions_by_key": dict(self.completions_by_key),
            "by_step": _per_step(self.by_key),
            "completions_by_step": _per_step(self.completions_by_key),
            "tool_calls": self.tool_calls_by_name.total(),
            "tool_calls_by_name": dict(self.tool_calls_by_name),
            "open": open_now,
            "peak_open": self.peak_open,
            "over_concurrency": self.over_concurrency,
            "refused_by_key": dict(self.refused_by_key),
        }

    def last_request(self, key: str) -> dict[str, Any] | None:
        """The body of the last request with Idempotency-Key ``key``, or of the last attempt of the
        task step ``key`` (``key:<attempt>``); None if there was none."""
        body = self.bodies.get(key)
        if body is None:
            attempts = [k for k in self.bodies if _step_of(k) == key]
            body = self.bodies[max(attempts, key=_attempt_of)] if attempts else None
        return json.loads(body) if body is not None else None

    def calls_for(self, key_substring: str) -> int:
        """Requests whose Idempotency-Key contains ``key_substring``."""
        return sum(n for key, n in self.by_key.items() if key_substring in key)


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
