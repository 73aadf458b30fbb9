"""Running an agent's steps: one model call each, journaled and resumed, retried within the task's
attempts; the endpoint's own failures (breaker, 429, auth) spend no attempt of the task."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from graphlib import TopologicalSorter
from time import monotonic
from typing import Any

from pydantic import BaseModel

from consumers.producers import Outputs
from consumers.records import Record
from dedup.ledger import Attempt, AttemptsExhausted, Claim, Ledger, StaleFence
from service.agents.base import Agent, Messages, Step
from service.agents.registry import AgentRegistry
from service.agents.tasks import Task, canonical_json, digest
from service.core.errors import (
    EndpointFault,
    InvalidOutput,
    LLMRateLimited,
    LLMTimeout,
    PermanentError,
    PoisonError,
    RetryableError,
)
from service.core.metrics import Metrics
from service.core.tracing import Tracing
from service.llm.client import ChatRequest, ChatResult
from service.llm.endpoints import Endpoint
from service.llm.guard import EndpointGuard, EndpointUnavailable, RateLimiter
from service.llm.tenancy import OverBudget, Reservation, Tenancy, TenantBudgets
from service.llm.window import AdaptiveWindow, Slot
from service.llm.window import Outcome as WindowOutcome
from service.pipeline.base import ChatClient, LostFence, ProcessorConfig, ToDeadLetter, estimate_tokens
from service.pipeline.parking import export_audit
from service.pipeline.tools import ToolLoop
from service.pipeline.waits import Waits

log = logging.getLogger(__name__)


class Steps:
    """The stage that runs the agent; a part of :class:`~service.pipeline.processor.TaskProcessor`."""

    ledger: Ledger
    llm: ChatClient
    metrics: Metrics
    config: ProcessorConfig
    clock: Callable[[], datetime]
    tracing: Tracing
    guard: EndpointGuard | None
    limiter: RateLimiter | None
    model_name: str
    worker_id: str
    outputs: Outputs
    primary: Endpoint  # llm, guard and limiter above, as an endpoint
    fallbacks: tuple[Endpoint, ...]  # AGENT_LLM__FALLBACKS, in order
    agents: AgentRegistry
    default_unavailable: str  # AGENT_LLM__UNAVAILABLE: the policy of a kind that names none
    tenancy: Tenancy  # AGENT_TENANCY__*: weights, budgets, labels, prices
    budgets: TenantBudgets | None  # the tenants' hard token budgets (None: no budgets)
    waits: Waits  # every record of this process that waits, why and until when

    async def export_audit(self, task_key: str) -> None:
        """Send the task's new audit entries to the audit topic; a failure waits for the next pass."""
        try:
            await export_audit(self.ledger, self.outputs.publisher.send, self.config.audit_topic, task_key,
                               self.metrics)
        except Exception as exc:  # noqa: BLE001 - the audit list in Redis is the record; the topic a copy
            log.warning("task_id=%s: audit entries not exported yet: %s: %s", task_key, type(exc).__name__, exc)

    async def _run(
        self, task: Task, agent: Agent, task_input: BaseModel, claim: Claim, record: Record | None = None,
    ) -> tuple[dict[str, dict[str, Any]], int, dict[str, tuple[str, str]]]:
        """Run the agent's step graph; a multi-step agent journals each step and resumes from the journal.

        A step runs once every step it needs is journaled, and sees the task input and their
        recorded outputs, each checked against its digest, in the order it names them. Steps with no
        path between them run concurrently; the first that fails cancels the others. A journaled
        step is re-used only when its prompt version is current, its digest matches its output and
        it was computed from the current outputs of the steps it needs (a chain of digests);
        otherwise it runs again.

        Returns the outputs, the task's attempts, and the steps a fallback endpoint answered (step ->
        (endpoint, model); empty when the primary answered every step).
        """
        run = _GraphRun(self, task, agent, task_input, claim, record)
        await run.start()
        return run.outputs, run.attempts, run.degraded

    async def _call_step(
        self,
        task: Task,
        step: Step,
        task_input: BaseModel,
        previous: dict[str, dict[str, Any]],
        fence: int,
        attempts: int,
        *,
        conversation: list[dict[str, Any]] | None = None,
        offer_tools: bool = False,
        answered: list[tuple[str, str]] | None = None,
    ) -> tuple[dict[str, Any] | ToolCalls, int]:
        """Call the model for one step until it answers with a valid output, within the task's
        attempts and deadline. Returns the output and the task's attempt count.

        A step with tools passes the ``conversation`` so far (its messages, the model's tool calls
        and their results); with ``offer_tools`` the model may answer with tool calls instead
        (:class:`ToolCalls`), otherwise it is told to answer.

        While the primary endpoint is unavailable the kind's policy decides (:meth:`_capacity`); the
        endpoint and model that answered are appended to ``answered``."""
        messages, schema, needed = self._request_size(step, task_input, previous, attempts, conversation)
        last: Exception | None = None
        # every wait before an attempt (budget, endpoint, window, and the calls given back: 429s,
        # endpoint faults) ends by this time; then the task is dead-lettered (`budget`, `unavailable`)
        waits_until = monotonic() + self.config.max_wait_s
        waits, guard = self.waits, self.primary.guard
        why_endpoint = guard.why_waiting if guard is not None else None
        while True:
            spend = await self._reserve_budget(task, needed, attempts, waits_until)  # or dead letter `budget`
            outcome: Any = None
            try:
                with waits.waiting(task.key, "endpoint", waits_until, why_endpoint):
                    endpoint = await self._capacity(task, needed, retry=last is not None, attempts=attempts,
                                                    until=waits_until)
                remaining = self._time_left(task, attempts)  # after any wait for the endpoint
                attempt = await self._begin_attempt(task, step, fence)
                attempts = attempt.total
                request = self._request(task, step, messages, schema, remaining, offer_tools, endpoint, attempts)
                outcome = await self._one_call(request, step, task_input, needed, attempt.step, attempts, endpoint,
                                               answered, deadline_s=remaining, priority=task.event.priority,
                                               spend=spend, task_key=task.key, waits_until=waits_until)
            finally:
                await self._settle_budget(spend, outcome)
            if isinstance(outcome, dict | ToolCalls):
                return outcome, attempts
            last, delay, endpoint_fault = outcome
            if endpoint_fault:
                with waits.waiting(task.key, "refused", waits_until, why_endpoint):
                    await self._give_attempt_back(task, step, fence, last, delay, endpoint, waits_until)
                attempts -= 1
                last = None  # the next call is not a retry of the task's
                continue
            # the attempt's outcome is known: a worker that dies from here on gives nothing back
            if not await self.ledger.end_attempt(task.key, fence, step.name):
                raise LostFence(f"task {task.key}: fence {fence} no longer holds the task")
            with waits.waiting(task.key, "backoff", monotonic() + self.config.backoff_max_s):
                await self._back_off(step, attempt.step, attempts, last, delay, task.key)
            waits_until = monotonic() + self.config.max_wait_s  # an attempt spent: the next may wait again

    def _request_size(
        self, step: Step, task_input: BaseModel, previous: dict[str, dict[str, Any]], attempts: int,
        conversation: list[dict[str, Any]] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
        """The step's messages and schema, and the tokens they need with the answer: never more than
        the model's window, which is never truncated silently."""
        cfg = self.config
        messages = conversation if conversation is not None else step.messages(task_input, previous)
        schema = step.schema(task_input, previous)
        needed = estimate_tokens(messages, schema, [t.spec() for t in step.tools]) + cfg.max_output_tokens
        if needed > cfg.context_tokens:
            raise ToDeadLetter("oversize", f"step {step.name}: about {needed} tokens with the answer, "
                               f"the model's window is {cfg.context_tokens}", attempts)
        return messages, schema, needed

    def _time_left(self, task: Task, attempts: int) -> float | None:
        """Seconds to the task's deadline (None: no deadline); past it, the task is dead-lettered."""
        remaining = task.remaining_s(self.clock())
        if remaining is not None and remaining <= 0:
            raise ToDeadLetter("expired", f"deadline passed after {attempts} attempts", attempts)
        return remaining

    async def _begin_attempt(self, task: Task, step: Step, fence: int) -> Attempt:
        """Count an attempt of the step in the ledger, under the task's fence."""
        try:
            return await self.ledger.begin_attempt(task.key, fence, step.name, self.config.max_attempts)
        except StaleFence as exc:
            raise LostFence(str(exc)) from exc
        except AttemptsExhausted as exc:  # used up before a crash or a redelivery
            raise ToDeadLetter("exhausted", f"step {step.name}: {exc}", exc.total) from exc

    def _request(self, task: Task, step: Step, messages: list[dict[str, Any]], schema: dict[str, Any],
                 remaining: float | None, offer_tools: bool = False, endpoint: Endpoint | None = None,
                 attempt: int = 1) -> ChatRequest:
        """The step's request; to a fallback, with its model (unless the step names one) and timeout."""
        cfg = self.config
        limit = endpoint.timeout_s if endpoint is not None and endpoint.timeout_s is not None else cfg.llm_timeout_s
        timeout = limit if remaining is None else max(0.05, min(limit, remaining))
        return ChatRequest(
            messages=messages,
            schema=schema,
            schema_name=f"{task.kind}_{step.name}",
            # one key per attempt (and tool round): a provider that honours it replays a lost answer
            # to the same attempt, never the first answer to every retry
            idempotency_key=f"{task.key}:{step.name}:{attempt}",
            timeout_s=timeout,
            traceparent=self.tracing.current_traceparent() or task.traceparent,
            model=step.model or (endpoint.model if endpoint is not None else None),
            temperature=step.temperature,
            # once the rounds are used up the tools stay described (the conversation names them)
            # but the model is told to answer
            tools=tuple(t.spec() for t in step.tools),
            tool_choice=("auto" if offer_tools else "none") if step.tools else None,
        )

    async def _give_attempt_back(self, task: Task, step: Step, fence: int, failure: Exception,
                                 delay: float | None, endpoint: Endpoint, waits_until: float) -> None:
        """The endpoint failed, not the task: refund the attempt and wait for the endpoint, until
        ``waits_until`` at most (past it, the next :meth:`_capacity` dead-letters the task)."""
        if not await self.ledger.refund_attempt(task.key, fence, step.name):
            raise LostFence(f"task {task.key}: fence {fence} no longer holds the task")
        log.info("task_id=%s step=%s: the endpoint %s failed (%s); no attempt spent",
                 task.key, step.name, endpoint.name, failure)
        left = waits_until - monotonic()
        if left > 0 and endpoint.accepting and (endpoint.available or self._policy(task) == "wait"):
            await asyncio.sleep(min(left, delay if delay is not None else min(self.config.backoff_max_s, 1.0)))

    async def _back_off(self, step: Step, step_attempt: int, attempts: int, failure: Exception,
                        delay: float | None, task_key: str) -> None:
        """The task's own failure: dead-letter it after its last attempt, else wait before the next."""
        cfg = self.config
        if step_attempt >= cfg.max_attempts:
            reason = "invalid_output" if isinstance(failure, InvalidOutput) else "exhausted"
            raise ToDeadLetter(reason, f"step {step.name}, {step_attempt} attempts: {failure}", attempts)
        self.metrics.retries.inc()
        if delay is None:  # full jitter
            delay = random.uniform(0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (step_attempt - 1)))
        delay = min(delay, cfg.backoff_max_s)
        log.info("task_id=%s step=%s attempt %d failed (%s); retry in %.2fs",
                 task_key, step.name, step_attempt, failure, delay)
        await asyncio.sleep(delay)

    async def _one_call(
        self, request: ChatRequest, step: Step, task_input: BaseModel, needed: int, step_attempt: int, attempts: int,
        endpoint: Endpoint | None = None, answered: list[tuple[str, str]] | None = None, *,
        deadline_s: float | None = None, priority: str = "batch", spend: Spend | None = None,
        task_key: str | None = None, waits_until: float | None = None,
    ) -> dict[str, Any] | ToolCalls | tuple[Exception, float | None, bool]:
        """One model call: the step's output, the tools it asks to call, or (the failure, a delay it
        asks for, whether it was the endpoint's fault rather than the task's: a 429 or an endpoint
        fault, never a 5xx or a timeout, which the task's attempts pay for). A 400 for this request
        dead-letters at once."""
        endpoint = endpoint or self.primary
        guard = endpoint.guard
        window = endpoint.window
        slot = None
        if window is not None:
            wait_s = self.config.max_wait_s if waits_until is None else waits_until - monotonic()
            with self.waits.waiting(task_key or "", "window", monotonic() + wait_s):
                slot, request = await self._window_slot(window, request, deadline_s, attempts, priority, wait_s)
        if spend is not None:
            spend.sent = True  # from here the endpoint may serve (and bill) the call
        verdict: WindowOutcome = "ok"  # what the window learns from this call: the endpoint answered
        try:
            with self.tracing.llm_span(request.model or endpoint.model or self.model_name, step=step.name,
                                       attempt=step_attempt) as call:
                answer = await endpoint.client.chat(request)
                call.set_response(answer.model, answer.finish_reason, answer.prompt_tokens,
                                  answer.completion_tokens)
            await self._account(answer, needed, request, endpoint, spend)
        except PermanentError as exc:
            self._endpoint_answered(guard, task_key)
            raise ToDeadLetter("permanent", str(exc), attempts) from exc
        except InvalidOutput as exc:
            self._endpoint_answered(guard, task_key)
            return exc, None, False
        except EndpointFault as exc:  # the endpoint's fault, not the task's: no attempt is spent
            verdict = "outage"
            self._endpoint_unusable(exc, guard)
            return exc, None, True
        except RetryableError as exc:
            # a 429 is the endpoint's: the attempt is given back. A 5xx or a timeout is the task's
            # attempt, whoever is to blame: the breaker (opened by many tasks failing) keeps the
            # others from calling, and a task that fails alone cannot call more than max_attempts times
            opened = await self._endpoint_failed(exc, guard, task_key)
            verdict = _window_outcome(exc, opened)
            return exc, exc.delay, isinstance(exc, LLMRateLimited)
        except BaseException:
            verdict = "none"
            raise
        finally:
            if slot is not None and window is not None:
                await window.release(slot, verdict)
        self._endpoint_answered(guard, task_key)
        if answer.tool_calls:
            if request.tool_choice == "auto":
                if answered is not None:
                    answered.append((endpoint.name, answer.model))
                return ToolCalls(answer.tool_calls)
            return InvalidOutput("schema", f"{step.name}: asked for tools when told to answer"), None, False
        try:
            output = step.parse(task_input, answer.content)
        except InvalidOutput as exc:
            return exc, None, False
        if answered is not None:
            answered.append((endpoint.name, answer.model))
        return output

    @staticmethod
    async def _window_slot(window: AdaptiveWindow, request: ChatRequest, deadline_s: float | None,
                           attempts: int, priority: str, max_wait_s: float) -> tuple[Slot, ChatRequest]:
        """A slot in the fleet's window, waited for within the task's deadline (``deadline_s`` from
        now) and at most ``max_wait_s``; the request's timeout is cut by the wait, so the call still
        ends by the deadline."""
        started = monotonic()
        limit = max_wait_s if deadline_s is None else min(deadline_s, max_wait_s)
        try:
            slot = await asyncio.wait_for(window.acquire(priority), max(limit, 0.0))
        except TimeoutError:
            if deadline_s is not None and deadline_s <= max_wait_s:
                raise ToDeadLetter("expired", f"deadline passed waiting for the endpoint after {attempts} attempts",
                                   attempts) from None
            raise ToDeadLetter("unavailable", "waited the longest wait allowed (AGENT_LLM__MAX_WAIT_S) for a slot "
                               f"in the endpoint's window after {attempts} attempts", attempts) from None
        if deadline_s is None:
            return slot, request
        left = deadline_s - (monotonic() - started)
        if request.timeout_s is None or left < request.timeout_s:
            request = dataclasses.replace(request, timeout_s=max(0.05, left))
        return slot, request

    def _policy(self, task: Task) -> str:
        """What the task's kind does while the primary is unavailable: wait, fallback or fail_fast."""
        try:
            agent = self.agents.get(task.kind)
        except PoisonError:
            return self.default_unavailable
        return agent.unavailable or self.default_unavailable

    async def _capacity(self, task: Task, tokens: int, *, retry: bool, attempts: int = 0,
                        primary_only: bool = False, until: float | None = None) -> Endpoint:
        """Choose the endpoint to call and wait until it may be called (breaker, retry budget,
        Retry-After, rate limits); returns it.

        The primary, unless it is unavailable (its breaker open, or a probe out) and the kind's
        policy says otherwise: ``fail_fast`` dead-letters the task as ``unavailable`` at once;
        ``fallback`` takes the first fallback endpoint that is available, and while none is (nor
        the primary) it waits, within the task's deadline. With no fallback configured, a
        ``fallback`` kind waits for the primary as a ``wait`` kind does.
        """
        limit = self.config.max_wait_s if until is None else until - monotonic()
        try:
            if limit <= 0:
                raise TimeoutError
            async with asyncio.timeout(limit):
                return await self._choose(task, tokens, retry=retry, attempts=attempts, primary_only=primary_only)
        except EndpointUnavailable as exc:
            raise ToDeadLetter("unavailable", f"{exc} after {attempts} attempts", attempts) from exc
        except TimeoutError:
            why = self.primary.guard.why_waiting() if self.primary.guard is not None else None
            raise ToDeadLetter("unavailable", f"waited {self.config.max_wait_s:.0f} s for the model endpoint "
                               f"({why or 'rate limits'}) after {attempts} attempts", attempts) from None

    async def _choose(self, task: Task, tokens: int, *, retry: bool, attempts: int, primary_only: bool) -> Endpoint:
        primary = self.primary
        policy = "wait" if primary_only else self._policy(task)
        fallbacks = self.fallbacks
        while True:
            if policy == "wait" or primary.available or (policy == "fallback" and not fallbacks):
                return await self._acquire(primary, task, tokens, retry)
            if policy == "fail_fast":
                raise ToDeadLetter("unavailable", f"the model endpoint is unavailable ({primary.why_unavailable()}) "
                                   "and the kind's policy is fail_fast", attempts)
            for fallback in fallbacks:
                if fallback.available:
                    self.metrics.fallbacks.labels(endpoint=fallback.name).inc()
                    return await self._acquire(fallback, task, tokens, retry)
            self._time_left(task, attempts)  # every endpoint down: the deadline still holds
            await asyncio.sleep(0.1)

    async def _acquire(self, endpoint: Endpoint, task: Task, tokens: int, retry: bool) -> Endpoint:
        if endpoint.guard is not None:
            await endpoint.guard.acquire(retry=retry, task=task.key)
        if endpoint.limiter is not None:
            await endpoint.limiter.acquire(task.event.priority, tokens, *self._share(task))
        return endpoint

    def _share(self, task: Task) -> tuple[str, float, str]:
        """The task's tenant, its weight and its metric label."""
        return task.tenant, self.tenancy.weight(task.tenant), self.tenancy.label(task.tenant)

    async def _reserve_budget(self, task: Task, tokens: int, attempts: int, until: float | None = None) -> Spend:
        """Reserve the call's estimated tokens of its tenant's budget, across replicas, before the
        call. Over budget, the policy decides: ``wait`` for room (the next period, or calls that
        used less than they reserved), within the task's deadline; ``dead_letter`` (`budget`). A
        call that alone is more than the whole budget can never go: dead letter at once."""
        tenant, weight, label = self._share(task)
        spend = Spend(tenant, weight, label, task.kind)
        if self.budgets is None or not self.budgets.applies(tenant):
            return spend
        refused = False
        while True:
            try:
                spend.reservation = await self.budgets.reserve(tenant, tokens)
                return spend
            except OverBudget as exc:
                policy = "dead_letter" if exc.never else self.tenancy.over_budget
                if not refused:
                    refused = True
                    self.metrics.budget_refusals.labels(tenant=label, policy=policy).inc()
                    log.info("task_id=%s: %s; %s", task.key, exc,
                             "dead letter" if policy == "dead_letter" else f"waiting (next period in {exc.wait_s:.0f}s)")
                if policy == "dead_letter":
                    raise ToDeadLetter("budget", str(exc), attempts) from exc
                self._time_left(task, attempts)  # a deadline still holds while it waits
                if until is not None and monotonic() >= until:  # and so does the longest wait
                    raise ToDeadLetter("budget", f"{exc}; waited {self.config.max_wait_s:.0f} s for room",
                                       attempts) from exc
                with self.waits.waiting(task.key, "budget", until):
                    await asyncio.sleep(min(exc.wait_s, 1.0) * random.uniform(0.5, 1.0) + 0.01)

    async def _settle_budget(self, spend: Spend, outcome: Any) -> None:
        """Correct the reservation: the tokens the endpoint reported; nothing for a call never sent
        or refused by the endpoint (a 429, a revoked key, nothing listening); the estimate stands for
        a call whose fate is unknown (a timeout, a 5xx, a truncated answer, a cancellation)."""
        if spend.reservation is None:
            return
        if spend.tokens is not None:
            actual = spend.tokens
        elif not spend.sent or (isinstance(outcome, tuple) and isinstance(outcome[0], EndpointFault | LLMRateLimited)):
            actual = 0
        else:
            return
        if self.budgets is not None:
            await self.budgets.settle(spend.reservation, actual)

    async def _account(self, answer: ChatResult, needed: int, request: ChatRequest, endpoint: Endpoint,
                       spend: Spend | None) -> None:
        """What the endpoint reported the call used: for the tenant's tokens and cost, and to correct
        the estimate the rate limits counted."""
        if spend is not None:
            self._spent(spend, answer.prompt_tokens, answer.completion_tokens,
                        answer.model, request.model or endpoint.model or self.model_name)
        if endpoint.limiter is not None:
            await endpoint.limiter.reconcile(needed, answer.prompt_tokens + answer.completion_tokens,
                                             *(spend.share if spend is not None else ()))

    def _spent(self, spend: Spend, prompt: int, completion: int, answered_by: str | None, asked: str | None) -> None:
        """Count the call's tokens, and its cost by the price table, for its tenant and kind."""
        spend.tokens = prompt + completion
        tokens = self.metrics.tenant_tokens
        tokens.labels(tenant=spend.label, kind=spend.kind, direction="input").inc(prompt)
        tokens.labels(tenant=spend.label, kind=spend.kind, direction="output").inc(completion)
        cost = self.tenancy.cost(answered_by, prompt, completion)
        if cost is None:
            cost = self.tenancy.cost(asked, prompt, completion)
        if cost is not None:
            self.metrics.tenant_cost.labels(tenant=spend.label, kind=spend.kind).inc(cost)

    def _endpoint_answered(self, guard: EndpointGuard | None, task_key: str | None = None) -> None:
        if guard is not None:
            guard.success(task_key)

    async def _endpoint_failed(self, exc: RetryableError, guard: EndpointGuard | None,
                               task_key: str | None = None) -> bool:
        """Tell the guard; True when the failure opened the breaker (or is a 429: the endpoint
        asked every caller to wait)."""
        if isinstance(exc, LLMRateLimited):
            if guard is not None and exc.delay:
                await guard.retry_after(exc.delay)  # a rate limit is not a broken endpoint
            return True
        if guard is None:
            return False
        return bool(guard.failure(task_key))

    def _endpoint_unusable(self, exc: EndpointFault, guard: EndpointGuard | None) -> None:
        if guard is not None:
            guard.endpoint_fault(exc.reason, str(exc))

    async def _maybe_shadow(self, task: Task, agent: Agent, task_input: BaseModel) -> None:
        """Re-run a sample of duplicates in shadow and count how often the answer would differ.

        For a kind in rollout the shadow run is the version that did not answer (counted by
        ``agent_rollout_divergence``), so the two versions are compared on the same tasks; otherwise
        it is the same version again (``agent_shadow_runs``). Nothing is written: no ledger step, no
        result. One attempt per step, no retries.
        """
        if random.random() >= self.config.shadow_sample_rate or any(s.tools for s in agent.steps):
            return  # a step that acts cannot be run in shadow: its answers depend on its side effects
        stored = await self.ledger.get(task.key)
        if stored is None or stored.state != "succeeded" or stored.fingerprint != task.fingerprint:
            return  # only a true duplicate of a stored result
        other = agent.other_version(stored.fields.get("prompt_version", ""))

        def count(outcome: str) -> None:
            if other is None:
                self.metrics.shadow_runs.labels(outcome=outcome).inc()
            else:
                self.metrics.rollout_divergence.labels(kind=task.kind, outcome=outcome).inc()

        if other is not None:
            agent = other
            try:
                task_input = other.parse_input(task.event.input)
            except PoisonError:
                count("failed")
                return
        outputs: dict[str, dict[str, Any]] = {}
        try:
            for name in TopologicalSorter(agent.graph).static_order():  # one call at a time: a sample
                step = agent.step(name)
                previous = {need: outputs[need] for need in agent.graph[name]}
                messages, schema = step.messages(task_input, previous), step.schema(task_input, previous)
                needed = estimate_tokens(messages, schema) + self.config.max_output_tokens
                # a shadow call is a call: the breaker, the rate limits, Retry-After, the window and
                # the tenant's budget hold for it too
                await self._capacity(task, needed, retry=False, primary_only=True)
                request = dataclasses.replace(
                    self._request(task, step, messages, schema, None, endpoint=self.primary),
                    idempotency_key=f"{task.key}:{step.name}:shadow", tools=(), tool_choice=None)
                spend = await self._reserve_budget(task, needed, 0)
                outcome: Any = None
                try:
                    outcome = await self._one_call(request, step, task_input, needed, 1, 0, self.primary,
                                                   task_key=task.key, spend=spend)
                finally:
                    await self._settle_budget(spend, outcome)
                if not isinstance(outcome, dict):
                    raise outcome[0] if isinstance(outcome, tuple) else InvalidOutput("schema", "asked for tools")
                outputs[step.name] = outcome
        except (RetryableError, PermanentError, InvalidOutput, EndpointFault, ToDeadLetter) as exc:
            count("failed")
            log.info("task_id=%s: shadow run failed: %s", task.key, exc)
            return
        same = digest(canonical_json(agent.result(outputs))) == stored.fields.get("result_digest")
        count("same" if same else "different")


