"""The dedup ledger: one record per unit of work, guarded by leases and fencing tokens.

States: ``running(fence, lease_until, owner)`` -> ``succeeded(result, digest, fence)`` |
``waiting_approval(waiting)`` | ``waiting_children(waiting)`` -> ``resuming`` (claimable;
:mod:`dedup.effects`, :mod:`dedup.children`) |
``failed(error)`` (reclaimable) -> ``dead(reason)``: the table :data:`dedup.lifecycles.task.TASK`,
which hands each script that moves a state the states its event starts from and the one it leads to.
Who published an outcome is the fields ``published_by`` and ``published_how`` (:mod:`dedup.scripts`
lists the hash's fields; :mod:`dedup.records` reads them, a ledger of the previous version's too).

A claim on a new task, or on a ``running`` task whose lease expired, or on a ``failed`` one, hands
out a fence one higher than any before it. A holder whose lease ran out while a model call of the
task was under way died in it (or froze): that attempt is given back and the death is counted apart
(``deaths``); the ``max_deaths``-th ends the task as ``dead(crashed)``. A task past its deadline
while another worker holds it ends as ``dead(expired)`` under a higher fence (:meth:`Ledger.expire`). Every later write carries that fence and is refused
when a newer claim exists: a stale worker can never overwrite a newer result, and the first
completion wins. A task never claimed whose parent cancelled it (a mark ``agent:{k}:cancel``) is
not run: its claim ends it ``dead(cancelled)`` (decision ``cancelled``). Redis errors are translated to :class:`LedgerUnavailable` here
(:func:`dedup.errors.translate`).

This module knows nothing of Kafka or of models.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from dedup import scripts
from dedup.batch import ScriptBatcher
from dedup.children import Children
from dedup.client import RedisClient, eviction_risk
from dedup.effects import Effects
from dedup.errors import (
    AttemptsExhausted,
    LedgerError,
    LedgerRefused,
    LedgerUnavailable,
    StaleFence,
    is_outage_reply,
    translate,
)
from dedup.first_attempts import FirstAttempts
from dedup.keys import Keys
from dedup.lifecycles.machine import Lifecycle
from dedup.lifecycles.task import PARKED, TASK, WAITING_CHILDREN
from dedup.moves import Moves
from dedup.records import (
    HOWS,
    Attempt,
    Claim,
    Completion,
    Decision,
    PublishedHow,
    Renewal,
    TaskRecord,
    publication,
)
from dedup.schedules import Schedules
from dedup.seen import Seen
from dedup.sessions import Sessions

__all__ = ["Attempt", "AttemptsExhausted", "Claim", "Completion", "Decision", "Ledger", "LedgerError",
           "LedgerRefused", "LedgerUnavailable", "PublishedHow", "Renewal", "StaleFence", "TaskRecord"]

T = TypeVar("T")


# a claim finding a state it does not move from
_ANSWERS: dict[str, Decision] = {PARKED: "parked", WAITING_CHILDREN: "parked"}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Ledger:
    """Async ledger over one Redis client (standalone or cluster: keys are hash-tagged)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        keys: Keys | None = None,
        lease_ms: int = 30_000,
        ttl_s: int = 7 * 24 * 3600,
        wait_replicas: int = 0,
        wait_aof: bool = False,
        wait_timeout_ms: int = 1000,
        max_deaths: int = 3,
        lifecycle: Lifecycle = TASK,
    ) -> None:
        self.client = client
        # the table a task's state is moved by: each moving script is handed its sources and target
        self.moves = Moves(lifecycle)
        claim_moves = [*self.moves("claim", "take_over", "crash", "cancel"), lifecycle.initial]  # baked in
        self.done_states = self._done = self.moves.sources("publish")  # whose outcome is published: done
        self.max_deaths = max_deaths  # deaths of holders with a call under way that end a task `crashed`
        # this process's claims, apart from another's under the same worker id: a task this process
        # claims again (it retries the record) did not lose its holder
        self.holder = uuid.uuid4().hex[:16]
        self.wait_replicas = wait_replicas
        self.wait_aof = wait_aof
        self.wait_timeout_ms = wait_timeout_ms
        self.keys = keys or Keys()
        self.lease_ms = lease_ms
        self.ttl_s = ttl_s
        self._claim = client.register_script(scripts.claim_script(scripts.CLAIM, claim_moves))
        self._claim_attempt = client.register_script(scripts.claim_script(scripts.CLAIM_ATTEMPT, claim_moves))
        self.first_attempts = FirstAttempts(lease_ms)  # counted by a claim, not taken by a call yet
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._attempt = client.register_script(scripts.ATTEMPT)
        self._step = client.register_script(scripts.STEP)
        self._complete = client.register_script(scripts.COMPLETE)
        self._fail = client.register_script(scripts.FAIL)
        self._mark = client.register_script(scripts.MARK)
        self._refund = client.register_script(scripts.REFUND)
        self._end = client.register_script(scripts.END)
        self._expire = client.register_script(scripts.EXPIRE)
        self._touch = client.register_script(scripts.TOUCH)
        self._revive = client.register_script(scripts.REVIVE)
        self._finished = client.register_script(scripts.FINISHED)
        self.batcher = ScriptBatcher(client)
        self.effects = Effects(self)
        self.children = Children(self)
        self.schedules = Schedules(self)
        self.sessions = Sessions(self)
        self.seen = Seen(self)  # which task a record's bytes name (:mod:`dedup.seen`)

    async def redis_call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; a failure is raised as the ledger's error (:func:`translate`)."""
        try:
            return await op()
        except Exception as exc:
            translate(exc)
            raise

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run one ledger script, pipelined with the others issued in this loop turn (awaited here
        directly: every coroutine frame between a task and its script's result is resumed on each wake-up)."""
        try:
            return await self.batcher.run(script, keys, args)
        except Exception as exc:
            translate(exc)
            raise

    def _both(self, task_key: str) -> list[str]:
        return [self.keys.task(task_key), self.keys.steps(task_key)]

    async def pin_definition(self, name: str, version: str, definition_digest: str) -> str | None:
        """Record ``definition_digest`` as what ``name`` at ``version`` means, once and for ever
        (SET NX, no expiry). Returns the digest recorded before when it differs, else None."""
        key = self.keys.definition(name, version)

        async def pin() -> str | None:
            if await self.client.set(key, definition_digest, nx=True):
                return None
            recorded = await self.client.get(key)
            if recorded is None:  # never deleted by the service; an operator may have: pin again
                await self.client.set(key, definition_digest, nx=True)
                return None
            text = _s(recorded)
            return None if text == definition_digest else text

        return await self.redis_call(pin)

    async def ping(self) -> bool:
        return bool(await self.redis_call(self.client.ping))

    async def claim(self, task_key: str, fingerprint: str, owner: str, kind: str, *,
                    parent: tuple[str, str, int] | None = None, first_attempt: tuple[str, int] | None = None,
                    seen: str | None = None) -> Claim:
        """Claim the task: ``claimed`` with its fence, or what keeps it from running (``busy``,
        ``conflict``, ``succeeded``, ``dead``, ``parked``, ``crashed``, ``cancelled``: never claimed
        and marked cancelled by its parent, now ``dead(cancelled)``). A child's ``parent`` (id, step,
        n) is kept in its hash by the claim that creates it (``parent``, ``parent_step``, ``parent_n``).
        ``first_attempt`` (step, max attempts): a claim that holds the task counts the step's first
        attempt with it, which the step's first :meth:`begin_attempt` takes (:mod:`dedup.first_attempts`).
        ``seen``: the mark of the record that asks (:meth:`Seen.key <dedup.seen.Seen.key>`), which the
        claim keeps: a replay of the record then finds its task without decoding it."""
        args = [fingerprint, owner, self.lease_ms, kind, self.ttl_s, self.max_deaths, self.holder,
                *(first_attempt or ()), *(parent or ())]
        script = self._claim if first_attempt is None else self._claim_attempt
        keys = [*self._both(task_key), self.keys.cancel(task_key)]
        raw = await self.run_script(script, keys if seen is None else [*keys, seen], args)
        answer = _s(raw[0])
        if first_attempt is not None and len(raw) > 7:
            self.first_attempts.keep(task_key, int(raw[1]), first_attempt[0], int(raw[6]), int(raw[7]))
        by, how = publication(raw[4], raw[5])
        return Claim(decision=_ANSWERS.get(answer, answer),  # type: ignore[arg-type]
                     fence=int(raw[1]), attempts=int(raw[2]), lease_remaining_ms=int(raw[3]),
                     published_by=by, published_how=how)

    async def heartbeat(self, task_key: str, fence: int) -> bool:
        """Extend the lease; False when ``fence`` does not hold a running task (any more)."""
        return await self.renew(task_key, fence) == "renewed"

    async def renew(self, task_key: str, fence: int) -> Renewal:
        """Extend the lease: ``renewed``; ``done`` when the task is no longer running under this very
        fence (its holder completed, failed or parked it: nothing was lost); ``lost`` when a newer
        fence holds it or it is gone."""
        raw = int(await self.run_script(self._heartbeat, [self.keys.task(task_key)], [fence, self.lease_ms]))
        return "renewed" if raw == 1 else "done" if raw == 2 else "lost"

    async def begin_attempt(self, task_key: str, fence: int, step: str, max_attempts: int) -> Attempt:
        """Count one model call against the task and step before making it.

        The call stays open until its outcome is known (the step's next attempt, :meth:`end_attempt`,
        :meth:`refund_attempt`, :meth:`record_step`, or the task's end): should the holder die before,
        the claim that takes the task over gives the attempt back and counts a death instead.

        Raises :class:`StaleFence` when a newer claim holds the task, and :class:`AttemptsExhausted`
        when the step already used ``max_attempts`` (then nothing is counted).
        """
        kept = self.first_attempts.take(task_key, fence, step)
        if kept is not None and self.first_attempts.fresh(kept):
            step_attempts, total = kept.step_attempts, kept.total
        else:
            if kept is not None and kept.step_attempts > 0:  # the lease may be lost since: count anew
                await self.refund_attempt(task_key, fence, step)
            raw = await self.run_script(self._attempt, [self.keys.task(task_key)], [fence, self.lease_ms, step, max_attempts])
            step_attempts, total = int(raw[0]), int(raw[1])
        if step_attempts == -1:
            raise StaleFence(f"task {task_key}: fence {fence} no longer holds the task")
        if step_attempts == -2:
            raise AttemptsExhausted(total)
        return Attempt(step=step_attempts, total=total)

    async def refund_attempt(self, task_key: str, fence: int, step: str) -> bool:
        """Give back the attempt counted for a call the endpoint failed for every task (once: a
        second refund of the same call gives nothing back). False when the fence is stale."""
        raw = await self.run_script(self._refund, [self.keys.task(task_key)], [fence, step])
        return int(raw) == 1

    async def give_back_first_attempt(self, task_key: str, fence: int) -> None:
        """Give back the attempt the claim under ``fence`` counted, when no call took it."""
        if (kept := self.first_attempts.drop(task_key, fence)) is not None:
            await self.refund_attempt(task_key, fence, kept.step)

    async def end_attempt(self, task_key: str, fence: int, step: str) -> bool:
        """The step's call failed by the task's own fault (its outcome is known): the attempt stays
        spent even if the holder dies before the next one. False when the fence is stale."""
        raw = await self.run_script(self._end, [self.keys.task(task_key)], [fence, step])
        return int(raw) == 1

    async def expire(self, task_key: str, fence: int, error: str) -> tuple[str, int]:
        """End a task that another worker holds under ``fence`` as ``dead(expired)``, under a higher
        fence so that the holder's later writes are refused. Returns ``("ok", new fence)``, or the
        task's state and fence when it moved on (completed, released, claimed again): nothing changed."""
        raw = await self.run_script(self._expire, [self.keys.task(task_key)], [fence, error[:2000], *self.moves("expire")])
        return _s(raw[0]), int(raw[1])

    async def confirm_replicated(self, task_key: str, state: str = "succeeded") -> None:
        """With ``wait_replicas`` (or ``wait_aof``), return only once the replicas hold the task's
        outcome: a write and WAIT on one connection (replicas apply writes in order). Too few
        acknowledgements raise :class:`LedgerUnavailable`. Without, it returns at once.

        For an outcome stored by an earlier attempt whose own WAIT may have failed: its retry finds
        the task done and must not publish before the replicas hold it."""
        if not self.durable:
            return
        _raw, acked = await self.redis_call(lambda: self._then_wait(self._touch, [self.keys.task(task_key)], [state]))
        self._check_replicated(acked)

    async def dead_lettered(self, topic: str, partition: int, offset: int) -> str | None:
        """The note of the dead letter the record at these coordinates was given, once the broker
        acknowledged it (:meth:`note_dead_letter`: its ``dlq.id``, then where it was written), or None."""
        raw = await self.redis_call(lambda: self.client.get(self.keys.dead_letter(topic, partition, offset)))
        return _s(raw) if raw is not None else None

    async def note_dead_letter(self, topic: str, partition: int, offset: int, dlq_id: str) -> None:
        """Note that the record at these coordinates was dead-lettered (acknowledged by the broker):
        the record read again (its offset not committed before a crash) sends no second one.
        ``dlq_id``: the letter's ``dlq.id``, then where it was written (for the ``failed`` event)."""
        key = self.keys.dead_letter(topic, partition, offset)
        await self.redis_call(lambda: self.client.set(key, dlq_id, ex=self.ttl_s))

    async def record_step(self, task_key: str, fence: int, name: str, record: dict[str, Any]) -> None:
        record_json = json.dumps(record, sort_keys=True, separators=(",", ":"))
        raw = await self.run_script(self._step, self._both(task_key), [fence, name, record_json])
        if _s(raw) != "ok":
            raise StaleFence(f"task {task_key}: step {name} refused for fence {fence}")

    async def generation(self, task_key: str) -> int:
        """How many times the task was started anew after a compensation, plus one."""
        raw = await self.redis_call(lambda: self.client.hget(self.keys.task(task_key), "generation"))
        return int(_s(raw)) if raw is not None else 1

    async def steps(self, task_key: str) -> dict[str, dict[str, Any]]:
        raw = await self.redis_call(lambda: self.client.hgetall(self.keys.steps(task_key)))
        return {_s(k): json.loads(_s(v)) for k, v in raw.items()}

    async def complete(
        self,
        task_key: str,
        fence: int,
        *,
        result: str,
        digest: str,
        event: bytes,
        model: str,
        prompt_version: str,
        endpoint: str | None = None,
        staged_by: str | None = None,
    ) -> Completion:
        """First writer wins; a write under an older fence is refused (``stale``).

        ``endpoint``: the fallback endpoint that answered (``model`` is then its model); the record
        is marked ``degraded`` with it. ``staged_by``: the coordinates of the record whose transaction
        stages the outcome: a result written is marked published by it, staged, in the same script.

        With ``wait_replicas`` (and ``wait_aof``) it returns only once replicas (and AOFs) hold the
        write; too few acknowledgements within ``wait_timeout_ms`` raise :class:`LedgerUnavailable`:
        the result is then neither published nor its offset committed, and the record is retried (its
        claim finds the stored result and re-emits it, byte for byte).
        """
        keys = self._both(task_key)
        args = [fence, result, digest, event, model, prompt_version, self.ttl_s, endpoint or "", *self.moves("complete"),
                staged_by or ""]
        if self.durable:
            raw, acked = await self.redis_call(lambda: self._then_wait(self._complete, keys, args))
        else:
            raw, acked = await self.run_script(self._complete, keys, args), None
        done = Completion(status=_s(raw[0]), fence=int(raw[1]), digest=_s(raw[2]),  # type: ignore[arg-type]
                          marked=len(raw) > 3 and int(raw[3]) == 1)
        if self.durable and (done.status == "ok" or (done.status == "already" and done.fence == fence)):
            self._check_replicated(acked)
        return done

    @property
    def durable(self) -> bool:
        return self.wait_replicas > 0 or self.wait_aof

    async def _then_wait(self, script: AsyncScript, keys: list[str], args: list[Any]) -> tuple[Any, Any]:
        """The script, then WAIT (or WAITAOF) in one pipeline, so on the connection that wrote.

        WAIT counts the replicas holding *this connection's* writes: on another pooled connection it
        would answer at once, whatever the replicas have.
        """
        wait: tuple[Any, ...] = (("WAITAOF", 1, self.wait_replicas, self.wait_timeout_ms) if self.wait_aof
                                 else ("WAIT", self.wait_replicas, self.wait_timeout_ms))
        # a cluster sends each node's share of a pipeline on one connection: WAIT goes to the key's node
        where: dict[str, Any] = ({"target_nodes": self.client.get_node_from_key(keys[0])}
                                 if isinstance(self.client, RedisCluster) else {})
        for _ in range(2):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                pipe.execute_command(*wait, **where)
                raw, acked = await pipe.execute(raise_on_error=False)
            if isinstance(raw, NoScriptError):  # flushed or restarted: load it and send both again
                await self.client.script_load(script.script)
                continue
            for reply in (raw, acked):
                if isinstance(reply, Exception):
                    if isinstance(reply, ResponseError) and is_outage_reply(reply):
                        await self.batcher.refresh_slots()  # the WAIT went to a node that is no primary now
                    raise reply
            return raw, acked
        raise LedgerUnavailable("redis forgot the script again right after loading it")

    def _check_replicated(self, acked: Any) -> None:
        if self.wait_aof:
            local, replicas = (int(x) for x in acked)
            if local < 1 or replicas < self.wait_replicas:
                raise LedgerUnavailable(f"WAITAOF: fsynced locally {local}, on {replicas} of "
                                        f"{self.wait_replicas} replicas within {self.wait_timeout_ms} ms")
        elif int(acked) < self.wait_replicas:
            raise LedgerUnavailable(f"WAIT: {acked} of {self.wait_replicas} replicas acknowledged the result "
                                    f"within {self.wait_timeout_ms} ms")

    async def check_durability(self) -> str | None:
        """Why Redis may lose ledger keys on its own, or None (:func:`dedup.client.eviction_risk`)."""
        return await eviction_risk(self.client)

    async def fail(self, task_key: str, fence: int, error: str, dead_reason: str = "") -> bool:
        """Release the claim as ``failed`` (reclaimable) or, with a reason, mark it ``dead``."""
        moves = self.moves("die" if dead_reason else "fail")
        raw = await self.run_script(self._fail, [self.keys.task(task_key)], [fence, error[:2000], dead_reason, *moves])
        return _s(raw) == "ok"

    async def mark_published(self, task_key: str, state: str, by: str = "1",
                             how: PublishedHow | None = None) -> bool:
        """Note that the outcome of ``task_key`` (in ``state``) was published, ``by`` which record, and
        ``how``: ``staged`` in a transaction before the send, ``acked`` after the broker's
        acknowledgement (None: not said; ``published_how`` is then absent, never a guess). False when
        the task is not in ``state``, or ``state`` is none whose outcome is published."""
        if how is not None and how not in HOWS:
            raise ValueError(f"published how: {how!r} is none of {HOWS}")
        raw = await self.run_script(self._mark, [self.keys.task(task_key)], [state, by, how or "", self._done])
        return int(raw) == 1

    async def finished(self, tasks: Sequence[tuple[str, str, str]]) -> list[bool]:
        """For each ``(task key, fingerprint, coordinates)``: whether the task is done (succeeded or
        dead) with that fingerprint and its outcome was published by a record other than the one
        at ``coordinates`` (that record read again may be one whose transaction did not commit;
        ``""``: any record).

        Read-only, for many tasks at once: one script on a single Redis, one pipeline (a command
        per task, grouped by node) on a cluster, where one script cannot read across slots."""
        if not tasks:
            return []
        keys = [self.keys.task(key) for key, _fp, _at in tasks]
        if not isinstance(self.client, RedisCluster):
            args = [" ".join(fp for _key, fp, _at in tasks), " ".join(at or "-" for _key, _fp, at in tasks), self._done]
            return [flag == 1 for flag in await self.redis_call(lambda: self._finished(keys=keys, args=args))]

        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, "state", "fingerprint", "published_by", "published_how", "published")
                return await pipe.execute()

        done = self._done.split()
        out: list[bool] = []
        for (_key, fp, at), (state, print_, *published) in zip(tasks, await self.redis_call(read), strict=True):
            by, _how = publication(*published)
            out.append(state is not None and _s(state) in done and _s(print_) == fp and by is not None and by != at)
        return out

    async def revive(self, task_key: str) -> bool:
        raw = await self.run_script(self._revive, [self.keys.task(task_key), self.keys.tools(task_key)], self.moves("revive"))
        return int(raw) == 1

    async def get(self, task_key: str) -> TaskRecord | None:
        async def read() -> tuple[dict[Any, Any], dict[Any, Any]]:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.keys.task(task_key))
                pipe.hgetall(self.keys.steps(task_key))
                task, steps = await pipe.execute()
            return task, steps

        task, steps = await self.redis_call(read)
        if not task:
            return None
        return TaskRecord.read(task_key, {_s(k): _s(v) for k, v in task.items()},
                               {_s(k): json.loads(_s(v)) for k, v in steps.items()})
