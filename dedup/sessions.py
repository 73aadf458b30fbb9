"""A session's side of the ledger: its tasks one at a time in arrival order, its state updated once per task.

A session's keys share the hash tag ``{<session id>}`` (one slot): the hash, the queue, the turns and
the applied marks (:meth:`dedup.keys.Keys.session`, the scripts' fields in :mod:`dedup.sessions_scripts`).
Every write refreshes the TTL of all four to the kind's ``ttl_s`` (recorded by each :meth:`Sessions.enter`).

- **Kind and tenant.** The first :meth:`~Sessions.enter` records the session's kind and its task's
  tenant; a task of another tenant is answered :class:`WrongTenant` (before the kind is compared: it
  learns nothing of the session's kind), a task of another kind :class:`WrongKind`, and nothing is
  written. A session recorded without a tenant takes the tenant of its next enter.
- **Tickets.** A task takes its ticket once per task id, at first sight: its redelivery and each
  poll find the same one, so the queue is arrival order. A task that left (:meth:`~Sessions.leave`)
  gave its ticket back: seen again (its dead letter replayed, the task revived), it is a new arrival.
- **Entering.** A task enters (:class:`Entered`, the holder with a lease) when it is the queue's
  head and no other task holds the session with a live lease; otherwise it is :class:`Waiting`
  behind the live holder or the head. A newer run of the holder (its own redelivery: a newer fence
  of the same task id) takes over at once; an older fence than one that entered is refused
  (:class:`~dedup.errors.StaleFence`). A task whose update was applied is :class:`Applied` (a
  replay: run nothing, re-emit).
- **A head that does not come** (its worker stopped and its record is not redelivered, a dead end
  that never called ``leave``): when the session has stood free for ``stall_ms`` (since the last
  apply or leave, the holder's lease running out, or the last head passed), the next ``enter`` of
  a task behind it passes it over: out of the queue, its ticket kept, so its return queues it again
  at its place (behind the live holder, ahead of later arrivals). One head is passed per
  ``stall_ms``, so a waiter's wait is bounded by the number of dead heads ahead of it times
  ``stall_ms``, and the waiter's own deadline (the pipeline's ``session_busy``) bounds the rest.
  A head that holds with a live lease, renewed by a live worker, is never passed.
- **Apply** is once per task id (``again``: applied before, nothing written) and under the version
  read (``moved``: re-read and reduce again); ``stale`` when a newer run of the same task entered
  (nothing changes: that run goes on), or the session was erased since the task entered (it read
  what was erased: nothing written, the task out of the queue, the session freed if it held it). It appends the turn and/or sets the state, bumps the version,
  marks the task applied (the session's ``applied`` zset, the newest :data:`MARKS_MAX` kept: a replay
  of a task applied before those runs as a new arrival, as past the ledger's retention), takes it
  out of the queue and frees the session if it held it. It does
  not require the task to hold the session: the task's result was accepted once by the task's own
  ledger (its fence), and an apply that comes late (a head passed over, the duplicate path of a
  task that completed but crashed before applying) is the only way that update is not lost; the
  version CAS keeps every concurrent update.
- **Leave** frees the queue without a turn (``left``, no mark kept); ``again`` when the
  task applied or holds no place; with a fence, ``stale`` when a newer run of the task entered.
  ``left`` forgets the task's ticket and fence: it comes back as a new arrival at any fence.
- **Summaries** do not move the version (the turns and state are unchanged); one is stored when the
  version is the one read and it covers more turns than the stored one.
- **Operators**: :meth:`~Sessions.put` (version CAS: ``conflict``, the API's 409; turns replaced drop
  the summary), :meth:`~Sessions.delete`, :meth:`~Sessions.list`.
- **Erasure** (:meth:`~Sessions.delete`) erases the content (kind, state, summary, turns, applied
  marks) and the listing, and moves the session's ``epoch`` on (the version too, never reset). It
  keeps what orders the tasks: a live holder keeps its turn (its lease renews) and the waiters their
  places, so a waiter polling right after does not enter beside the holder; each task records the
  epoch it entered in, and an update read in an older epoch is ``stale`` (never written back into the
  session that follows). The next ``enter`` finds no kind and begins the session again, empty, at a
  higher version. Nobody holding or waiting: only a tombstone ``{epoch, version, erased_ms}`` stays
  for the session's TTL. :meth:`~Sessions.get`, :meth:`~Sessions.put` and the listing treat a hash
  without a kind as no session.

The listing ``agent:sessions`` (id by last change, this process's clock) is outside the session's
slot: written after the session's script, best effort (an outage there is logged; the next change
lists the session again), trimmed to :data:`LISTING_MAX`, and pruned of erased or expired sessions
as it is read. Deviations from docs/SESSIONS.md are recorded there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from redis.commands.core import AsyncScript

from dedup import sessions_scripts as scripts
from dedup.client import RedisClient
from dedup.errors import LedgerUnavailable, StaleFence
from dedup.keys import Keys, is_valid_task_key, is_valid_tenant
from dedup.sessions_scripts import MARKS_MAX, TURNS_MAX

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_TTL_S = 2_592_000  # 30 days, the Session declaration's default
DEFAULT_TENANT = "default"  # the tenant of a task that names none (service.agents.tasks.DEFAULT_TENANT)
DEFAULT_STALL_MS = 120_000  # a free session's head that does not come for this long is passed over
LISTING_MAX = 100_000  # the listing keeps the most recently changed sessions

Applying = Literal["ok", "again", "moved", "stale"]
Leaving = Literal["left", "again", "stale"]
Putting = Literal["ok", "conflict", "missing"]

__all__ = ["DEFAULT_STALL_MS", "DEFAULT_TENANT", "DEFAULT_TTL_S", "LISTING_MAX", "MARKS_MAX", "TURNS_MAX", "Applied", "Applying", "Entered", "Leaving",
           "Listed", "Putting", "SessionRecord", "Sessions", "Summary", "Waiting", "WrongKind", "WrongTenant"]


class Ledger(Protocol):
    """What the sessions' side uses of :class:`dedup.ledger.Ledger`."""

    client: RedisClient
    keys: Keys

    async def redis_call(self, op: Callable[[], Awaitable[T]]) -> T: ...

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any: ...


