"""The per-record pipeline: decode -> claim -> run the agent -> fenced complete -> publish.

It is the one writer of durable state for a record: the ledger, the results topic and the
dead-letter topic. It returns only when the record's outcome is durable (a result in the ledger and
on the results topic, or an acknowledged dead letter); the runner then lets its offset be committed.
It raises only when Redis or the broker did not answer, and the runner retries the record.

Decisions on a claim:
- ``claimed``: this worker holds the task under a fresh fence; run it.
- ``succeeded``: done before (a redelivery, a replay, a retry after a timeout): never call the model
  again; re-emit the stored result event, byte for byte, if it was not acknowledged yet.
- ``busy``: another worker holds a live lease: wait until it finishes or its lease expires.
- ``conflict``: the same key with a different input: dead-letter, the first result stays.
- ``dead``: dead-lettered before: re-emit the dead letter if it was not acknowledged yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from time import monotonic
from typing import Any, Protocol

from pydantic import BaseModel

from consumers.producers import Outputs, ProduceFailed, RecordRejected
from consumers.records import Record
from dedup.leases import LeaseKeeper
from dedup.ledger import AttemptsExhausted, Claim, Ledger, LedgerUnavailable, StaleFence
from service.agents.base import Agent, Step
from service.agents.registry import AgentRegistry
from service.agents.tasks import Task, canonical_json, decode_task, digest, header
from service.core.errors import (
    EndpointFault,
    InfrastructureError,
    InvalidOutput,
    LLMRateLimited,
    PermanentError,
    PoisonError,
    RetryableError,
)
from service.core.metrics import Metrics
from service.core.tracing import TaskSpan, Tracing
from service.llm.client import ChatRequest, ChatResult
from service.llm.guard import EndpointGuard, RateLimiter

log = logging.getLogger(__name__)
_NO_SPAN = TaskSpan()
_span: ContextVar[TaskSpan | None] = ContextVar("task_span", default=None)


def _current_span() -> TaskSpan:
    return _span.get() or _NO_SPAN


class ChatClient(Protocol):
    async def chat(self, request: ChatRequest) -> ChatResult: ...


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    max_task_bytes: int = 262_144
    max_attempts: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    llm_timeout_s: float = 30.0
    busy_poll_s: float = 0.5
    lease_ms: int = 30_000
    context_tokens: int = 8192
    max_output_tokens: int = 512
    shadow_sample_rate: float = 0.0
    # a failure of the service's own code on one record: retried this many times, then `internal`
    internal_retries: int = 3
    internal_backoff_s: float = 0.5


class _DeadLetter(Exception):
    def __init__(self, reason: str, error: str, attempts: int) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.attempts = attempts


class _LostFence(Exception):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TaskProcessor:
    def __init__(
        self,
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
    ) -> None:
        self.ledger = ledger
        self.leases = LeaseKeeper(ledger)
        self.agents = agents
        self.llm = llm
        self.outputs = outputs
        self.metrics = metrics
        self.config = config
        self.worker_id = worker_id
        self.model_name = model_name
        self.clock = clock
        self.guard = guard
        self.tracing = tracing or Tracing.disabled()
        self.limiter = limiter
        self.outage: str | None = None  # Redis or the broker did not answer the last record that tried

    async def __call__(self, record: Record) -> None:
        started = monotonic()
        coordinates = (record.topic, record.partition, record.offset)
        with self.tracing.task_span(None, None, coordinates, header(record.headers, "traceparent")) as span:
            token = _span.set(span)
            try:
                await self._process_bounded(record)
            finally:
                _span.reset(token)
                self.metrics.task_duration.observe(monotonic() - started)

    @property
    def accepting(self) -> bool:
        """False while the model endpoint cannot serve any task, or Redis or the broker did not
        answer the last record that tried: the runner then pauses consumption (records already
        taken keep retrying, and the first that goes through opens it again)."""
        return self.outage is None and (self.guard is None or self.guard.accepting)

    async def _process_bounded(self, record: Record) -> None:
        """Whose fault is a failure, decided in one place.

        - the record's (decoding, validating): :meth:`_process` dead-letters it at once;
        - one task's (400, invalid or truncated output): counted against its attempts in
          :meth:`_call_step`; the endpoint's (auth, unknown model, unreachable, 429): the breaker
          and Retry-After wait it out, no attempt is spent;
        - Redis or the broker did not answer: raised as :class:`InfrastructureError`; the runner
          retries the record without limit;
        - anything else is a bug of the service's own code (or a record a dependency refuses for
          good): retried ``internal_retries`` times, then dead-lettered as ``internal``.
        """
        failures = 0
        while True:
            try:
                await self._process(record)
                self.outage = None
                return
            except (LedgerUnavailable, ProduceFailed) as exc:
                self.outage = f"{type(exc).__name__}: {str(exc)[:200]}"
                raise InfrastructureError(str(exc)) from exc
            except RecordRejected as exc:  # the broker refuses this outcome for good: retrying cannot help
                self.metrics.internal_errors.inc()
                await self._dead_letter(record, _key_of(record, self.config.max_task_bytes), "internal",
                                        f"the broker refused the outcome record: {str(exc)[:500]}", 0)
                return
            except Exception as exc:  # noqa: BLE001 - a bug must end the record, never loop for ever
                failures += 1
                self.metrics.internal_errors.inc()
                error = f"{type(exc).__name__}: {str(exc)[:500]}"
                if failures > self.config.internal_retries:
                    log.error("%s: failed %d times in the service's own code; dead-lettering as internal",
                              record.coordinates, failures, exc_info=exc)
                    await self._dead_letter(record, _key_of(record, self.config.max_task_bytes), "internal",
                                            error, 0)
                    return
                log.warning("%s: internal failure %d of %d (%s); retrying", record.coordinates, failures,
                            self.config.internal_retries + 1, error, exc_info=failures == 1)
                await asyncio.sleep(self.config.internal_backoff_s * 2 ** (failures - 1) * random.uniform(0.5, 1.0))

    # ------------------------------------------------------------------ steps of a record

    async def _process(self, record: Record) -> None:
        try:
            task, agent, task_input = decode_record(record, self.agents, self.config.max_task_bytes)
        except PoisonError as exc:
            await self._dead_letter(record, exc.task_key, exc.reason, str(exc), 0)
            return
        ctx = f"task_id={task.key} {record.coordinates}"
        span = _current_span()
        span.set_task(task.key, task.kind)
        span.set_input_digest(task.fingerprint)
        claim = await self._claim(record, task, ctx)  # before the deadline: a finished duplicate is no expiry
        if claim is None:
            if self.config.shadow_sample_rate:
                await self._maybe_shadow(task, agent, task_input)
            return
        if task.expired(self.clock()):
            # released as failed, not dead: the same work sent again with a later deadline may run
            error = "deadline passed before the task started"
            if await self.ledger.fail(task.key, claim.fence, error):
                await self._dead_letter(record, task.key, "expired", error, claim.attempts)
            return
        try:
            with self.leases.hold(task.key, claim.fence, self.config.lease_ms / 3000):
                outputs, attempts = await self._run(task, agent, task_input, claim)
        except _DeadLetter as dl:
            await self._dead(record, task, claim.fence, dl.reason, dl.error, dl.attempts, ctx)
            return
        except _LostFence:
            self.metrics.stale_fence_writes.inc()
            self.metrics.tasks.labels(outcome="duplicate").inc()
            log.warning("%s: lost the task to a newer fence; the new holder finishes it", ctx)
            return
        await self._complete(record, task, agent, claim.fence, outputs, attempts, ctx)

    async def _claim(self, record: Record, task: Task, ctx: str) -> Claim | None:
        while True:
            claim = await self.ledger.claim(task.key, task.fingerprint, self.worker_id, task.kind)
            decision = claim.decision
            span = _current_span()
            span.set_decision(decision)
            span.set_fence(claim.fence)
            if decision == "claimed":
                log.debug("%s: claimed with fence %d", ctx, claim.fence)
                return claim
            if decision == "conflict":
                self.metrics.tasks.labels(outcome="conflict").inc()
                await self._dead_letter(
                    record, task.key, "conflict",
                    f"task {task.key} exists with another input (fingerprint {task.fingerprint} differs)",
                    claim.attempts, count_outcome=False,
                )
                return None
            if decision in ("succeeded", "dead"):
                await self._duplicate(record, task, decision, claim, ctx)
                return None
            # busy: another worker holds a live lease
            if task.expired(self.clock()):
                await self._dead_letter(record, task.key, "expired", "deadline passed while another worker held the task", claim.attempts)
                return None
            wait_s = min(self.config.busy_poll_s, max(claim.lease_remaining_ms, 10) / 1000)
            await asyncio.sleep(wait_s)

    async def _duplicate(self, record: Record, task: Task, state: str, claim: Claim, ctx: str) -> None:
        self.metrics.tasks.labels(outcome="duplicate").inc()
        _current_span().set_outcome("duplicate")
        if claim.published and not (self.outputs.transactional and claim.published_by == record.coordinates):
            log.info("%s: %s before; skipped", ctx, state)
            return
        stored = await self.ledger.get(task.key)
        if stored is None:  # expired from the ledger between the two reads: run it as new
            raise LedgerUnavailable(f"task {task.key} vanished between claim and read")
        async with self._publishing(record, task.key, state):
            if state == "succeeded" and stored.event is not None:
                await self.outputs.result(record, task.key, stored.event, self._traceparent(task.traceparent),
                                          _deadline(task))
                self.metrics.results_published.inc()
            elif state == "dead":
                reason = stored.fields.get("dead_reason", "permanent")
                await self.outputs.dead_letter(
                    record, reason=reason, error=stored.fields.get("error", ""),
                    attempts=stored.attempts, task_id=task.key,
                )
                self.metrics.dead_letters.labels(reason=reason).inc()
        log.info("%s: %s before; re-emitted the stored outcome", ctx, state)

    @contextlib.asynccontextmanager
    async def _publishing(self, record: Record, task_key: str, state: str) -> AsyncIterator[None]:
        """Publish a task's outcome (the block) and mark it published by this record.

        Sent directly, the mark follows the broker's acknowledgement: a later record of the same
        task, even this one read again, then skips. Staged for a transaction, the mark comes
        first: a later record of the same task skips, this record read again (its transaction did
        not commit, or it would not be read again) stages the outcome anew. Either way the outcome
        is published, because the marking record's offset commits only with (or after) it.
        """
        if self.outputs.transactional:
            await self.ledger.mark_published(task_key, state, record.coordinates)
            yield
        else:
            yield
            await self.ledger.mark_published(task_key, state, record.coordinates)

    async def _maybe_shadow(self, task: Task, agent: Agent, task_input: BaseModel) -> None:
        """Re-run a sample of duplicates in shadow and count how often the answer would differ.

        Nothing is written: no ledger step, no result. One attempt per step, no retries.
        """
        if random.random() >= self.config.shadow_sample_rate:
            return
        stored = await self.ledger.get(task.key)
        if stored is None or stored.state != "succeeded" or stored.fingerprint != task.fingerprint:
            return  # only a true duplicate of a stored result
        outputs: dict[str, dict[str, Any]] = {}
        prev: str | None = None
        try:
            for step in agent.steps:
                previous = {prev: outputs[prev]} if prev is not None else {}
                messages, schema = step.messages(task_input, previous), step.schema(task_input, previous)
                needed = estimate_tokens(messages, schema) + self.config.max_output_tokens
                # a shadow call is a call: the breaker, the rate limits and Retry-After hold for it too
                await self._capacity(task, needed, retry=False)
                try:
                    answer = await self.llm.chat(ChatRequest(
                        messages=messages, schema=schema,
                        schema_name=f"{task.kind}_{step.name}", idempotency_key=f"{task.key}:{step.name}:shadow",
                        timeout_s=self.config.llm_timeout_s,
                    ))
                except EndpointFault as exc:
                    self._endpoint_unusable(exc)
                    raise
                except RetryableError as exc:
                    await self._endpoint_failed(exc)
                    raise
                self._endpoint_answered()
                if self.limiter is not None:
                    await self.limiter.reconcile(needed, answer.prompt_tokens + answer.completion_tokens)
                outputs[step.name] = step.parse(task_input, answer.content)
                prev = step.name
        except (RetryableError, PermanentError, InvalidOutput, EndpointFault) as exc:
            self.metrics.shadow_runs.labels(outcome="failed").inc()
            log.info("task_id=%s: shadow run failed: %s", task.key, exc)
            return
        same = digest(canonical_json(agent.result(outputs))) == stored.fields.get("result_digest")
        self.metrics.shadow_runs.labels(outcome="same" if same else "different").inc()

    # ------------------------------------------------------------------ the agent

    async def _run(
        self, task: Task, agent: Agent, task_input: BaseModel, claim: Claim
    ) -> tuple[dict[str, dict[str, Any]], int]:
        """Run the agent's steps; a multi-step agent journals each step and resumes from the journal.

        A step sees the task input and only the recorded output of the step before, after its
        digest is checked. A journaled step is re-used only when its prompt version is current,
        its digest matches its output and it was computed from the current output of the step
        before (a chain of digests); otherwise it runs again.
        """
        journaled = len(agent.steps) > 1
        journal = await self.ledger.steps(task.key) if journaled else {}
        outputs: dict[str, dict[str, Any]] = {}
        attempts = claim.attempts
        prev_name: str | None = None
        prev: dict[str, Any] | None = None
        for step in agent.steps:
            input_digest = prev["digest"] if prev is not None else ""
            recorded = journal.get(step.name)
            if (
                recorded is not None
                and recorded.get("prompt_version") == step.prompt_version
                and recorded.get("input_digest", "") == input_digest
                and recorded.get("digest") == digest(canonical_json(recorded.get("output")))
            ):
                self.metrics.steps_reused.inc()
                outputs[step.name] = recorded["output"]
                prev_name, prev = step.name, recorded
                continue
            previous: dict[str, Any] = {}
            if prev is not None and prev_name is not None:
                if prev.get("digest") != digest(canonical_json(prev.get("output"))):
                    raise _DeadLetter("permanent", f"step {prev_name}: recorded output does not match its digest", attempts)
                previous = {prev_name: prev["output"]}
            output, attempts = await self._call_step(task, step, task_input, previous, claim.fence, attempts)
            outputs[step.name] = output
            record = {
                "output": output, "digest": digest(canonical_json(output)), "input_digest": input_digest,
                "prompt_version": step.prompt_version, "fence": claim.fence, "attempt": attempts,
            }
            if journaled:
                try:
                    await self.ledger.record_step(task.key, claim.fence, step.name, record)
                except StaleFence as exc:
                    raise _LostFence(str(exc)) from exc
            prev_name, prev = step.name, record
        return outputs, attempts

    async def _call_step(
        self,
        task: Task,
        step: Step,
        task_input: BaseModel,
        previous: dict[str, dict[str, Any]],
        fence: int,
        attempts: int,
    ) -> tuple[dict[str, Any], int]:
        cfg = self.config
        last: Exception | None = None
        messages = step.messages(task_input, previous)
        schema = step.schema(task_input, previous)
        needed = estimate_tokens(messages, schema) + cfg.max_output_tokens
        if needed > cfg.context_tokens:  # never truncated silently
            raise _DeadLetter("oversize", f"step {step.name}: about {needed} tokens with the answer, "
                              f"the model's window is {cfg.context_tokens}", attempts)
        while True:
            remaining = task.remaining_s(self.clock())
            if remaining is not None and remaining <= 0:
                raise _DeadLetter("expired", f"deadline passed after {attempts} attempts", attempts)
            await self._capacity(task, needed, retry=last is not None)
            try:
                attempt = await self.ledger.begin_attempt(task.key, fence, step.name, cfg.max_attempts)
            except StaleFence as exc:
                raise _LostFence(str(exc)) from exc
            except AttemptsExhausted as exc:  # used up before a crash or a redelivery
                raise _DeadLetter("exhausted", f"step {step.name}: {exc}", exc.total) from exc
            attempts = attempt.total
            timeout = cfg.llm_timeout_s if remaining is None else max(0.05, min(cfg.llm_timeout_s, remaining))
            request = ChatRequest(
                messages=messages,
                schema=schema,
                schema_name=f"{task.kind}_{step.name}",
                idempotency_key=f"{task.key}:{step.name}",
                timeout_s=timeout,
                traceparent=self.tracing.current_traceparent() or task.traceparent,
            )
            outcome = await self._one_call(request, step, task_input, needed, attempt.step, attempts)
            if isinstance(outcome, dict):
                return outcome, attempts
            last, delay, endpoint_fault = outcome
            if endpoint_fault:
                if not await self.ledger.refund_attempt(task.key, fence, step.name):
                    raise _LostFence(f"task {task.key}: fence {fence} no longer holds the task")
                attempts -= 1
                log.info("task_id=%s step=%s: the endpoint failed (%s); waiting for it, no attempt spent",
                         task.key, step.name, last)
                if self.guard is None or self.guard.accepting:
                    await asyncio.sleep(delay if delay is not None else min(cfg.backoff_max_s, 1.0))
                last = None  # the next call is not a retry of the task's
                continue
            if attempt.step >= cfg.max_attempts:
                reason = "invalid_output" if isinstance(last, InvalidOutput) else "exhausted"
                raise _DeadLetter(reason, f"step {step.name}, {attempt.step} attempts: {last}", attempts)
            self.metrics.retries.inc()
            if delay is None:  # full jitter
                delay = random.uniform(0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt.step - 1)))
            delay = min(delay, cfg.backoff_max_s)
            log.info("task_id=%s step=%s attempt %d failed (%s); retry in %.2fs",
                     task.key, step.name, attempt.step, last, delay)
            await asyncio.sleep(delay)

    async def _one_call(
        self, request: ChatRequest, step: Step, task_input: BaseModel, needed: int, step_attempt: int, attempts: int,
    ) -> dict[str, Any] | tuple[Exception, float | None, bool]:
        """One model call: the step's output, or (the failure, a delay it asks for, whether it was the
        endpoint's fault rather than the task's). A 400 for this request dead-letters at once."""
        try:
            with self.tracing.llm_span(self.model_name, step=step.name, attempt=step_attempt) as call:
                answer = await self.llm.chat(request)
                call.set_response(answer.model, answer.finish_reason, answer.prompt_tokens,
                                  answer.completion_tokens)
            if self.limiter is not None:
                await self.limiter.reconcile(needed, answer.prompt_tokens + answer.completion_tokens)
        except PermanentError as exc:
            self._endpoint_answered()
            raise _DeadLetter("permanent", str(exc), attempts) from exc
        except InvalidOutput as exc:
            self._endpoint_answered()
            return exc, None, False
        except EndpointFault as exc:  # the endpoint's fault, not the task's: no attempt is spent
            self._endpoint_unusable(exc)
            return exc, None, True
        except RetryableError as exc:
            # a 429, or the failure that opened the breaker, is the endpoint's: the attempt is given back
            return exc, exc.delay, await self._endpoint_failed(exc)
        self._endpoint_answered()
        try:
            return step.parse(task_input, answer.content)
        except InvalidOutput as exc:
            return exc, None, False

    async def _capacity(self, task: Task, tokens: int, *, retry: bool) -> None:
        """Wait until the endpoint may be called: breaker, retry budget, Retry-After, rate limits."""
        if self.guard is not None:
            await self.guard.acquire(retry=retry)
        if self.limiter is not None:
            await self.limiter.acquire(task.event.priority, tokens)

    def _traceparent(self, incoming: str | None) -> str | None:
        return self.tracing.current_traceparent() or incoming

    def _endpoint_answered(self) -> None:
        if self.guard is not None:
            self.guard.success()

    async def _endpoint_failed(self, exc: RetryableError) -> bool:
        """Tell the guard; True when the failure is the endpoint's (a 429, or it opened the breaker)."""
        if isinstance(exc, LLMRateLimited):
            if self.guard is not None and exc.delay:
                await self.guard.retry_after(exc.delay)  # a rate limit is not a broken endpoint
            return True
        if self.guard is None:
            return False
        return bool(self.guard.failure())

    def _endpoint_unusable(self, exc: EndpointFault) -> None:
        if self.guard is not None:
            self.guard.endpoint_fault(exc.reason, str(exc))

    # ------------------------------------------------------------------ outcomes

    async def _complete(
        self,
        record: Record,
        task: Task,
        agent: Agent,
        fence: int,
        outputs: dict[str, dict[str, Any]],
        attempts: int,
        ctx: str,
    ) -> None:
        result = agent.result(outputs)
        result_text = canonical_json(result)
        result_digest = digest(result_text)
        event = canonical_json({
            "task_id": task.key,
            "kind": task.kind,
            "status": "succeeded",
            "result": result,
            "result_digest": result_digest,
            "fence": fence,
            "attempts": attempts,
            "model": self.model_name,
            "prompt_version": agent.prompt_version,
            "completed_at": _iso(self.clock()),
        }).encode()
        done = await self.ledger.complete(
            task.key, fence, result=result_text, digest=result_digest, event=event,
            model=self.model_name, prompt_version=agent.prompt_version,
        )
        if done.status == "already" and done.fence == fence:
            # our own COMPLETE landed but its reply was lost: publish what is stored, byte for byte
            stored = await self.ledger.get(task.key)
            if stored is None or stored.event is None:
                raise LedgerUnavailable(f"task {task.key}: stored result not readable after COMPLETE")
            event = stored.event
            result_digest = stored.fields.get("result_digest", result_digest)
        elif done.status != "ok":
            self.metrics.stale_fence_writes.inc()
            self.metrics.tasks.labels(outcome="duplicate").inc()
            log.warning("%s: write with fence %d refused (%s; holder fence %d)", ctx, fence, done.status, done.fence)
            return
        span = _current_span()
        span.set_attempts(attempts)
        span.set_output_digest(result_digest)
        async with self._publishing(record, task.key, "succeeded"):
            await self.outputs.result(record, task.key, event, self._traceparent(task.traceparent), _deadline(task))
        self.metrics.results_published.inc()
        self.metrics.tasks.labels(outcome="succeeded").inc()
        span.set_outcome("succeeded")
        log.info("%s: succeeded (fence %d, attempts %d)", ctx, fence, attempts)

    async def _dead(
        self, record: Record, task: Task, fence: int, reason: str, error: str, attempts: int, ctx: str
    ) -> None:
        if not await self.ledger.fail(task.key, fence, error, dead_reason=reason):
            self.metrics.stale_fence_writes.inc()
            self.metrics.tasks.labels(outcome="duplicate").inc()
            log.warning("%s: dead-letter of fence %d refused: a newer fence holds the task", ctx, fence)
            return
        async with self._publishing(record, task.key, "dead"):
            await self._dead_letter(record, task.key, reason, error, attempts)

    async def _dead_letter(
        self,
        record: Record,
        task_key: str | None,
        reason: str,
        error: str,
        attempts: int,
        *,
        count_outcome: bool = True,
    ) -> None:
        await self.outputs.dead_letter(record, reason=reason, error=error, attempts=attempts, task_id=task_key,
                                       traceparent=self.tracing.current_traceparent())
        self.metrics.dead_letters.labels(reason=reason).inc()
        _current_span().set_outcome(f"dead_lettered:{reason}")
        if count_outcome:
            self.metrics.tasks.labels(outcome="dead_lettered").inc()
        log.warning("task_id=%s %s: dead-lettered as %s: %s", task_key or "-", record.coordinates, reason, error)