@dataclass(slots=True)
class Spend:
    """One model call, as its tenant pays for it: its share of the quota, its budget reservation,
    and the tokens the endpoint reported."""

    tenant: str
    weight: float
    label: str
    kind: str
    reservation: Reservation | None = None
    sent: bool = False  # the call was handed to the endpoint
    tokens: int | None = None  # prompt + completion, as the endpoint reported them

    @property
    def share(self) -> tuple[str, float]:
        return self.tenant, self.weight


class ToolCalls(tuple[dict[str, str], ...]):
    """The model's answer to a step with tools: the calls it asks for, ``{"id", "name", "arguments"}``."""

    __slots__ = ()


class _GraphRun:
    """One run of an agent's step graph for one task, under one claim."""

    def __init__(self, steps: Steps, task: Task, agent: Agent, task_input: BaseModel, claim: Claim,
                 record: Record | None) -> None:
        self.steps, self.task, self.agent, self.task_input, self.claim = steps, task, agent, task_input, claim
        self.record = record
        self.journaled = agent.journaled
        self.journal: dict[str, dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {}  # step -> its record (journaled or new)
        self.outputs: dict[str, dict[str, Any]] = {}
        self.attempts = claim.attempts
        self.declared = [s.name for s in agent.steps]
        self.read = agent.read_steps
        # step (or piece) -> (endpoint, model) of each answered by a fallback, journaled or new
        self.degraded: dict[str, tuple[str, str]] = {}
        self._answered: dict[str, tuple[str, str]] = {}  # step -> who answered its call in this run

    async def start(self) -> None:
        if self.journaled:
            self.journal = await self.steps.ledger.steps(self.task.key)
        if len(self.declared) == 1:  # one step (most kinds): no graph to walk
            await self._step(self.declared[0])
            return
        order = TopologicalSorter(self.agent.graph)
        order.prepare()
        running: dict[asyncio.Task[str], str] = {}
        try:
            while order.is_active():
                ready = order.get_ready()
                if len(ready) == 1 and not running:  # a chain, or a single step: no task to schedule
                    order.done(await self._step(ready[0]))
                    continue
                for name in ready:
                    running[asyncio.create_task(self._step(name))] = name
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for finished in sorted(done, key=lambda t: self.declared.index(running[t])):
                    running.pop(finished)
                    order.done(finished.result())  # the first failure (in declaration order) is raised
        finally:
            await _cancel(running)

    async def _step(self, name: str) -> str:
        """Re-use the journaled record of step ``name`` or run it; returns its name."""
        agent, needs = self.agent, self.agent.graph[name]
        step = agent.step(name)
        input_digest = self._input_digest(needs)
        recorded = self._reusable(step, input_digest)
        if recorded is not None:
            self.outputs[name], self.records[name] = recorded["output"], recorded
            return name
        previous: dict[str, Any] = {}
        for need in needs:  # in the order the step names them, never in the order they finished
            record = self.records[need]
            if record.get("digest") != digest(canonical_json(record.get("output"))):
                raise ToDeadLetter("permanent", f"step {need}: recorded output does not match its digest",
                                   self.attempts)
            previous[need] = record["output"]
        if step.fit == "map_reduce" and not self._fits(step, self.task_input, previous):
            output = await self._map_reduce(step, previous, input_digest)
        else:
            output = await self._call(step, self.task_input, previous)
        self.outputs[name] = output
        self.records[name] = await self._record(step, output, input_digest)
        return name

    def _reusable(self, step: Step, input_digest: str) -> dict[str, Any] | None:
        """The journaled record of ``step`` when it is current: same prompt version, computed from the
        same inputs, and its output matching its digest (counted as re-used); else None."""
        recorded = self.journal.get(step.name)
        if (
            recorded is None
            or recorded.get("prompt_version") != step.prompt_version
            or recorded.get("input_digest", "") != input_digest
            or recorded.get("digest") != digest(canonical_json(recorded.get("output")))
        ):
            return None
        self.steps.metrics.steps_reused.inc()
        endpoint = recorded.get("endpoint")
        if endpoint and endpoint != "primary":
            self.degraded[step.name] = (str(endpoint), str(recorded.get("model", "")))
        return recorded

    async def _call(self, step: Step, task_input: BaseModel, previous: dict[str, Any]) -> dict[str, Any]:
        answered: list[tuple[str, str]] = []
        try:
            if step.tools:
                loop = ToolLoop(self.steps, self.task, step, task_input, previous, self.claim.fence, self.attempts,
                                self.record, answered)
                try:
                    return await loop.run()
                finally:
                    self.attempts = max(self.attempts, loop.attempts)
            output, attempts = await self.steps._call_step(self.task, step, task_input, previous, self.claim.fence,
                                                           self.attempts, answered=answered)
            self.attempts = max(self.attempts, attempts)
            assert isinstance(output, dict)  # offered no tools, the model's answer is the output
            return output
        finally:
            # a step answered (in any of its rounds) by a fallback is degraded; else the last answer's
            by = next((a for a in answered if a[0] != "primary"), answered[-1] if answered else None)
            if by is not None:
                self._answered[step.name] = by
                if by[0] != "primary":
                    self.degraded[step.name] = by

    async def _record(self, step: Step, output: dict[str, Any], input_digest: str) -> dict[str, Any]:
        """Journal ``step``'s output under the task's fence (when the agent journals); returns the record."""
        record = {
            "output": output, "input_digest": input_digest,
            "prompt_version": step.prompt_version, "fence": self.claim.fence, "attempt": self.attempts,
        }
        if self.journaled or step.name in self.read:  # the digest is for the journal and the steps after
            record["digest"] = digest(canonical_json(output))
        answered = self._answered.get(step.name)
        if answered is not None:  # which endpoint answered (a fallback's answer is degraded)
            record["endpoint"], record["model"] = answered
        if self.journaled:
            try:
                await self.steps.ledger.record_step(self.task.key, self.claim.fence, step.name, record)
            except StaleFence as exc:
                raise LostFence(str(exc)) from exc
        return record

    def _fits(self, step: Step, task_input: BaseModel, previous: dict[str, Any]) -> bool:
        cfg = self.steps.config
        needed = estimate_tokens(step.messages(task_input, previous), step.schema(task_input, previous))
        return needed + cfg.max_output_tokens <= cfg.context_tokens

    async def _map_reduce(self, step: Step, previous: dict[str, Any], input_digest: str) -> dict[str, Any]:
        """The step over pieces of its input that each fit the window, then the reduce of their outputs.

        Each piece is journaled as ``<step>-part-NNN`` (its input digest covers the piece's text), so
        a resumed task calls the model only for the pieces not yet journaled. Nothing is truncated:
        a paragraph that does not fit alone, or a reduce request that does not fit, is ``oversize``.
        """
        assert step.chunk_field is not None
        pieces = self._pieces(step, previous)
        partials: list[dict[str, Any]] = []
        for number, text in enumerate(pieces, 1):
            piece_input = self.task_input.model_copy(update={step.chunk_field: text})
            part = _Piece(step, f"{step.name}-part-{number:03d}", step.messages)
            partials.append(await self._journaled_call(part, piece_input, previous,
                                                       digest(canonical_json([input_digest, text]))))
        reduce = _Piece(step, step.name, lambda task_input, _previous: step.reduce_messages(task_input, partials))
        if not self._fits(reduce, self.task_input, {}):
            raise ToDeadLetter("oversize", f"step {step.name}: the outputs of its {len(pieces)} pieces do not fit "
                               "the model's window together", self.attempts)
        return await self._call(reduce, self.task_input, {})

    def _pieces(self, step: Step, previous: dict[str, Any]) -> list[str]:
        """The step's ``chunk_field`` split on blank lines and packed, in order, into pieces that fit."""
        field = step.chunk_field
        assert field is not None
        text = str(getattr(self.task_input, field))
        paragraphs = [p.strip() for p in _PARAGRAPHS.split(text) if p.strip()]

        def fits(candidate: str) -> bool:
            return self._fits(step, self.task_input.model_copy(update={field: candidate}), previous)

        pieces: list[str] = []
        current = ""
        for paragraph in paragraphs:
            joined = f"{current}\n\n{paragraph}" if current else paragraph
            if fits(joined):
                current = joined
                continue
            if not fits(paragraph):
                raise ToDeadLetter("oversize", f"step {step.name}: a paragraph of {len(paragraph)} characters does "
                                   "not fit the model's window on its own", self.attempts)
            pieces.append(current)
            current = paragraph
        if current:
            pieces.append(current)
        return pieces

    async def _journaled_call(self, step: Step, task_input: BaseModel, previous: dict[str, Any],
                              input_digest: str) -> dict[str, Any]:
        """One call of ``step`` (a piece), re-used from the journal when it is there and current."""
        recorded = self._reusable(step, input_digest)
        if recorded is not None:
            return dict(recorded["output"])
        output = await self._call(step, task_input, previous)
        await self._record(step, output, input_digest)
        return output

    def _input_digest(self, needs: tuple[str, ...]) -> str:
        """What a step was computed from: nothing (''), the one step it reads (that step's digest, as
        a chain always recorded it), or the digests of several, in the step's order."""
        if not needs:
            return ""
        if len(needs) == 1:
            return str(self.records[needs[0]]["digest"])
        return digest(canonical_json([[need, self.records[need]["digest"]] for need in needs]))


class _Piece(Step):
    """A piece of a ``map_reduce`` step, or its reduce: the step's schema, checks and versions under a
    name of its own (its journal entry and attempt budget), with the messages given."""

    def __init__(self, step: Step, name: str, messages: Callable[[BaseModel, Mapping[str, Any]], Messages]) -> None:
        self.step, self.name, self._messages = step, name, messages
        self.prompt_version, self.output_model = step.prompt_version, step.output_model
        self.model, self.temperature = step.model, step.temperature

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        return self._messages(task_input, previous)

    def schema(self, task_input: BaseModel, previous: Mapping[str, Any]) -> dict[str, Any]:
        return self.step.schema(task_input, previous)

    def check(self, task_input: BaseModel, output: BaseModel) -> None:
        self.step.check(task_input, output)


_PARAGRAPHS = re.compile(r"\n[ \t]*\n")


async def _cancel(running: dict[asyncio.Task[str], str]) -> None:
    """Cancel steps still running (a sibling failed, or the task itself was cancelled) and wait for them."""
    for task in running:
        task.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)


def _window_outcome(exc: RetryableError, endpoints_fault: bool) -> WindowOutcome:
    """A 429 or a timeout says "too many calls": the fleet's window is cut. A failure that opened
    the breaker is an outage: the window starts over. Any other failure tells it nothing."""
    if isinstance(exc, LLMRateLimited):
        return "rate_limited"
    if isinstance(exc, LLMTimeout):
        return "timeout"
    return "outage" if endpoints_fault else "none"
