"""How the benchmarks watch a child service: how often they scrape its ``/metrics`` (finely until the
first record, coarsely after), and whose clock times it (its own)."""

from __future__ import annotations

from benchmarks.child import Watch, read_counts, scrape_interval


def test_it_scrapes_finely_until_the_first_record_and_coarsely_after() -> None:
    assert scrape_interval(False, fine_s=0.05, coarse_s=0.25) == 0.05  # the first record: when the meters start
    assert scrape_interval(True, fine_s=0.05, coarse_s=0.25) == 0.25  # the end: the service clocks it itself


def test_without_a_coarse_interval_it_always_scrapes_finely() -> None:
    assert scrape_interval(True, fine_s=0.1, coarse_s=None) == 0.1


def test_the_time_taken_is_the_services_own_from_its_first_record_to_its_last_finish() -> None:
    one = read_counts(
        "# HELP agent_tasks_total Tasks finished, by outcome.\n"
        'agent_tasks_total{outcome="duplicate"} 20000.0\n'
        "agent_messages_consumed_total 20000.0\n"
        "agent_first_record_timestamp_seconds 1000.25\n"
        "agent_last_finish_timestamp_seconds 1000.5\n")
    assert (one["duplicate"], one["consumed"], one["first_at"], one["last_at"]) == (20_000, 20_000, 1000.25, 1000.5)
    # scraped 0.2 s after the first record and 0.3 s after the last finish: the scrapes do not count
    watch = Watch(started=0.0, first=5.2, done=5.75, counts=one)
    assert watch.processing_s == 0.25
    # several workers: the earliest first record of those that read one
    workers = read_counts('agent_first_record_timestamp_seconds{pid="7"} 1000.5\n'
                          'agent_first_record_timestamp_seconds{pid="8"} 1000.25\n'
                          'agent_first_record_timestamp_seconds{pid="9"} 0.0\n'
                          "agent_last_finish_timestamp_seconds 1001.0\n")
    assert (workers["first_at"], workers["last_at"]) == (1000.25, 1001.0)


def test_a_service_that_does_not_say_is_timed_by_the_scrapes_that_saw_it() -> None:
    silent = read_counts('agent_tasks_total{outcome="succeeded"} 10.0\n')
    assert (silent["first_at"], silent["last_at"]) == (0.0, 0.0)
    assert Watch(started=0.0, first=5.0, done=5.5, counts=silent).processing_s == 0.5
