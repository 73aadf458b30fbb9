"""A schedule's slots, fire times, task events and catch-up, computed alike by every replica
(docs/SCHEDULES.md): interval slots on the epoch's grid, cron read in a zone across DST changes,
a deterministic jitter, every catch-up policy, a year of downtime counted rather than iterated,
and every declaration the service refuses at start, named by schedule and field."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from dedup.keys import TASK_KEY_PATTERN
from service.agents.tasks import TaskEvent
from service.core import schedule_spec
from service.core.schedule_spec import COUNT_CAP, ScheduleSpec, due, parse_slot, select, slot_text, to_ms
from service.core.settings import Settings, to_env

T = datetime(2026, 12, 6, 2, 0, tzinfo=UTC)


def spec(**fields: Any) -> ScheduleSpec:
    data: dict[str, Any] = {"name": "nightly-report", "kind": "summarize", "every_s": 60}
    data.update(fields)
    if "cron" in fields and "every_s" not in fields:
        data.pop("every_s")
    return ScheduleSpec.model_validate(data)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- slots ---------------------------------------------------------------------------------------

def test_interval_slots_are_multiples_of_the_period_since_the_epoch() -> None:
    hourly = spec(every_s=3600)
    slots = hourly.slots_between(utc("2026-12-06T10:17:03.250"), utc("2026-12-06T13:00:00"), 10)
    assert slots == [utc("2026-12-06T11:00"), utc("2026-12-06T12:00"), utc("2026-12-06T13:00")]
    odd = spec(every_s=7)
    slots = odd.slots_between(T, T + timedelta(minutes=5), 1000)
    assert slots and all(to_ms(s) % 7000 == 0 for s in slots)
    assert [b - a for a, b in zip(slots, slots[1:], strict=False)] == [timedelta(seconds=7)] * (len(slots) - 1)
    assert odd.count_between(T, T + timedelta(minutes=5)) == len(slots)
    assert odd.slots_between(T, T + timedelta(minutes=5), 3) == slots[-3:]  # the newest when more
    assert odd.slots_between(T, T, 10) == [] and odd.count_between(T, T - timedelta(1)) == 0
    assert odd.slots_between(T, T + timedelta(minutes=5), 0) == []
    assert hourly.period_s() == 3600


def test_an_interval_slot_is_after_the_start_and_up_to_the_end() -> None:
    minute = spec(every_s=60)
    assert minute.slots_between(T, T + timedelta(seconds=60), 5) == [T + timedelta(seconds=60)]
    assert minute.count_between(T - timedelta(microseconds=1), T) == 1


PARIS = "Europe/Paris"  # 2026: summer time from 29 March 02:00 (to 03:00), back on 25 October 03:00 (to 02:00)


def test_cron_in_a_zone_across_the_spring_change_fires_the_skipped_time_after_the_gap() -> None:
    daily = spec(cron="30 2 * * *", timezone=PARIS)
    slots = daily.slots_between(utc("2026-03-27T12:00"), utc("2026-03-31T12:00"), 10)
    # 02:30 CET, then 02:30 does not exist on the 29th: it fires at 03:00 CEST, then 02:30 CEST
    assert slots == [utc("2026-03-28T01:30"), utc("2026-03-29T01:00"), utc("2026-03-30T00:30"),
                     utc("2026-03-31T00:30")]
    assert daily.count_between(utc("2026-03-27T12:00"), utc("2026-03-31T12:00")) == 4


def test_cron_in_a_zone_across_the_autumn_change_fires_a_repeated_time_once() -> None:
    daily = spec(cron="30 2 * * *", timezone=PARIS)
    slots = daily.slots_between(utc("2026-10-23T12:00"), utc("2026-10-27T12:00"), 10)
    assert slots == [utc("2026-10-24T00:30"), utc("2026-10-25T00:30"), utc("2026-10-26T01:30"),
                     utc("2026-10-27T01:30")]
    hourly = spec(cron="0 * * * *", timezone=PARIS)  # no fixed hour: real time, 25 hours that day
    day = hourly.slots_between(utc("2026-10-24T22:00"), utc("2026-10-25T23:00"), 100)
    assert len(day) == 25 and len(set(day)) == 25
    assert daily.period_s(utc("2026-10-24T12:00")) == 25 * 3600  # the gap after the given time
    assert daily.period_s(utc("2026-03-28T12:00")) == 23 * 3600 + 1800  # 03:00 CEST on the 29th to 02:30 CEST on the 30th


@pytest.mark.parametrize(("cron", "zone"), [("30 2 * * *", PARIS), ("0 * * * *", PARIS), ("*/20 1-3 * * *", PARIS),
                                            ("15 9 * * 1-5", "America/New_York"), ("0 0 1 * *", "UTC")])
def test_cron_slots_listed_backwards_agree_with_counting_forwards(cron: str, zone: str) -> None:
    s = spec(cron=cron, timezone=zone)
    for start, end in [("2026-03-20", "2026-04-05"), ("2026-10-20", "2026-11-05"), ("2026-01-01", "2026-03-01")]:
        after, until = utc(start + "T00:00"), utc(end + "T00:00")
        slots = s.slots_between(after, until, 100_000)
        assert slots == sorted(set(slots)) and all(after < x <= until for x in slots)
        assert s.count_between(after, until) == len(slots)
        assert s.slots_between(after, until, 3) == slots[-3:]


def test_a_cron_slot_at_the_end_is_included_and_at_the_start_excluded() -> None:
    hourly = spec(cron="0 * * * *")
    assert hourly.slots_between(T, T + timedelta(hours=1), 5) == [T + timedelta(hours=1)]
    assert hourly.slots_between(T, T + timedelta(hours=1, microseconds=500), 5) == [T + timedelta(hours=1)]
    assert hourly.count_between(T - timedelta(microseconds=1), T) == 1
    assert hourly.next_slot(T) == T + timedelta(hours=1) == spec(every_s=3600).next_slot(T)
    assert hourly.next_slot(T - timedelta(microseconds=1)) == T == spec(every_s=3600).next_slot(T - timedelta(seconds=1))
    assert spec(cron="30 2 * * *", timezone=PARIS).next_slot(utc("2026-03-28T12:00")) == utc("2026-03-29T01:00")


def test_slot_text_is_utc_to_the_second_and_the_task_id_a_valid_task_key() -> None:
    s = spec(cron="0 3 * * *", timezone=PARIS)
    assert slot_text(T) == "2026-12-06T02:00:00Z" and parse_slot("2026-12-06T02:00:00Z") == T
    assert s.task_id(T) == "nightly-report@2026-12-06T02:00:00Z"
    assert re.fullmatch(TASK_KEY_PATTERN, s.task_id(T))
    assert re.fullmatch(TASK_KEY_PATTERN, spec(name="a" * 64).task_id(T))


# --- jitter --------------------------------------------------------------------------------------

def test_jitter_is_sha256_of_the_task_id_in_ms_the_same_for_every_replica() -> None:
    one, other = spec(every_s=3600, jitter_s=300), spec(every_s=3600, jitter_s=300)
    expected = int.from_bytes(hashlib.sha256(b"nightly-report@2026-12-06T02:00:00Z").digest(), "big") % 300_001
    assert one.fire_time(T) == other.fire_time(T) == T + timedelta(milliseconds=expected)
    assert spec(every_s=3600).fire_time(T) == T  # no jitter
    assert spec(every_s=3600, jitter_s=300, name="other").fire_time(T) != one.fire_time(T)


def test_jitter_stays_within_its_bound_and_spreads() -> None:
    s = spec(every_s=60, jitter_s=30)
    slots = s.slots_between(T, T + timedelta(hours=20), 1000)
    delays = [(s.fire_time(x) - x) / timedelta(milliseconds=1) for x in slots]
    assert all(0 <= d <= 30_000 and d == int(d) for d in delays)
    assert len(set(delays)) > 900  # spread, not one delay for all
    assert min(delays) < 5_000 and max(delays) > 25_000


def test_a_jitter_just_below_the_period_never_reaches_the_next_slot() -> None:
    s = spec(every_s=1, jitter_s=0.9996)
    slots = s.slots_between(T, T + timedelta(hours=1), 4000)
    assert max((s.fire_time(x) - x) / timedelta(milliseconds=1) for x in slots) <= 999


# --- the task --------------------------------------------------------------------------------------

def test_the_task_event_carries_the_id_kind_rendered_input_and_a_deadline() -> None:
    s = spec(every_s=3600, jitter_s=120, tenant="acme", priority="batch", deadline_s=600,
             input={"text": "Summarise the day before {slot_date}", "max_words": 120,
                    "meta": {"at": ["{slot}", "{slot_ms}", "{{literal}}"], "by": "{schedule}", "on": True}})
    fire = s.fire_time(T)
    event = json.loads(s.task_value(T, T))
    assert event == {
        "task_id": "nightly-report@2026-12-06T02:00:00Z", "kind": "summarize", "tenant": "acme", "priority": "batch",
        "input": {"text": "Summarise the day before 2026-12-06", "max_words": 120,
                  "meta": {"at": ["2026-12-06T02:00:00Z", str(to_ms(T)), "{literal}"], "by": "nightly-report",
                           "on": True}},
        "deadline": event["deadline"]}
    parsed = TaskEvent.model_validate_json(s.task_value(T, T))
    assert parsed.deadline == fire + timedelta(seconds=600)
    late = TaskEvent.model_validate_json(s.task_value(T, T + timedelta(hours=5)))  # caught up: from now
    assert late.deadline == T + timedelta(hours=5, seconds=600)
    assert s.task_value(T, T) == s.task_value(T, T)  # the same bytes each time
    assert s.render(T) == event["input"] and s.input["meta"]["at"][0] == "{slot}"  # the declaration is kept


def test_defaults_the_deadline_is_the_period_at_most_a_day_and_the_grace_at_most_a_minute() -> None:
    bare = json.loads(spec(every_s=3600).task_value(T, T))
    assert "tenant" not in bare and bare["priority"] == "interactive"
    assert TaskEvent.model_validate(bare).deadline == T + timedelta(hours=1)
    assert spec(every_s=3 * 86_400).effective_deadline_s == 86_400
    assert spec(every_s=30).effective_grace_s == 30 and spec(every_s=3600).effective_grace_s == 60
    assert spec(every_s=3600, grace_s=0).effective_grace_s == 0
    assert spec(cron="*/5 * * * *").effective_grace_s == 60 and spec(cron="*/5 * * * *").effective_deadline_s == 300


def test_slot_date_is_the_date_in_the_schedules_zone() -> None:
    evening = spec(cron="0 18 * * *", timezone="America/Los_Angeles", input={"day": "{slot_date}", "at": "{slot}"})
    slot = utc("2026-12-06T02:00")  # 18:00 on the 5th in Los Angeles
    assert evening.render(slot) == {"day": "2026-12-05", "at": "2026-12-06T02:00:00Z"}


# --- catch-up ----------------------------------------------------------------------------------------

def grid(*minutes: int) -> list[datetime]:
    return [T + timedelta(minutes=m) for m in minutes]


DUE = grid(-5, -4, -3, -2, -1, 0)  # every minute; with a grace of 90 s the last two are on time


@pytest.mark.parametrize(("policy", "max_catch_up", "produce", "skipped"), [
    ("all", 2, grid(-3, -2, -1, 0), 2),
    ("all", 0, grid(-1, 0), 4),
    ("all", 100, DUE, 0),
    ("latest", 100, grid(0), 5),
    ("none", 100, grid(-1, 0), 4),
])
def test_each_policy_produces_on_time_slots_and_chooses_among_the_missed(
        policy: str, max_catch_up: int, produce: list[datetime], skipped: int) -> None:
    s = spec(every_s=60, grace_s=90, catch_up=policy, max_catch_up=max_catch_up)
    assert select(DUE, T, s) == (produce, skipped)


@pytest.mark.parametrize("policy", ["all", "latest", "none"])
def test_with_every_slot_on_time_nothing_is_skipped_but_by_latest(policy: str) -> None:
    s = spec(every_s=10, grace_s=60, catch_up=policy)
    on_time = [T - timedelta(seconds=s_) for s_ in (40, 30, 20, 10, 0)]
    produce, skipped = select(on_time, T, s)
    assert (produce, skipped) == (([T], 4) if policy == "latest" else (on_time, 0))
    assert select([], T, s) == ([], 0)


def test_latest_produces_the_newest_slot_even_when_missed_and_none_produces_nothing() -> None:
    missed = grid(-30, -20, -10)
    assert select(missed, T, spec(catch_up="latest")) == (grid(-10), 2)
    assert select(missed, T, spec(catch_up="none")) == ([], 3)
    assert select(missed, T, spec(catch_up="all", max_catch_up=1)) == (grid(-10), 2)


def test_on_time_is_judged_by_the_fire_time_not_the_slot() -> None:
    s = spec(every_s=3600, jitter_s=1800, grace_s=60, catch_up="none")
    slot = T - timedelta(hours=1)
    fire = s.fire_time(slot)
    assert select([slot], fire + timedelta(seconds=60), s) == ([slot], 0)
    assert select([slot], fire + timedelta(seconds=61), s) == ([], 1)


def test_first_sight_starts_at_now_minus_grace() -> None:
    s = spec(every_s=60, grace_s=30, catch_up="all")
    assert due(s, None, T + timedelta(seconds=10)) == schedule_spec.Due([T], 0, T)
    assert due(s, None, T + timedelta(seconds=31)) == schedule_spec.Due([], 0, None)  # no history replayed


def test_a_slot_whose_fire_time_has_not_come_is_not_due_and_not_passed() -> None:
    s = spec(every_s=3600, jitter_s=1800, catch_up="all")
    fire = s.fire_time(T)
    before = due(s, T - timedelta(hours=1), fire - timedelta(milliseconds=1))
    assert before == schedule_spec.Due([], 0, None)
    assert due(s, T - timedelta(hours=1), fire) == schedule_spec.Due([T], 0, T)
    assert due(s, T, fire + timedelta(minutes=10)) == schedule_spec.Due([], 0, None)  # last is the slot: done


def test_due_applies_the_policy_after_a_short_downtime() -> None:
    last = T - timedelta(minutes=10)
    now = T + timedelta(seconds=5)
    assert due(spec(every_s=60, catch_up="all", max_catch_up=3), last, now) == \
        schedule_spec.Due(grid(-3, -2, -1, 0), 6, T)  # grace 60 s: only T is on time
    assert due(spec(every_s=60, catch_up="latest"), last, now) == schedule_spec.Due([T], 9, T)
    assert due(spec(every_s=60, catch_up="none"), last, now) == schedule_spec.Due([T], 9, T)
    assert due(spec(every_s=60, catch_up="all", max_catch_up=3), last, now, limit=2) == \
        schedule_spec.Due(grid(-1, 0), 8, T)  # a caller's limit: the older ones counted, skipped


def test_a_schedule_down_for_a_year_is_answered_without_iterating_its_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    real = schedule_spec.from_ms

    def counted(ms: int) -> datetime:
        made.append(ms)
        return real(ms)

    monkeypatch.setattr(schedule_spec, "from_ms", counted)
    s = spec(every_s=1, catch_up="all", max_catch_up=5)
    last = T - timedelta(days=365)
    answer = due(s, last, T)
    # grace min(60 s, 1 s): T - 1 s and T are on time, the five missed before them caught up
    assert answer.newest == T and answer.produce == [T - timedelta(seconds=k) for k in (6, 5, 4, 3, 2, 1, 0)]
    assert len(answer.produce) + answer.skipped == 365 * 86_400  # every slot produced or skipped, once
    assert len(made) < 100  # slots made: a few, not a year of seconds
    assert due(spec(every_s=1, catch_up="latest"), last, T) == schedule_spec.Due([T], 365 * 86_400 - 1, T)


def test_a_cron_schedule_down_for_a_year_counts_its_skipped_slots_up_to_the_cap() -> None:
    s = spec(cron="* * * * *", catch_up="latest")
    answer = due(s, T - timedelta(days=365), T + timedelta(seconds=1))
    assert answer.produce == [T] and answer.newest == T
    assert COUNT_CAP - 1 <= answer.skipped <= COUNT_CAP + 2  # beyond the cap, the cap


# --- validation ----------------------------------------------------------------------------------------

N = "schedules[0]: schedule 'nightly-report': "  # a check across fields names the schedule, then the field
F = "schedule 'nightly-report': "  # a checked field's message names the schedule too

ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("a name that is not one", {"name": "Nightly report"}, "schedules[0].name: String should match pattern"),
    ("a kind that is not one", {"kind": "Sum-marize"}, "schedules[0].kind: String should match pattern"),
    ("both clocks", {"cron": "0 2 * * *", "every_s": 60}, N + "cron, every_s: exactly one of them"),
    ("no clock", {"every_s": None}, N + "cron, every_s: exactly one of them"),
    ("a cron cronsim refuses", {"cron": "61 * * * *"}, "schedules[0].cron: " + F + "cron: '61 * * * *': "),
    ("a cron with seconds", {"cron": "0 0 2 * * *"}, "schedules[0].cron: " + F + "cron: '0 0 2 * * *' is not a five"),
    ("a cron that never matches", {"cron": "0 0 30 2 *"}, "schedules[0].cron: " + F + "cron: '0 0 30 2 *': "),
    ("an unknown zone", {"cron": "0 2 * * *", "timezone": "Europe/Atlantis"},
     "schedules[0].timezone: " + F + "timezone: 'Europe/Atlantis' is not an IANA time zone"),
    ("a zone that is a path", {"timezone": "../../etc/passwd"}, "schedules[0].timezone: " + F + "timezone: "),
    ("every_s below 1", {"every_s": 0}, "schedules[0].every_s: Input should be greater than or equal to 1"),
    ("every_s above a year", {"every_s": 367 * 86_400}, "schedules[0].every_s: Input should be less than or equal"),
    ("every_s fractional", {"every_s": 1.5}, "schedules[0].every_s: Input should be a valid integer"),
    ("jitter negative", {"jitter_s": -1}, "schedules[0].jitter_s: Input should be greater than or equal to 0"),
    ("jitter not a number", {"jitter_s": float("nan")}, "schedules[0].jitter_s: Input should be a finite number"),
    ("jitter the period", {"every_s": 60, "jitter_s": 60}, N + "jitter_s: 60.0 is not below the period (60 s)"),
    ("jitter above a cron's shortest gap", {"cron": "0,5 * * * *", "jitter_s": 300},
     N + "jitter_s: 300.0 is not below the period (300 s)"),
    ("an unknown placeholder", {"input": {"text": "the day {day}"}},
     "schedules[0].input: " + F + "input.text: the placeholder {day} is not one of {schedule}, {slot}, {slot_date}, "
     "{slot_ms}"),
    ("a placeholder nested in a list", {"input": {"a": {"b": ["ok", "{when}"]}}},
     "schedules[0].input: " + F + "input.a.b[1]: the placeholder {when}"),
    ("a format spec", {"input": {"text": "{slot:>30}"}}, F + "input.text: the placeholder {slot:>30}"),
    ("a conversion", {"input": {"text": "{slot!r}"}}, F + "input.text: the placeholder {slot!r}"),
    ("an attribute", {"input": {"text": "{slot.year}"}}, F + "input.text: the placeholder {slot.year}"),
    ("an unbalanced brace", {"input": {"text": "{slot"}}, F + "input.text: "),
    ("a value that is not JSON", {"input": {"at": datetime(2026, 1, 1)}},
     F + "input.at: a datetime is not a JSON value"),
    ("a number that is not JSON", {"input": {"x": [float("inf")]}}, F + "input.x[0]: inf is not a JSON number"),
    ("an unknown field", {"every": 60}, "schedules[0].every: Extra inputs are not permitted"),
    ("an unknown priority", {"priority": "urgent"}, "schedules[0].priority: Input should be 'interactive' or 'batch'"),
    ("an unknown policy", {"catch_up": "some"}, "schedules[0].catch_up: Input should be 'all', 'latest' or 'none'"),
    ("max_catch_up negative", {"max_catch_up": -1}, "schedules[0].max_catch_up: Input should be greater"),
    ("a tenant that is not one", {"tenant": "a{b}"}, "schedules[0].tenant: String should match pattern"),
    ("grace negative", {"grace_s": -1}, "schedules[0].grace_s: Input should be greater than or equal to 0"),
    ("a deadline of zero", {"deadline_s": 0}, "schedules[0].deadline_s: Input should be greater than 0"),
]


@pytest.mark.parametrize(("data", "expected"), [(d, e) for _, d, e in ERRORS], ids=[i for i, _, _ in ERRORS])
def test_a_declaration_the_service_cannot_run_is_refused_naming_the_field(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as caught:
        spec(**data)
    assert expected in schedule_spec.describe_errors(caught.value, "schedules[0]")


def test_describe_errors_names_where_and_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        spec(cron="99 * * * *", priority="urgent")
    text = schedule_spec.describe_errors(caught.value, "schedules[2]")
    assert "schedules[2].cron: schedule 'nightly-report': cron: '99 * * * *'" in text
    assert "schedules[2].priority: " in text


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        spec().slots_between(datetime(2026, 1, 1), T, 5)


# --- settings ------------------------------------------------------------------------------------------

def test_schedules_are_settings_and_survive_the_environment_of_a_spawned_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AGENT_SCHEDULER__SCHEDULES", "AGENT_SCHEDULER__ENABLED", "AGENT_SCHEDULER__TICK_S"):
        monkeypatch.delenv(name, raising=False)
    assert (Settings().scheduler.enabled, Settings().scheduler.tick_s, Settings().scheduler.schedules) == (True, 1.0, [])
    declared = [{"name": "nightly", "kind": "summarize", "cron": "0 2 * * *", "timezone": PARIS,
                 "input": {"text": "{slot_date}"}, "jitter_s": 300}]
    monkeypatch.setenv("AGENT_SCHEDULER__SCHEDULES", json.dumps(declared))
    monkeypatch.setenv("AGENT_SCHEDULER__TICK_S", "0.5")
    s = Settings()
    assert s.scheduler.tick_s == 0.5 and s.scheduler.schedules == [ScheduleSpec.model_validate(declared[0])]
    env = to_env(s)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().scheduler == s.scheduler


@pytest.mark.parametrize(("name", "value"), [("AGENT_SCHEDULER__TICK_S", "0"), ("AGENT_SCHEDULER__TICK_S", "61"),
                                             ("AGENT_SCHEDULER__SCHEDULES", '[{"name": "x", "kind": "k"}]')])
def test_scheduler_settings_out_of_bounds_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()
