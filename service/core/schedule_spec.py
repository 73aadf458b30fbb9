"""A schedule's declaration and the pure arithmetic of its slots (docs/SCHEDULES.md).

:class:`ScheduleSpec` is one schedule, validated at start (``extra="forbid"``; an error names the
schedule and the field). Its methods compute, without Redis or a clock of their own, the slots
(the multiples of ``every_s`` since the Unix epoch, or the matches of a five-field cron expression
read in ``timezone`` by cronsim), each slot's deterministic fire time (slot + a jitter from
sha256), task id, rendered input and task event. :func:`select` applies the catch-up policy to the
due slots, and :func:`due` answers for one tick which slots to produce and how many to skip,
counting a long downtime instead of iterating it.

Choices the design leaves open, made here:

- cron and DST (cronsim, like Debian cron): an expression naming a fixed minute and hour reads
  wall-clock time; a time the spring change skips fires at the first instant after the gap (02:30
  in a gap that skips 02:00-03:00 fires at 03:00), and a time the autumn change repeats fires once,
  at its first occurrence. Other expressions (``*/15 * * * *``) follow real time.
- ``{slot_date}`` is the slot's date in ``timezone`` (UTC unless set), ``{slot_ms}`` its
  milliseconds since the epoch. Only strings are rendered (dictionary keys are kept as written).
- the period of a cron schedule, for the defaults of ``grace_s`` and ``deadline_s`` and the bound
  on ``jitter_s``, is its shortest gap between consecutive matches over the next year (at most
  1,000 matches) from the time of validation; :meth:`ScheduleSpec.period_s` is the gap after a time.
- a task's deadline counts ``deadline_s`` from its fire time or, for a slot produced later than
  that (caught up after downtime), from when it is produced, so a caught-up slot is not born expired.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dedup.keys import TENANT_MAX_LEN, TENANT_PATTERN

SCHEDULE_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
KIND_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"  # service.agents.tasks.KIND_PATTERN (a layer above)
YEAR_S = 366 * 86_400  # the longest period (every_s) and deadline
DAY_S = 86_400  # the default deadline is the period, at most this
DEFAULT_GRACE_S = 60.0  # the default grace is min(this, the period)
COUNT_CAP = 100_000  # count_between iterates a cron expression at most this far
PERIOD_SAMPLE = 1_000  # matches looked at for a cron schedule's shortest period
MAX_CATCH_UP = 10_000
PLACEHOLDERS = frozenset({"slot", "slot_date", "slot_ms", "schedule"})
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
CatchUp = Literal["all", "latest", "none"]


def to_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime (exact, no float)."""
    return (_aware(moment) - EPOCH) // MS


def from_ms(ms: int) -> datetime:
    return EPOCH + ms * MS


