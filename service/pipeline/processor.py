"""The per-record pipeline: decode -> claim -> run the agent -> fenced complete -> publish.

It is the one writer of durable state for a record: the ledger, the results topic and the
dead-letter topic. It returns only when the record's outcome is durable (a result in the ledger and
on the results topic, or an acknowledged dead letter); the runner then lets its offset be committed.
It raises only when Redis or the broker did not answer, and the runner retries the record.

The processor is composed of collaborators, each a plain object owning its state, handed in by
:meth:`TaskProcessor.build`:

    claims     (:mod:`~service.pipeline.claim`)      the ledger's decision, busy waits; owns ``duplicates``
    steps      (:mod:`~service.pipeline.steps`)      the agent's step graph, one run per task
    calls      (:mod:`~service.pipeline.calls`)      one step's model calls: attempts, refunds, back-off
    capacity   (:mod:`~service.pipeline.capacity`)   budget, endpoint choice, window slot; the endpoints
    outcomes   (:mod:`~service.pipeline.outcomes`)   result or dead letter, published; a parking
    sessions   (:mod:`~service.pipeline.sessions`)   a task's session: its turn, its lease, its update
    shadow     (:mod:`~service.pipeline.shadow`)     the sampled duplicates run again

The processor itself owns the record's retries and ``outage`` (Redis or the broker did not answer).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from time import monotonic
from typing import Any, Self

from pydantic import BaseModel

from consumers.producers import Outputs, ProduceFailed, RecordRejected
from consumers.records import Record
from dedup.leases import LeaseKeeper
from dedup.ledger import Claim, Ledger, LedgerUnavailable
from service.agents.base import Agent
from service.agents.registry import AgentRegistry
from service.agents.session import SessionView
from service.agents.tasks import Task, header
from service.core.errors import InfrastructureError, PoisonError
from service.core.log_context import bind_task, enter_record, leave_record
from service.core.metrics import Metrics
from service.core.schema_registry import RegistryUnavailable
from service.core.tracing import Tracing
from service.llm.endpoints import PRIMARY, Endpoint
from service.llm.guard import EndpointGuard, RateLimiter
from service.llm.tenancy import Tenancy, TenantBudgets
from service.llm.window import AdaptiveWindow
from service.pipeline.base import (
    ChatClient,
    LostFence,
    Parked,
    ProcessorConfig,
    ToDeadLetter,
    current_span,
    reset_record_span,
    set_record_span,
    utcnow,
)
from service.pipeline.calls import CallLoop
from service.pipeline.capacity import Capacity
from service.pipeline.claim import Claims
from service.pipeline.decode import decode_record, key_of, read_task
from service.pipeline.outcomes import Outcomes
from service.pipeline.screen import ReplayScreen
from service.pipeline.sessions import Replay, SessionGate, Update
from service.pipeline.shadow import Shadow
from service.pipeline.steps import Steps
from service.pipeline.waits import Waits

log = logging.getLogger(__name__)

NONE: dict[str, tuple[str, str]] = {}  # no step answered by a fallback


@dataclass
class Held:
    """The task a record claimed last, under which fence: the ``internal`` dead letter leaves its
    session (a record that never claimed its task leaves nothing: another worker may hold it)."""

    task: Task | None = None
    fence: int = 0


class TaskProcessor:
    """One record in, its outcome durable out: the consumer's handler.

    Owns ``outage``, the record's internal retries and the leases it keeps while a task runs; the
    rest is its collaborators' (see the module docstring), which it only calls by their public
    names. ``outputs``, ``waits``, ``primary``, ``fallbacks``, ``guard`` and ``budgets`` are theirs,
    read through it by the runtime and the API."""

    def __init__(self, *, claims: Claims, steps: Steps, outcomes: Outcomes, capacity: Capacity, shadow: Shadow,
                 ledger: Ledger, agents: AgentRegistry, metrics: Metrics, config: ProcessorConfig,
                 clock: Callable[[], datetime], tracing: Tracing, sessions: SessionGate | None = None) -> None:
        self.claims = claims
        self.sessions = sessions or SessionGate(ledger=ledger, agents=agents, metrics=metrics, config=config,
                                                clock=clock)
        self.steps = steps
        self.outcomes = outcomes
        self.capacity = capacity
        self.shadow = shadow
        self.ledger = ledger
        self.leases = LeaseKeeper(ledger)
        self.agents = agents
        self.metrics = metrics
        self._config = config
        self.clock = clock
        self.tracing = tracing
        self.outage: str | None = None  # Redis or the broker did not answer the last record that tried

    @classmethod
    def build(
        cls,
        *,
        ledger: Ledger,
        agents: AgentRegistry,
        llm: ChatClient,
        outputs: Outputs,
        metrics: Metrics,
        config: ProcessorConfig,
        worker_id: str,
        model_name: str,
        clock: Callable[[], datetime] = utcnow,
        guard: EndpointGuard | None = None,
        tracing: Tracing | None = None,
        limiter: RateLimiter | None = None,
        tenancy: Tenancy | None = None,
        budgets: TenantBudgets | None = None,
        primary_url: str = "",
        fallbacks: tuple[Endpoint, ...] = (),
        unavailable: str = "wait",
        replicas: tuple[Endpoint, ...] = (),
        window: AdaptiveWindow | None = None,
    ) -> Self:
        """The processor and its collaborators. ``fallbacks``: the endpoints a kind whose policy is
        ``fallback`` calls while the primary (``llm``, ``guard``, ``limiter``, ``window`` at
        ``primary_url``) is unavailable; ``unavailable``: the policy of a kind that sets none; ``replicas``:
        the primary's model at other endpoints (a step's calls go where its prompt cache key says)."""
        tracing = tracing or Tracing.disabled()
        metrics.name_models(agents.kinds(), (PRIMARY, *(e.name for e in (*replicas, *fallbacks))))  # the latency's labels
        waits = Waits()  # every record that waits here, why and until when
        capacity = Capacity(
            primary=Endpoint(PRIMARY, primary_url, llm, guard, limiter, window=window), fallbacks=fallbacks,
            agents=agents, default_unavailable=unavailable,
            tenancy=tenancy or Tenancy(),  # the tenants' weights, budgets, labels and prices
            budgets=budgets, waits=waits, metrics=metrics, config=config, clock=clock, model_name=model_name,
            replicas=replicas)
        outcomes = Outcomes(ledger=ledger, outputs=outputs, metrics=metrics, tracing=tracing, clock=clock,
                            model_name=model_name, fallbacks=fallbacks, config=config)
        calls = CallLoop(ledger=ledger, capacity=capacity, waits=waits, metrics=metrics, config=config, clock=clock,
                         tracing=tracing, model_name=model_name, worker_id=worker_id, audit=outcomes.export_audit)
        sessions = SessionGate(ledger=ledger, agents=agents, metrics=metrics, config=config, clock=clock)
        return cls(
            claims=Claims(ledger=ledger, outcomes=outcomes, outputs=outputs, metrics=metrics, config=config,
                          worker_id=worker_id, clock=clock, sessions=sessions), sessions=sessions,
            # the publisher is looked up when a child is sent: a processor built without one never delegates
            steps=Steps(calls, lambda *record: outputs.publisher.send(*record)), outcomes=outcomes, capacity=capacity,
            shadow=Shadow(ledger=ledger, calls=calls, capacity=capacity, metrics=metrics, config=config),
            ledger=ledger, agents=agents, metrics=metrics, config=config, clock=clock, tracing=tracing,
        )

    @property
    def config(self) -> ProcessorConfig:
        """The processor's settings, the same in every collaborator."""
        return self._config

    @config.setter
    def config(self, config: ProcessorConfig) -> None:
        """New settings reach every collaborator at once."""
        self._config = config
        for part in (self.claims, self.outcomes, self.capacity, self.shadow, self.steps.calls, self.sessions):
            part.config = config

    @property
    def outputs(self) -> Outputs:
        return self.outcomes.outputs

    @property
    def waits(self) -> Waits:
        """Every record of this process that waits, why and until when."""
        return self.capacity.waits

    @property
    def primary(self) -> Endpoint:
        return self.capacity.primary

    @property
    def fallbacks(self) -> tuple[Endpoint, ...]:
        return self.capacity.fallbacks

    @property
    def guard(self) -> EndpointGuard | None:
        return self.capacity.guard

    @property
    def budgets(self) -> TenantBudgets | None:
        return self.capacity.budgets

    async def __call__(self, record: Record) -> None:
        coordinates = (record.topic, record.partition, record.offset)
        with self.tracing.task_span(None, None, coordinates, header(record.headers, "traceparent")) as span:
            token = set_record_span(span)  # what record_span() does, without a generator per record
            fields = enter_record(*coordinates)  # every log line while the record is handled names it
            try:
                await self._process_bounded(record)
            finally:
                leave_record(fields)
                reset_record_span(token)
        # Only once the outcome is durable, from the record's receipt by this process: a try that
        # raised (Redis or the broker did not answer) is retried by the runner with the same record,
        # so the whole wait counts once.
        self.metrics.task_duration.observe(monotonic() - record.received_at)

    def screen(self) -> ReplayScreen | None:
        """The runner's replay screen for this processor, or None when every duplicate must reach
        the handler (shadow runs sample duplicates)."""
        if self.config.shadow_sample_rate:
            return None
        return ReplayScreen(self.ledger, self.metrics, self.claims.duplicates,
                            max_bytes=self.config.max_task_bytes, transactional=self.outputs.transactional)

    @property
    def accepting(self) -> bool:
        """False while the model endpoint cannot serve any task, or Redis or the broker did not
        answer the last record that tried: the runner then pauses consumption (records already
        taken keep retrying, and the first that goes through opens it again).

        A degraded primary pauses consumption only when no loaded kind can do without it: a
        ``fail_fast`` kind (its tasks are dead-lettered at once, not left to age in the topic), or a
        ``fallback`` kind while a fallback endpoint accepts. Tasks of ``wait`` kinds taken meanwhile
        wait in flight for the primary, within the in-flight window."""
        return self.outage is None and self.capacity.accepting()

    def holding(self) -> str | None:
        """What holds records back now, by the name of its mechanism (never an error text): an
        outage of Redis or the broker, a degraded endpoint, an open breaker, a half-open probe out."""
        if self.outage is not None:
            names = {ProduceFailed.__name__: "broker outage", RegistryUnavailable.__name__: "schema registry outage"}
            return names.get(self.outage.partition(":")[0], "redis outage")
        return self.capacity.holding()

    def outage_over(self) -> None:
        """Redis and the broker answer again (asked by a probe, not by a record): consumption may
        resume even when the records that met the outage lost their partitions in a rebalance."""
        if self.outage is not None:
            log.info("Redis and the broker answer again: consumption resumes (%s)", self.outage[:100])
            self.outage = None

    async def _process_bounded(self, record: Record) -> None:
        """Whose fault is a failure, decided in one place.

        - the record's (decoding, validating): :meth:`_process` dead-letters it at once;
        - one task's (400, invalid or truncated output): counted against its attempts in
          :meth:`CallLoop.call_step <service.pipeline.calls.CallLoop.call_step>`; the endpoint's
          (auth, unknown model, unreachable, 429): the breaker and Retry-After wait it out, no
          attempt is spent;
        - Redis, the broker or the Schema Registry did not answer: an :class:`InfrastructureError`; the runner
          retries the record without limit;
        - anything else is a bug of the service's own code (or a record a dependency refuses for
          good): retried ``internal_retries`` times, then dead-lettered as ``internal``.
        """
        failures = 0
        held = Held()  # the task this record claimed last: the internal dead letter leaves its session
        while True:
            try:
                await self._process(record, held)
                self.outage = None
                return
            except (LedgerUnavailable, ProduceFailed) as exc:
                self.outage = f"{type(exc).__name__}: {str(exc)[:200]}"
                raise InfrastructureError(str(exc)) from exc
            except RegistryUnavailable as exc:  # no record's fault: every record waits for the registry
                self.outage = f"{type(exc).__name__}: {str(exc)[:200]}"
                raise
            except RecordRejected as exc:  # the broker refuses this outcome for good: retrying cannot help
                self.metrics.internal_errors.inc()
                await self._internal(record, f"the broker refused the outcome record: {str(exc)[:500]}", held)
                return
            except Exception as exc:  # noqa: BLE001 - a bug must end the record, never loop for ever
                failures += 1
                self.metrics.internal_errors.inc()
                error = f"{type(exc).__name__}: {str(exc)[:500]}"
                if failures > self.config.internal_retries:
                    log.error("%s: failed %d times in the service's own code; dead-lettering as internal",
                              record.coordinates, failures, exc_info=exc)
                    await self._internal(record, error, held)
                    return
                log.warning("%s: internal failure %d of %d (%s); retrying", record.coordinates, failures,
                            self.config.internal_retries + 1, error, exc_info=failures == 1)
                await asyncio.sleep(self.config.internal_backoff_s * 2 ** (failures - 1) * random.uniform(0.5, 1.0))

    async def _internal(self, record: Record, error: str, held: Held | None = None) -> None:
        """Dead-letter a record the service's own code could not end (``internal``), and reply to
        its parent if it is a child: the parent must not wait out its deadline for it. A task this
        record claimed ends ``dead`` in the ledger first, as for every other reason (a wait on it
        answers at once), and leaves its session (under its fence: a newer run's hold stays), so
        the next turn enters at once instead of after the stall."""
        task_key = key_of(record, self.config.max_task_bytes)
        task = held.task if held is not None else None
        try:
            if held is not None and task is not None:
                ended = await self._end_internal(task, held.fence, error)
                await self._leave_internal(task, held.fence)
                if ended:  # published as the other dead ends are: a redelivery re-emits, never twice
                    async with self.outcomes.publishing(record, task.key, "dead"):
                        await self._letter_internal(record, task.key, task.kind, error)
                    return
            await self._letter_internal(record, task_key, task.kind if task is not None else None, error)
        except (LedgerUnavailable, ProduceFailed, RegistryUnavailable) as exc:
            self.outage = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise InfrastructureError(str(exc)) from exc

    async def _letter_internal(self, record: Record, task_key: str | None, kind: str | None, error: str) -> None:
        await self.outcomes.dead_letter(record, task_key, "internal", error, 0, kind=kind)
        await self.outcomes.reply(record, task_key, kind or "", "dead", reason="internal", error=error)

    async def _end_internal(self, task: Task, fence: int, error: str) -> bool:
        """End the task ``dead`` (reason ``internal``) under the record's fence, and cancel its
        children not started. False when the ledger refuses (a newer fence holds the task, or it is
        no longer running): the record's dead letter is sent all the same, the ledger left as it is."""
        if not await self.ledger.fail(task.key, fence, error, dead_reason="internal"):
            log.warning("task_id=%s: ends internal; the ledger refused fence %d (a newer fence holds the task, "
                        "or it ended): dead-lettered without ending it", task.key, fence)
            return False
        try:
            await self.outcomes.cancel_children(task.key)
        except LedgerUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - the record must still end as its dead letter
            log.error("task_id=%s: ends internal and did not cancel its children: %s: %s", task.key,
                      type(exc).__name__, str(exc)[:300])
        return True

    async def _leave_internal(self, task: Task, fence: int) -> None:
        """Leave the session of a task that ends ``internal``; a bug in leaving is logged (the head
        is then passed over after the stall), never a second failure of the record."""
        try:
            await self.sessions.leave(task, fence)
        except LedgerUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - the record must still end as its dead letter
            log.error("task_id=%s: ends internal and did not leave session %s: %s: %s", task.key, task.session,
                      type(exc).__name__, str(exc)[:300])

    async def _process(self, record: Record, held: Held | None = None) -> None:
        try:
            await read_task(record, self.config.max_task_bytes, self.config.read_value)
            task, agent, task_input = decode_record(record, self.agents, self.config.max_task_bytes)
        except PoisonError as exc:
            await self.outcomes.dead_letter(record, exc.task_key, exc.reason, str(exc), 0)
            await self.outcomes.reply(record, exc.task_key, "", "dead", reason=exc.reason, error=str(exc))
            return
        ctx = f"task_id={task.key} {record.coordinates}"
        bind_task(task.key, task.kind)
        span = current_span()
        span.set_task(task.key, task.kind)
        span.set_input_digest(task.fingerprint)
        # before the deadline: a finished duplicate is no expiry
        claim = await self.claims.claim(record, task, ctx, self.steps.first_attempt(task, agent))
        if held is not None and claim is not None:
            held.task, held.fence = task, claim.fence
        if claim is None:
            if self.config.shadow_sample_rate:
                await self.shadow.maybe_run(task, self.agents.get(task.kind), task_input)
            return
        if task.expired(self.clock()):
            # released as failed, not dead: the same work sent again with a later deadline may run
            error = "deadline passed before the task started"
            await self.ledger.give_back_first_attempt(task.key, claim.fence)
            if await self.ledger.fail(task.key, claim.fence, error):
                await self.outcomes.cancel_children(task.key)
                await self.sessions.leave(task, claim.fence)  # an earlier run may have taken its ticket
                await self.outcomes.dead_letter(record, task.key, "expired", error, claim.attempts, kind=task.kind)
                await self.outcomes.reply(record, task.key, task.kind, "dead", reason="expired", error=error)
            return
        entry: SessionView | Replay | None = None
        update: Update | None = None
        try:
            with self.leases.hold(task.key, claim.fence, self.config.lease_ms / 3000):
                entry = await self.sessions.enter(task, agent, claim)  # its session's turn, before the steps
                async with self.sessions.holding(task, claim.fence, entry):
                    if isinstance(entry, Replay):
                        outputs, attempts, degraded = self._replayed(entry, task, agent, claim), claim.attempts, NONE
                    else:  # the history that fits the kind's budget, the oldest turns summarised once
                        entry = await self.sessions.fit(task, agent, task_input, claim, entry, self.steps.calls)
                        outputs, attempts, degraded = await self._run(task, agent, task_input, claim, record, entry)
                    # the turn or reduced state, before the ledger's DONE: a reduce that fails is a dead end here
                    update = self.sessions.update(task, agent, entry, outputs, attempts)
        except ToDeadLetter as dl:
            await self.outcomes.dead(record, task, claim.fence, dl.reason, dl.error, dl.attempts, ctx,
                                     ending=lambda: self.sessions.leave(task, claim.fence))
            self.metrics.task_versions.labels(kind=task.kind, version=agent.prompt_version,
                                              outcome="dead_lettered").inc()
            return
        except Parked as parked:
            await self._park(task, claim.fence, parked.waiting, ctx, entry)
            return
        except LostFence:
            self.metrics.stale_fence_writes.inc()
            self.metrics.tasks.labels(outcome="duplicate").inc()
            log.warning("%s: lost the task to a newer fence; the new holder finishes it", ctx)
            return
        await self._complete(record, task, agent, claim.fence, (outputs, attempts, degraded), ctx, entry, update)

    async def _complete(self, record: Record, task: Task, agent: Agent, fence: int,
                        ran: tuple[dict[str, dict[str, Any]], int, dict[str, tuple[str, str]]], ctx: str,
                        entry: SessionView | Replay | None, update: Update | None = None) -> None:
        """Complete the task; a task of a session writes its ``update`` (computed before the ledger's
        DONE) after DONE and before the result is published."""
        outputs, attempts, degraded = ran
        if entry is None:
            await self.outcomes.complete(record, task, agent, fence, outputs, attempts, ctx, degraded)
            return
        view = entry.view if isinstance(entry, Replay) else entry

        async def applying(result: Any) -> None:
            await self.sessions.apply(task, fence, result, update)

        await self.outcomes.complete(record, task, agent, fence, outputs, attempts, ctx, degraded,
                                     session=view.result_fields(), applying=applying)

    @staticmethod
    def _replayed(replay: Replay, task: Task, agent: Agent, claim: Claim) -> dict[str, dict[str, Any]]:
        """The outputs of a task whose session applied its update before: its result kept in its turn."""
        if not isinstance(replay.result, dict):
            raise ToDeadLetter("session", f"session {task.session}: the update of task {task.key} was applied "
                               "before and its result is not kept there", claim.attempts)
        return {agent.steps[-1].name: replay.result}

    async def _run(
        self, task: Task, agent: Agent, task_input: BaseModel, claim: Claim, record: Record | None = None,
        session: SessionView | None = None,
    ) -> tuple[dict[str, dict[str, Any]], int, dict[str, tuple[str, str]]]:
        """Run the agent's step graph (:meth:`Steps.run <service.pipeline.steps.Steps.run>`)."""
        return await self.steps.run(task, agent, task_input, claim, record, session)

    async def _park(self, task: Task, fence: int, waiting: dict[str, Any], ctx: str,
                    entry: SessionView | Replay | None = None) -> None:
        """Park the task in the ledger until a person decides; its offset may then be committed. A task
        of a session keeps its turn until the park's deadline (:meth:`SessionGate.park`)."""
        await self.sessions.park(task, fence, entry, waiting)
        await self.outcomes.park(task, fence, waiting, ctx)
