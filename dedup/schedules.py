"""A schedule's side of the ledger: who produces its slots, and the newest slot handled.

Per schedule (hash tag ``{<name>}``, one slot in a cluster): ``agent:schedule:{<name>}``, a hash of
``last_ms`` (the newest slot handled, produced or skipped, in ms since the epoch), ``last_fired_ms``
(the fire time of the newest slot produced), ``produced`` and ``skipped`` (counts); and
``agent:schedule:{<name>}:lease``, the id of the replica that produces its slots now, with a TTL.
Neither expires on its own but the lease: a schedule's history is kept for as long as it is declared.

The order a replica keeps (docs/SCHEDULES.md): :meth:`Schedules.lease`, :meth:`Schedules.status`,
produce the due slots, then :meth:`Schedules.advance`, which moves ``last_ms`` only for the lease's
holder and only from the value it read (one script): a slot produced is never lost by a crash before
the advance (the next holder produces it again, the same task id), and never skipped by a race.
Redis errors are the ledger's (:class:`dedup.errors.LedgerUnavailable`, ``LedgerRefused``).

Beyond docs/SCHEDULES.md: :meth:`Schedules.holder` says who holds the lease, :meth:`Schedules.release`
and :meth:`Schedules.start` answer whether they changed anything, and :meth:`Schedules.advance`
refuses a move backwards or a negative count (``ValueError``) before it asks Redis.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from redis.commands.core import AsyncScript

from dedup.client import RedisClient
from dedup.keys import Keys

T = TypeVar("T")

Advance = Literal["ok", "moved", "lost"]

__all__ = ["Advance", "ScheduleState", "Schedules"]

# KEYS lease; ARGV worker, ttl_ms -> 1 (this worker holds it now) | 0 (another does)
LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS lease; ARGV worker -> 1 (released) | 0 (not this worker's)
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS schedule, lease; ARGV worker, from_ms, to_ms, produced, skipped, last_fired_ms ('' to keep it)
# -> 'ok' | 'moved' (last_ms is no longer from_ms) | 'lost' (the lease is not this worker's)
ADVANCE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'lost' end
local last = redis.call('HGET', KEYS[1], 'last_ms')
local current = -1
if last then current = tonumber(last) end
if current ~= tonumber(ARGV[2]) then return 'moved' end
redis.call('HSET', KEYS[1], 'last_ms', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'produced', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'skipped', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'last_fired_ms', ARGV[6]) end
return 'ok'
"""


class Ledger(Protocol):
    """What the schedules' side uses of :class:`dedup.ledger.Ledger`."""

    client: RedisClient
    keys: Keys

    async def redis_call(self, op: Callable[[], Awaitable[T]]) -> T: ...

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any: ...


@dataclass(frozen=True)
class ScheduleState:
    """A schedule as the ledger keeps it: ``last_ms`` the newest slot handled, ``last_fired_ms`` the
    fire time of the newest slot produced (None before the first), the slots produced and skipped."""

    last_ms: int
    last_fired_ms: int | None
    produced: int
    skipped: int


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _whole(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be whole milliseconds or a count, not {value!r}")
    return value


class Schedules:
    """The schedules of a ledger (its client, keys and error translation)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        client = ledger.client
        self._lease = client.register_script(LEASE)
        self._release = client.register_script(RELEASE)
        self._advance = client.register_script(ADVANCE)

    async def lease(self, name: str, worker: str, ttl_ms: int) -> bool:
        """Take the schedule's lease for ``ttl_ms`` (``SET NX PX``), or extend it when ``worker``
        holds it: whether ``worker`` holds it now."""
        if _whole("ttl_ms", ttl_ms) < 1:
            raise ValueError(f"a lease lasts at least 1 ms, not {ttl_ms}")
        key = self.ledger.keys.schedule_lease(name)
        return bool(int(await self.ledger.run_script(self._lease, [key], [worker, ttl_ms])))

    async def release(self, name: str, worker: str) -> bool:
        """Give the lease up when ``worker`` holds it: whether it did."""
        key = self.ledger.keys.schedule_lease(name)
        return bool(int(await self.ledger.run_script(self._release, [key], [worker])))

    async def holder(self, name: str) -> str | None:
        """Who holds the schedule's lease now, or None."""
        key = self.ledger.keys.schedule_lease(name)
        raw = await self.ledger.redis_call(lambda: self.ledger.client.get(key))
        return None if raw is None else _s(raw)

    async def status(self, name: str) -> ScheduleState | None:
        """The schedule's state, or None before its first sight (:meth:`start`)."""
        key = self.ledger.keys.schedule(name)
        raw = await self.ledger.redis_call(lambda: self.ledger.client.hgetall(key))
        fields = {_s(k): _s(v) for k, v in raw.items()}
        if "last_ms" not in fields:
            return None
        fired = fields.get("last_fired_ms")
        return ScheduleState(last_ms=int(fields["last_ms"]), last_fired_ms=int(fired) if fired is not None else None,
                             produced=int(fields.get("produced", 0)), skipped=int(fields.get("skipped", 0)))

    async def start(self, name: str, at_ms: int) -> bool:
        """A schedule's first sight: ``last_ms = at_ms`` unless it has one (``HSETNX``): whether this
        call set it."""
        key = self.ledger.keys.schedule(name)
        at = _whole("at_ms", at_ms)
        return bool(await self.ledger.redis_call(lambda: self.ledger.client.hsetnx(key, "last_ms", at)))

    async def advance(self, name: str, worker: str, from_ms: int, to_ms: int, produced: int, skipped: int,
                      last_fired_ms: int | None) -> Advance:
        """Move ``last_ms`` from ``from_ms`` (-1: none yet) to ``to_ms``, add the counts and set
        ``last_fired_ms`` (None: left as it is), in one step: ``ok``; ``lost`` when the lease is not
        ``worker``'s; ``moved`` when ``last_ms`` is no longer ``from_ms``. Nothing changes but on ``ok``."""
        if _whole("to_ms", to_ms) < _whole("from_ms", from_ms):
            raise ValueError(f"a schedule advances, never back: from {from_ms} to {to_ms}")
        if _whole("produced", produced) < 0 or _whole("skipped", skipped) < 0:
            raise ValueError(f"counts are never negative: produced {produced}, skipped {skipped}")
        fired = "" if last_fired_ms is None else _whole("last_fired_ms", last_fired_ms)
        keys = self.ledger.keys
        raw = await self.ledger.run_script(self._advance, [keys.schedule(name), keys.schedule_lease(name)], [
            worker, from_ms, to_ms, produced, skipped, fired])
        answer = _s(raw)
        if answer not in ("ok", "moved", "lost"):
            raise ValueError(f"schedule {name}: the advance answered {answer!r}")
        return answer  # type: ignore[return-value]
