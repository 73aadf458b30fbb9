"""The liveness bound per record is computed from the settings, and the figure the docs give is it."""

from __future__ import annotations

from pathlib import Path

from service.core.settings import Settings
from service.runtime.limits import record_bound

DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"


def test_the_bound_follows_the_settings() -> None:
    base = record_bound(Settings())
    shorter = record_bound(Settings(llm={"max_wait_s": 10, "timeout_s": 5, "backoff_max_s": 1, "max_attempts": 2},
                                    ledger={"lease_ms": 2000, "max_deaths": 1}))
    assert shorter.attempt_s == 10 + 2 * 5 + 1
    assert shorter.call_s == 2 * 21
    assert shorter.record_s == 42 + (2 + 21)
    assert record_bound(Settings(), calls=3).record_s == base.record_s + 2 * base.call_s


def test_the_docs_give_the_default_bound() -> None:
    bound = record_bound(Settings())
    text = DOC.read_text()
    assert f"{bound.attempt_s:,.0f} s" in text and f"{bound.record_s:,.0f} s" in text
