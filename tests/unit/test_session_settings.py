"""``AGENT_SESSIONS__STALL_S`` is longer than a waiting head's poll and than a lease: a shorter stall
would let a waiter pass over a live head between two of its polls, or a holder's redelivery still
waiting out its old lease."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.core.sessions_settings import SessionsSettings
from service.core.settings import Settings


@pytest.mark.parametrize("stall_s", [0.0, -1.0, 0.5, 0.2])
def test_a_stall_not_longer_than_the_poll_is_refused(stall_s: float) -> None:
    with pytest.raises(ValidationError, match="stall_s"):
        SessionsSettings(poll_s=0.5, stall_s=stall_s)


def test_a_stall_not_longer_than_the_lease_is_refused() -> None:
    with pytest.raises(ValidationError, match="stall_s"):
        Settings(ledger={"lease_ms": 30_000}, sessions={"stall_s": 30.0})
    with pytest.raises(ValidationError, match="stall_s"):
        Settings(ledger={"lease_ms": 200_000})  # the default stall (120 s) is shorter


def test_a_stall_longer_than_the_poll_and_the_lease_is_taken() -> None:
    assert SessionsSettings(poll_s=0.2, stall_s=0.3).stall_s == 0.3
    settings = Settings(ledger={"lease_ms": 2000}, sessions={"poll_s": 0.2, "stall_s": 2.5})
    assert (settings.sessions.stall_s, settings.ledger.lease_ms) == (2.5, 2000)
    assert Settings().sessions.stall_s == 120.0
