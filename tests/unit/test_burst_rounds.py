"""``python -m benchmarks --only cold_burst --rounds N``: each way's median burst, the lowest and highest beside."""

from __future__ import annotations

from benchmarks.burst import Pass, figures, rounds_figure
from benchmarks.report import median_of


def burst(memory_s: float, seconds: float) -> Pass:
    return Pass(memory_s=memory_s, n=2000, seconds=seconds, remembered=200 if memory_s else 0, refused=0,
                peak_open=200, dead=0)


def test_the_median_burst_of_each_way_is_reported_with_the_lowest_and_highest_memory_on_ones() -> None:
    offs = [burst(0.0, 6.4), burst(0.0, 6.2), burst(0.0, 6.3)]
    ons = [burst(3600.0, 5.3), burst(3600.0, 5.0), burst(3600.0, 5.6)]
    off, on = median_of(offs, lambda p: p.rate), median_of(ons, lambda p: p.rate)
    assert (off.seconds, on.seconds) == (6.3, 5.3)
    shares = {f.name.split(",")[1].strip(): f for f in figures(400.0, "2,000 tasks", off, on)}
    assert round(shares["memory on"].value, 1) == 94.3 and shares["memory on"].status == "MISSED"
    spread = rounds_figure(400.0, offs, ons)
    assert round(spread.value, 1) == 89.3 and spread.baseline == "highest 100.0%"
    assert "memory on 94.3% / 100.0% / 89.3%" in spread.detail


def test_an_even_count_of_rounds_reports_the_lower_middle_one() -> None:
    assert median_of([burst(0.0, 6.0), burst(0.0, 5.0)], lambda p: p.rate).seconds == 6.0
