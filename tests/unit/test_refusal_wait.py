"""How long a task waits after the endpoint refused its call (a 429, an endpoint fault) before it asks
for the endpoint again: :func:`service.pipeline.calls.refusal_wait`."""

from __future__ import annotations

import random

import pytest

from service.pipeline.calls import refusal_wait

BASE, CAP = 0.05, 30.0


def draws(refused: int, *, windowed: bool, n: int = 2_000) -> list[float]:
    rng = random.Random(7)
    return [refusal_wait(None, refused, windowed=windowed, base_s=BASE, max_s=CAP, rng=rng) for _ in range(n)]


def test_a_first_refusal_on_a_windowed_endpoint_goes_straight_back_to_the_window() -> None:
    # the 429 cut the window, which paces the retry: a slot freed is the wait. A refused probe one slot
    # above the limit so costs its task no sleep, and a burst's last tasks no tail
    assert draws(1, windowed=True) == [0.0] * 2_000


def test_refusals_in_a_row_back_off_with_full_jitter_growing_per_refusal() -> None:
    for refused, windowed in ((2, True), (3, True), (1, False), (2, False)):
        got = draws(refused, windowed=windowed)
        ceiling = BASE * 2 ** (refused - (2 if windowed else 1))
        assert all(0 <= d <= ceiling for d in got), (refused, windowed, max(got))
        assert max(got) > ceiling / 2  # jitter over the whole range, not a fixed pause
    assert max(draws(20, windowed=True)) <= 1.0  # never more than a second without a Retry-After


def test_the_back_off_stays_within_backoff_max_s() -> None:
    rng = random.Random(1)
    assert all(refusal_wait(None, 9, windowed=False, base_s=0.5, max_s=0.2, rng=rng) <= 0.2 for _ in range(500))


@pytest.mark.parametrize("windowed", [True, False])
def test_a_delay_the_endpoint_asked_for_is_waited_out(windowed: bool) -> None:
    assert refusal_wait(2.5, 1, windowed=windowed, base_s=BASE, max_s=CAP, rng=random.Random(0)) == 2.5