@dataclass(frozen=True)
class Summary:
    """The summary of the turns ``[0, upto)``."""

    upto: int
    text: str


@dataclass(frozen=True)
class Entered:
    """The task holds the session: its version, state (None: none set), summary, and the turns after
    the summary (``turns[i]`` is turn ``first_turn + i``)."""

    version: int
    state: Any
    summary: Summary | None
    turns: list[dict[str, Any]]
    first_turn: int
    ticket: int


@dataclass(frozen=True)
class Waiting:
    """The task waits behind ``head`` (the live holder, or the queue's head), ``ahead`` queued before it."""

    head: str
    ahead: int
    ticket: int


@dataclass(frozen=True)
class Applied:
    """The task's update was applied before: a replay, run nothing."""

    version: int


@dataclass(frozen=True)
class WrongKind:
    """The session belongs to ``kind``."""

    kind: str


@dataclass(frozen=True)
class WrongTenant:
    """The session belongs to ``tenant``."""

    tenant: str


@dataclass(frozen=True)
class SessionRecord:
    """A session as stored: ``holder`` None when nobody holds it; ``queue`` head first; ``ttl_s`` left;
    ``turns[i]`` is turn ``first_turn + i`` (the turns before it were summarised and dropped)."""

    id: str
    kind: str
    version: int
    state: Any
    summary: Summary | None
    turns: list[dict[str, Any]]
    holder: str | None
    holder_fence: int
    holder_until_ms: int
    queue: list[str]
    ttl_s: int
    tenant: str = DEFAULT_TENANT
    first_turn: int = 0


@dataclass(frozen=True)
class Listed:
    """A listed session and when it last changed (ms)."""

    id: str
    updated_ms: int


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _summary(raw: Any) -> Summary | None:
    text = _s(raw) if raw is not None else ""
    if not text:
        return None
    data = json.loads(text)
    return Summary(upto=int(data["upto"]), text=str(data["text"]))


