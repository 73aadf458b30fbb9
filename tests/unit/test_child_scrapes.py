"""How often the benchmarks scrape a child service's ``/metrics``: finely where the wall time is read (the
first record, the last outcome), coarsely in between, so the scrapes cost the measured service little."""

from __future__ import annotations

from benchmarks.child import scrape_interval


def test_it_scrapes_finely_until_the_first_record_and_near_the_end() -> None:
    assert scrape_interval(None, 0, 10_000, fine_s=0.05, coarse_s=0.25) == 0.05  # before the first record
    assert scrape_interval(1.0, 1_500, 10_000, fine_s=0.05, coarse_s=0.25) == 0.25  # 5.7 s left at 1,500/s
    assert scrape_interval(6.0, 9_000, 10_000, fine_s=0.05, coarse_s=0.25) == 0.05  # 0.7 s left: within 3 scrapes
    assert scrape_interval(1.0, 0, 10_000, fine_s=0.05, coarse_s=0.25) == 0.05  # no rate known yet


def test_without_a_coarse_interval_it_always_scrapes_finely() -> None:
    assert scrape_interval(1.0, 1_500, 10_000, fine_s=0.1, coarse_s=None) == 0.1