def slot_text(slot: datetime) -> str:
    """``2026-12-06T02:00:00Z``: the slot in UTC, to the second."""
    return _aware(slot).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_slot(text: str) -> datetime:
    """The slot a :func:`slot_text` names."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"a schedule's times are aware datetimes, not {moment!r}")
    return moment


class ScheduleSpec(BaseModel):
    """One schedule: what runs (``kind``, ``input``), when (``cron`` or ``every_s``), and how it catches up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SCHEDULE_NAME_PATTERN)
    kind: str = Field(pattern=KIND_NAME_PATTERN)
    cron: str | None = None
    every_s: int | None = Field(None, ge=1, le=YEAR_S)
    timezone: str = "UTC"
    input: dict[str, Any] = Field(default_factory=dict)
    tenant: str | None = Field(None, pattern=TENANT_PATTERN, max_length=TENANT_MAX_LEN)
    priority: Literal["interactive", "batch"] = "interactive"
    jitter_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    catch_up: CatchUp = "latest"
    max_catch_up: int = Field(100, ge=0, le=MAX_CATCH_UP)
    grace_s: float | None = Field(None, ge=0, le=YEAR_S, allow_inf_nan=False)  # None: min(60, period)
    deadline_s: float | None = Field(None, gt=0, le=YEAR_S, allow_inf_nan=False)  # None: period, <= 24 h

    _zone: ZoneInfo = PrivateAttr(default_factory=lambda: ZoneInfo("UTC"))
    _shortest_s: float = PrivateAttr(0.0)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str, info: ValidationInfo) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"{_named(info)}timezone: {value[:80]!r} is not an IANA time zone "
                             "(such as 'Europe/Paris' or 'UTC')") from exc
        return value

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if len(value.split()) != 5:
            raise ValueError(f"{_named(info)}cron: {value[:80]!r} is not a five-field cron expression "
                             "(minute hour day-of-month month day-of-week)")
        try:
            CronSim(value, datetime.now(UTC))
        except CronSimError as exc:
            raise ValueError(f"{_named(info)}cron: {value[:80]!r}: {exc}") from exc
        return value

    @field_validator("input")
    @classmethod
    def _json_and_templates(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        problem = _check_value(value, "input")
        if problem is not None:
            raise ValueError(f"{_named(info)}{problem}")
        return value

    @model_validator(mode="after")
    def _one_clock(self) -> Self:
        at = f"schedule {self.name!r}: "
        if (self.cron is None) == (self.every_s is None):
            raise ValueError(f"{at}cron, every_s: exactly one of them (a cron expression or an interval in seconds)")
        self._zone = ZoneInfo(self.timezone)
        if self.every_s is not None:
            self._shortest_s = float(self.every_s)
        else:
            shortest = self._shortest_gap(datetime.now(UTC))
            if shortest is None:
                raise ValueError(f"{at}cron: {self.cron!r} matches fewer than twice in 50 years")
            self._shortest_s = shortest
        if self.jitter_s >= self._shortest_s:
            raise ValueError(f"{at}jitter_s: {self.jitter_s} is not below the period ({self._shortest_s:g} s): "
                             "slots would fire out of order")
        return self

    def _shortest_gap(self, now: datetime) -> float | None:
        gaps: list[float] = []
        horizon = now + timedelta(seconds=YEAR_S)
        previous: datetime | None = None
        for slot in self._forward(now):
            if previous is not None:
                gaps.append((slot - previous).total_seconds())
                if len(gaps) >= PERIOD_SAMPLE or slot > horizon:
                    break
            previous = slot
        return min(gaps) if gaps else None

    @property
    def effective_grace_s(self) -> float:
        """``grace_s``, or min(60 s, the period)."""
        return self.grace_s if self.grace_s is not None else min(DEFAULT_GRACE_S, self._shortest_s)

    @property
    def effective_deadline_s(self) -> float:
        """``deadline_s``, or the period, at most 24 h."""
        return self.deadline_s if self.deadline_s is not None else min(float(DAY_S), self._shortest_s)

    def period_s(self, now: datetime | None = None) -> float:
        """``every_s``, or the gap between the first two cron matches after ``now`` (default: the current time)."""
        if self.every_s is not None:
            return float(self.every_s)
        matches = self._forward(_aware(now) if now is not None else datetime.now(UTC))
        first, second = next(matches), next(matches)  # validated: it matches at least twice
        return (second - first).total_seconds()

    def slots_between(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """Slots ``s`` with ``after < s <= until``, oldest first: at most ``limit``, the newest when more."""
        if limit <= 0 or _aware(until) <= _aware(after):
            return []
        if self.every_s is not None:
            step = self.every_s * 1000
            low, high = to_ms(after) // step + 1, to_ms(until) // step
            return [from_ms(k * step) for k in range(max(low, high - limit + 1), high + 1)]
        newest: list[datetime] = []
        for slot in self._backward(until):
            if slot <= after or len(newest) >= limit:
                break
            newest.append(slot)
        return newest[::-1]

    def next_slot(self, after: datetime) -> datetime | None:
        """The first slot after ``after`` (None for a cron expression with no match in 50 years)."""
        if self.every_s is not None:
            step = self.every_s * 1000
            return from_ms((to_ms(after) // step + 1) * step)
        return next(self._forward(after), None)

    def count_between(self, after: datetime, until: datetime) -> int:
        """How many slots lie in ``(after, until]``: exact for intervals, at most :data:`COUNT_CAP` for cron."""
        if _aware(until) <= _aware(after):
            return 0
        if self.every_s is not None:
            step = self.every_s * 1000
            return to_ms(until) // step - to_ms(after) // step
        count = 0
        for slot in self._forward(after):
            if slot > until or count >= COUNT_CAP:
                break
            count += 1
        return count

    def jitter_ms(self, slot: datetime) -> int:
        """sha256 of ``<name>@<slot text>`` as an integer, modulo ``floor(jitter_s * 1000) + 1``: whole
        milliseconds rounded down, so a jitter just below the period never reaches it (0.9996 s of a
        1 s schedule is at most 999 ms)."""
        seed = hashlib.sha256(self.task_id(slot).encode()).digest()
        return int.from_bytes(seed, "big") % (math.floor(self.jitter_s * 1000) + 1)

    def fire_time(self, slot: datetime) -> datetime:
        return _aware(slot).astimezone(UTC) + self.jitter_ms(slot) * MS

    def task_id(self, slot: datetime) -> str:
        return f"{self.name}@{slot_text(slot)}"

    def render(self, slot: datetime) -> dict[str, Any]:
        """The input with ``{slot}``, ``{slot_date}``, ``{slot_ms}`` and ``{schedule}`` filled in every string."""
        moment = _aware(slot).astimezone(UTC)
        values = {
            "slot": slot_text(moment),
            "slot_date": moment.astimezone(self._zone).date().isoformat(),
            "slot_ms": str(to_ms(moment)),
            "schedule": self.name,
        }
        rendered = _render(self.input, values)
        assert isinstance(rendered, dict)
        return rendered

    def task_value(self, slot: datetime, now: datetime) -> bytes:
        """The task event's JSON (sorted keys): ``task_id``, ``kind``, ``input``, ``priority``,
        ``deadline`` and, when set, ``tenant``."""
        start = max(self.fire_time(slot), _aware(now).astimezone(UTC))
        deadline = start + timedelta(seconds=self.effective_deadline_s)
        event: dict[str, Any] = {
            "task_id": self.task_id(slot),
            "kind": self.kind,
            "input": self.render(slot),
            "priority": self.priority,
            "deadline": deadline.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        if self.tenant is not None:
            event["tenant"] = self.tenant
        return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()

    def _forward(self, after: datetime) -> Iterator[datetime]:
        """Cron matches (UTC) strictly after ``after``, strictly increasing."""
        assert self.cron is not None
        last = _aware(after)
        for local in CronSim(self.cron, last.astimezone(self._zone)):
            slot = local.astimezone(UTC)
            if slot > last:
                last = slot
                yield slot

    def _backward(self, until: datetime) -> Iterator[datetime]:
        """Cron matches (UTC) at or before ``until``, strictly decreasing."""
        assert self.cron is not None
        until = _aware(until).astimezone(UTC)
        start = until.replace(microsecond=0) + timedelta(seconds=1)  # cronsim's reverse starts below it
        last = start
        for local in CronSim(self.cron, start.astimezone(self._zone), reverse=True):
            slot = local.astimezone(UTC)
            if slot < last and slot <= until:
                last = slot
                yield slot


def _named(info: ValidationInfo) -> str:
    name = info.data.get("name")
    return f"schedule {name!r}: " if isinstance(name, str) else ""


def _check_value(value: Any, where: str) -> str | None:
    """What is wrong with a JSON value of the input (its path named), or None."""
    if isinstance(value, str):
        return _check_template(value, where)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where}: {value} is not a JSON number"
    if isinstance(value, list):
        problems = (_check_value(item, f"{where}[{i}]") for i, item in enumerate(value))
        return next((p for p in problems if p is not None), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}: the key {key!r} is not a string"
            problem = _check_value(item, f"{where}.{key}")
            if problem is not None:
                return problem
        return None
    return f"{where}: a {type(value).__name__} is not a JSON value (write dates and times as strings)"


def _check_template(text: str, where: str) -> str | None:
    allowed = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        return f"{where}: {exc} (a literal brace is written {{{{ or }}}})"
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            return f"{where}: the placeholder {shown[:80]} is not one of {allowed}"
    return None


def _render(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format_map(values)
    if isinstance(value, list):
        return [_render(item, values) for item in value]
    if isinstance(value, dict):
        return {key: _render(item, values) for key, item in value.items()}
    return value


def select(due: Sequence[datetime], now: datetime, spec: ScheduleSpec) -> tuple[list[datetime], int]:
    """The due slots (oldest first) to produce under the spec's catch-up policy, and how many are skipped.

    A slot is on time when its fire time is at least ``now - grace``, else missed. ``all``: every
    on-time slot and the newest ``max_catch_up`` missed ones; ``latest``: the newest due slot only;
    ``none``: the on-time slots only."""
    if not due:
        return [], 0
    if spec.catch_up == "latest":
        return [due[-1]], len(due) - 1
    cutoff = _aware(now) - timedelta(seconds=spec.effective_grace_s)
    on_time = [s for s in due if spec.fire_time(s) >= cutoff]
    missed = [s for s in due if spec.fire_time(s) < cutoff]
    keep = spec.max_catch_up if spec.catch_up == "all" else 0
    kept = missed[max(0, len(missed) - keep):]
    return kept + on_time, len(missed) - len(kept)


@dataclass(frozen=True, slots=True)
class Due:
    """One tick's answer for a schedule: the slots to produce (oldest first), how many are skipped,
    and the newest slot handled (the ledger's next ``last``; None when nothing was due)."""

    produce: list[datetime]
    skipped: int
    newest: datetime | None


def due(spec: ScheduleSpec, last: datetime | None, now: datetime, limit: int | None = None) -> Due:
    """The slots after ``last`` due at ``now`` (fire time reached), selected by the catch-up policy.

    ``last`` None is a first sight: it starts at ``now - grace``. At most ``limit`` slots are looked
    at (by default what the policy can produce: the on-time ones plus ``max_catch_up`` or one),
    the newest; older ones are counted (:meth:`ScheduleSpec.count_between`) and skipped, so a
    schedule down for a year is answered without iterating its slots."""
    now = _aware(now).astimezone(UTC)
    grace = timedelta(seconds=spec.effective_grace_s)
    after = now - grace if last is None else _aware(last).astimezone(UTC)
    if limit is None:
        window = max(after, now - grace - timedelta(seconds=spec.jitter_s) - timedelta(seconds=1))
        extra = {"all": spec.max_catch_up, "latest": 1, "none": 0}[spec.catch_up]
        limit = spec.count_between(window, now) + extra + 1
    listed = spec.slots_between(after, now, max(1, limit))
    pending = 0
    while len(listed) > pending and spec.fire_time(listed[-1 - pending]) > now:
        pending += 1  # fire times follow the slots' order (jitter < period): the newest wait
    ready = listed[:len(listed) - pending]
    if not ready:
        return Due([], 0, None)
    unlisted = 0
    if len(listed) >= limit:  # more may lie before the oldest listed: count them, skipped
        unlisted = max(0, spec.count_between(after, listed[0]) - 1)
    produce, skipped = select(ready, now, spec)
    return Due(produce, skipped + unlisted, ready[-1])


def describe_errors(exc: ValidationError, where: str) -> str:
    """A schedule's validation errors as one line, each as ``<where>.<field>: <message>``."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}.{field}: {message}" if field else f"{where}: {message}")
    return "; ".join(parts)


class SchedulerSettings(BaseModel):
    """``AGENT_SCHEDULER__*``: the loop that produces the schedules' slots (service.runtime.scheduler)."""

    enabled: bool = True
    tick_s: float = Field(1.0, gt=0, le=60)
    # JSON: [{"name": "nightly", "kind": "summarize", "cron": "0 2 * * *", "input": {...}}, ...]
    schedules: list[ScheduleSpec] = Field(default_factory=list)