def decode_record(record: Record, agents: AgentRegistry, max_bytes: int) -> tuple[Task, Agent, BaseModel]:
    """The consumer's whole decode edge: bytes to a task, its agent and its validated input.

    Raises nothing but :class:`PoisonError`, whatever the record holds: whatever the decoder or an
    input validator raises is the record's fault.
    """
    task = decode_task(record.value, record.headers, max_bytes)
    try:
        agent = agents.get(task.kind)
        return task, agent, agent.parse_input(task.event.input)
    except PoisonError as exc:
        exc.task_key = task.key
        raise
    except Exception as exc:  # noqa: BLE001 - a validator's own exception is still the record's fault
        raise PoisonError("schema", f"input of {task.kind}: {type(exc).__name__}: {str(exc)[:300]}",
                          task.key) from exc


def _key_of(record: Record, max_bytes: int) -> str | None:
    try:
        return decode_task(record.value, record.headers, max_bytes).key
    except PoisonError:
        return None


def _deadline(task: Task) -> str | None:
    return _iso(task.deadline) if task.deadline is not None else None


def estimate_tokens(messages: list[dict[str, str]], schema: dict[str, Any] | None) -> int:
    """A conservative token estimate (three characters a token) of a request's prompt."""
    chars = sum(len(m.get("content", "")) + 8 for m in messages)
    if schema is not None:
        chars += len(canonical_json(schema))
    return chars // 3 + 1