def _whole(name: str, value: int, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be a whole number from {least}, not {value!r}")
    return value


def _task(task_id: str) -> str:
    if not is_valid_task_key(task_id):
        raise ValueError(f"invalid task id {task_id[:80]!r}")
    return task_id


class Sessions:
    """The sessions of a ledger (its client, keys and error translation). ``marks_max``: the applied
    marks kept per session (the newest; a replay of a task applied before them runs as a new arrival);
    ``turns_max``: the turns a summary covers that stay stored (the newest; the turns after it always stay)."""

    marks_max: int = MARKS_MAX
    turns_max: int = TURNS_MAX

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        client = ledger.client
        self._enter = client.register_script(scripts.ENTER)
        self._renew = client.register_script(scripts.RENEW)
        self._apply = client.register_script(scripts.APPLY)
        self._leave = client.register_script(scripts.LEAVE)
        self._summarize = client.register_script(scripts.SUMMARIZE)
        self._put = client.register_script(scripts.PUT)
        self._delete = client.register_script(scripts.DELETE)

    def _keys(self, session_id: str) -> list[str]:
        keys = self.ledger.keys
        return [keys.session(session_id), keys.session_queue(session_id), keys.session_turns(session_id),
                keys.session_applied(session_id)]

    async def _listed(self, session_id: str) -> None:
        """List the session as changed now: best effort (the session's own write is done)."""
        key = self.ledger.keys.sessions()
        client = self.ledger.client

        async def write() -> None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {session_id: int(time.time() * 1000)})
                pipe.zremrangebyrank(key, 0, -LISTING_MAX - 1)
                await pipe.execute()

        try:
            await self.ledger.redis_call(write)
        except LedgerUnavailable as exc:
            log.warning("session %s not listed: %s", session_id, exc)

    async def enter(self, session_id: str, kind: str, task_id: str, fence: int, lease_ms: int, *,
                    ttl_s: int = DEFAULT_TTL_S, stall_ms: int = DEFAULT_STALL_MS,
                    tenant: str = DEFAULT_TENANT) -> Entered | Waiting | Applied | WrongKind | WrongTenant:
        """Take the task's ticket (once per task id) and hold the session when it is its turn (see the
        module's doc). :class:`StaleFence` when a newer fence of this task entered."""
        keys = self._keys(session_id)
        if not is_valid_tenant(tenant):
            raise ValueError(f"invalid tenant {tenant[:80]!r}")
        raw = await self.ledger.run_script(self._enter, keys, [
            kind, _task(task_id), _whole("fence", fence, 0), _whole("lease_ms", lease_ms, 1),
            _whole("ttl_s", ttl_s, 1), _whole("stall_ms", stall_ms, 0), tenant])
        answer = _s(raw[0])
        if answer == "wrong_tenant":
            return WrongTenant(tenant=_s(raw[1]))
        if answer == "wrong_kind":
            return WrongKind(kind=_s(raw[1]))
        if answer == "applied":
            return Applied(version=int(raw[1]))
        if answer == "stale":
            raise StaleFence(f"session {session_id}: task {task_id} entered under fence {_s(raw[1])}, not {fence}")
        if answer == "waiting":
            return Waiting(head=_s(raw[1]), ahead=int(raw[2]), ticket=int(raw[3]))
        await self._listed(session_id)  # a task begins: the session changes (a waiter's poll does not list it)
        state = _s(raw[2])
        return Entered(version=int(raw[1]), state=json.loads(state) if state else None, summary=_summary(raw[3]),
                       turns=[json.loads(_s(t)) for t in raw[4]], first_turn=int(raw[5]), ticket=int(raw[6]))

    async def renew(self, session_id: str, task_id: str, fence: int, lease_ms: int) -> bool:
        """Extend the holder's lease: whether the task holds the session under ``fence``."""
        raw = await self.ledger.run_script(self._renew, self._keys(session_id), [
            _task(task_id), _whole("fence", fence, 0), _whole("lease_ms", lease_ms, 1)])
        return int(raw) == 1

    async def apply(self, session_id: str, task_id: str, fence: int, read_version: int,
                    turn: Mapping[str, Any] | None = None, state: Any = None) -> Applying:
        """Apply the task's update once: append ``turn``, set ``state`` (None: left as it is), when the
        version is ``read_version`` (see the module's doc for the answers)."""
        if turn is None and state is None:
            raise ValueError("an update is a turn or a state, or both")
        raw = await self.ledger.run_script(self._apply, self._keys(session_id), [
            _task(task_id), _whole("fence", fence, 0), _whole("read_version", read_version, 0),
            _dumps(dict(turn)) if turn is not None else "", _dumps(state) if state is not None else "",
            _whole("marks_max", self.marks_max, 1)])
        answer: Applying = _s(raw[0])  # type: ignore[assignment]
        if answer == "ok":
            await self._listed(session_id)
        return answer

    async def leave(self, session_id: str, task_id: str, fence: int | None = None) -> Leaving:
        """The task ended without an update: out of the queue, the session freed if it held it.
        ``fence`` None: whichever run of the task."""
        fenced = "" if fence is None else _whole("fence", fence, 0)
        raw = await self.ledger.run_script(self._leave, self._keys(session_id), [_task(task_id), fenced])
        answer: Leaving = _s(raw)  # type: ignore[assignment]
        return answer

    async def summarize(self, session_id: str, upto: int, text: str, read_version: int) -> bool:
        """Store the summary of turns ``[0, upto)`` if it covers more than the stored one: whether it did."""
        summary = _dumps({"upto": _whole("upto", upto, 1), "text": text})
        raw = await self.ledger.run_script(self._summarize, self._keys(session_id), [
            upto, summary, _whole("read_version", read_version, 0), _whole("turns_max", self.turns_max, 0)])
        return int(raw) == 1

    async def put(self, session_id: str, version: int, *, state: Any = None,
                  turns: Sequence[Mapping[str, Any]] | None = None) -> Putting:
        """Replace the state or the turns when the session is at ``version`` (``conflict`` otherwise,
        nothing changed; ``missing``: no such session)."""
        if (state is None) == (turns is None):
            raise ValueError("a correction sets the state or turns, one of them")
        what = ["state", _dumps(state)] if turns is None else ["turns", *(_dumps(dict(t)) for t in turns)]
        raw = await self.ledger.run_script(self._put, self._keys(session_id), [_whole("version", version, 0), *what])
        answer: Putting = _s(raw[0])  # type: ignore[assignment]
        if answer == "ok":
            await self._listed(session_id)
        return answer

    async def get(self, session_id: str) -> SessionRecord | None:
        """The session as stored, or None."""
        keys = self._keys(session_id)
        client = self.ledger.client

        async def read() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys[0])
                pipe.zrange(keys[1], 0, -1)
                pipe.lrange(keys[2], 0, -1)
                pipe.ttl(keys[0])
                return await pipe.execute()

        raw, queue, turns, ttl = await self.ledger.redis_call(read)
        fields = {_s(k): _s(v) for k, v in raw.items()}
        if "kind" not in fields:
            return None
        state = fields.get("state", "")
        return SessionRecord(
            id=session_id, kind=fields["kind"], version=int(fields.get("version", 0)),
            state=json.loads(state) if state else None, summary=_summary(fields.get("summary")),
            turns=[json.loads(_s(t)) for t in turns], holder=fields.get("holder") or None,
            holder_fence=int(fields.get("holder_fence", 0)), holder_until_ms=int(fields.get("holder_until", 0)),
            queue=[_s(q) for q in queue], ttl_s=int(ttl), tenant=fields.get("tenant") or DEFAULT_TENANT,
            first_turn=int(fields.get("base") or 0))

    async def delete(self, session_id: str) -> bool:
        """Erase the session: its content and its listing, the epoch moved on (see the module's doc).
        Whether there was one."""
        erased = await self.ledger.run_script(self._delete, self._keys(session_id), [])
        client = self.ledger.client
        await self.ledger.redis_call(lambda: client.zrem(self.ledger.keys.sessions(), session_id))
        return int(erased) == 1

    async def list(self, limit: int = 100) -> list[Listed]:
        """The most recently changed sessions, newest first (erased and expired ones dropped)."""
        key = self.ledger.keys.sessions()
        client = self.ledger.client
        raw: Any = await self.ledger.redis_call(lambda: client.zrevrange(key, 0, _whole("limit", limit, 1) - 1,
                                                                    withscores=True))
        listed = [Listed(id=_s(member), updated_ms=int(score)) for member, score in raw]
        if not listed:
            return []

        async def alive() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for entry in listed:
                    pipe.hexists(self.ledger.keys.session(entry.id), "kind")  # a tombstone is none
                return await pipe.execute()

        flags = await self.ledger.redis_call(alive)
        gone = [entry.id for entry, flag in zip(listed, flags, strict=True) if not flag]
        if gone:
            await self.ledger.redis_call(lambda: client.zrem(key, *gone))
        return [entry for entry, flag in zip(listed, flags, strict=True) if flag]
