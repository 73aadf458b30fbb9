"""Running an agent's steps: one model call each, journaled and resumed, retried within the task's
attempts; the endpoint's own failures (breaker, 429, auth) spend no attempt of the task."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from dedup.ledger import Attempt, AttemptsExhausted, Claim, Ledger, StaleFence
from service.agents.base import Agent, Step
from service.agents.tasks import Task, canonical_json, digest
from service.core.errors import (
    EndpointFault,
    InvalidOutput,
    LLMRateLimited,
    PermanentError,
    RetryableError,
)
from service.core.metrics import Metrics
from service.core.tracing import Tracing
from service.llm.client import ChatRequest
from service.llm.guard import EndpointGuard, RateLimiter
from service.pipeline.base import ChatClient, LostFence, ProcessorConfig, ToDeadLetter, estimate_tokens

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
                    raise ToDeadLetter("permanent", f"step {prev_name}: recorded output does not match its digest", attempts)
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
                    raise LostFence(str(exc)) from exc
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
        """Call the model for one step until it answers with a valid output, within the task's
        attempts and deadline. Returns the output and the task's attempt count."""
        messages, schema, needed = self._request_size(step, task_input, previous, attempts)
        last: Exception | None = None
        while True:
            remaining = self._time_left(task, attempts)
            await self._capacity(task, needed, retry=last is not None)
            attempt = await self._begin_attempt(task, step, fence)
            attempts = attempt.total
            request = self._request(task, step, messages, schema, remaining)
            outcome = await self._one_call(request, step, task_input, needed, attempt.step, attempts)
            if isinstance(outcome, dict):
                return outcome, attempts
            last, delay, endpoint_fault = outcome
            if endpoint_fault:
                await self._give_attempt_back(task, step, fence, last, delay)
                attempts -= 1
                last = None  # the next call is not a retry of the task's
                continue
            await self._back_off(step, attempt.step, attempts, last, delay, task.key)

    def _request_size(
        self, step: Step, task_input: BaseModel, previous: dict[str, dict[str, Any]], attempts: int,
    ) -> tuple[list[dict[str, str]], dict[str, Any], int]:
        """The step's messages and schema, and the tokens they need with the answer: never more than
        the model's window, which is never truncated silently."""
        cfg = self.config
        messages = step.messages(task_input, previous)
        schema = step.schema(task_input, previous)
        needed = estimate_tokens(messages, schema) + cfg.max_output_tokens
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

    def _request(self, task: Task, step: Step, messages: list[dict[str, str]], schema: dict[str, Any],
                 remaining: float | None) -> ChatRequest:
        cfg = self.config
        timeout = cfg.llm_timeout_s if remaining is None else max(0.05, min(cfg.llm_timeout_s, remaining))
        return ChatRequest(
            messages=messages,
            schema=schema,
            schema_name=f"{task.kind}_{step.name}",
            idempotency_key=f"{task.key}:{step.name}",
            timeout_s=timeout,
            traceparent=self.tracing.current_traceparent() or task.traceparent,
        )

    async def _give_attempt_back(self, task: Task, step: Step, fence: int, failure: Exception,
                                 delay: float | None) -> None:
        """The endpoint failed, not the task: refund the attempt and wait for the endpoint."""
        if not await self.ledger.refund_attempt(task.key, fence, step.name):
            raise LostFence(f"task {task.key}: fence {fence} no longer holds the task")
        log.info("task_id=%s step=%s: the endpoint failed (%s); waiting for it, no attempt spent",
                 task.key, step.name, failure)
        if self.guard is None or self.guard.accepting:
            await asyncio.sleep(delay if delay is not None else min(self.config.backoff_max_s, 1.0))

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
            raise ToDeadLetter("permanent", str(exc), attempts) from exc
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
