"""One step's model calls: attempts counted in the ledger under the task's fence, the endpoint's own
failures given back, the task's own failures backed off and retried within its attempts.

A call ends as one :data:`~service.pipeline.call_outcome.CallOutcome`: the step's output, the tools
the model asks to call, or a failure with its blame and delay. Whose a failure is decides what it
costs: the task's spends an attempt (and a back-off); the endpoint's (a 429, a revoked key, nothing
listening) is refunded and waited out. The room for each call (budget, endpoint, window) is the
:class:`~service.pipeline.capacity.Capacity`'s.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from time import monotonic
from typing import Any

from pydantic import BaseModel

from dedup.ledger import Attempt, AttemptsExhausted, Ledger, StaleFence
from service.agents.base import Previous, Step
from service.agents.tasks import Task
from service.core.errors import EndpointFault, InvalidOutput, LLMRateLimited, LLMTimeout, PermanentError, RetryableError
from service.core.metrics import Metrics
from service.core.tracing import Tracing
from service.llm.affinity import prompt_cache_key
from service.llm.client import ChatRequest, ChatResult
from service.llm.endpoints import Endpoint
from service.llm.guard import EndpointGuard
from service.llm.window import Outcome as WindowOutcome
from service.llm.window import Slot
from service.pipeline.base import LostFence, ProcessorConfig, ToDeadLetter, estimate_tokens
from service.pipeline.call_outcome import Answer, CallOutcome, Failure, ToolCalls
from service.pipeline.capacity import Capacity, Spend
from service.pipeline.waits import Waits

log = logging.getLogger(__name__)


class CallLoop:
    """The model calls of one step at a time, within the task's attempts and deadline.

    Owns no state between calls: the attempts are the ledger's, the room for a call the
    ``capacity``'s, the waits on the shared board. It is also what the tool loop
    (:class:`~service.pipeline.tools.ToolLoop`) is given: :meth:`call_step`, the ledger, the
    metrics, the clock, the worker's id and :meth:`export_audit`."""

    def __init__(self, *, ledger: Ledger, capacity: Capacity, waits: Waits, metrics: Metrics,
                 config: ProcessorConfig, clock: Callable[[], datetime], tracing: Tracing, model_name: str,
                 worker_id: str, audit: Callable[[str], Awaitable[None]]) -> None:
        self.ledger = ledger
        self.capacity = capacity
        self.waits = waits
        self.metrics = metrics
        self.config = config
        self.clock = clock
        self.tracing = tracing
        self.model_name = model_name
        self.worker_id = worker_id
        self.audit = audit  # sends a task's new audit entries to the audit topic, best effort

    async def export_audit(self, task_key: str) -> None:
        """Send the task's new audit entries to the audit topic; a failure waits for the next pass."""
        await self.audit(task_key)

    async def call_step(
        self,
        task: Task,
        step: Step,
        task_input: BaseModel,
        previous: Previous,
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

        While the primary endpoint is unavailable the kind's policy decides
        (:meth:`Capacity.endpoint`); the endpoint and model that answered are appended to ``answered``."""
        messages, schema, needed = self.request_size(step, task_input, previous, attempts, conversation)
        retry = False
        # every wait before an attempt (budget, endpoint, window, and the calls given back: 429s,
        # endpoint faults) ends by this time; then the task is dead-lettered (`budget`, `unavailable`)
        waits_until = monotonic() + self.config.max_wait_s
        guard = self.capacity.guard
        why_endpoint = guard.why_waiting if guard is not None else None
        cache_key = prompt_cache_key(task.kind, step.name, step.prompt_version)  # its endpoint, with replicas
        refused = 0  # calls the endpoint refused in a row
        while True:
            spend = await self.capacity.reserve(task, needed, attempts, waits_until)  # or dead letter `budget`
            outcome: CallOutcome | None = None
            try:
                with self.waits.waiting(task.key, "endpoint", waits_until, why_endpoint):
                    endpoint = await self.capacity.endpoint(task, needed, retry=retry, attempts=attempts,
                                                            until=waits_until, cache_key=cache_key)
                remaining = self.capacity.time_left(task, attempts)  # after any wait for the endpoint
                attempt = await self._begin_attempt(task, step, fence)
                attempts = attempt.total
                request = self.request(task, step, messages, schema, remaining, offer_tools, endpoint, attempts)
                outcome = await self.call_once(request, step, task_input, needed, attempt.step, attempts, endpoint,
                                               answered, deadline_s=remaining, priority=task.event.priority,
                                               spend=spend, task_key=task.key, waits_until=waits_until)
            finally:
                await self.capacity.settle(spend, outcome)
            if not isinstance(outcome, Failure):
                return (outcome.output if isinstance(outcome, Answer) else outcome), attempts
            if outcome.endpoints_fault:
                refused += 1
                with self.waits.waiting(task.key, "refused", waits_until, why_endpoint):
                    await self._give_attempt_back(task, step, fence, outcome, endpoint, waits_until, refused)
                attempts -= 1
                retry = False  # the next call is not a retry of the task's
                continue
            retry, refused = True, 0
            await self._spent_attempt(task, step, fence, attempt.step, attempts, outcome)
            waits_until = monotonic() + self.config.max_wait_s  # an attempt spent: the next may wait again

    def request_size(
        self, step: Step, task_input: BaseModel, previous: Previous, attempts: int,
        conversation: list[dict[str, Any]] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
        """The step's messages and schema, and the tokens they need with the answer: never more than
        the model's window, which is never truncated silently."""
        cfg = self.config
        messages = conversation if conversation is not None else step.messages(task_input, previous)
        schema = step.schema(task_input, previous)
        needed = estimate_tokens(messages, schema, [t.spec() for t in step.tools], cfg.count_tokens)
        needed += cfg.max_output_tokens
        if needed > cfg.context_tokens:
            raise ToDeadLetter("oversize", f"step {step.name}: about {needed} tokens with the answer, "
                               f"the model's window is {cfg.context_tokens}", attempts)
        return messages, schema, needed

    async def _begin_attempt(self, task: Task, step: Step, fence: int) -> Attempt:
        """Count an attempt of the step in the ledger, under the task's fence."""
        try:
            return await self.ledger.begin_attempt(task.key, fence, step.name, self.config.max_attempts)
        except StaleFence as exc:
            raise LostFence(str(exc)) from exc
        except AttemptsExhausted as exc:  # used up before a crash or a redelivery
            raise ToDeadLetter("exhausted", f"step {step.name}: {exc}", exc.total) from exc

    def request(self, task: Task, step: Step, messages: list[dict[str, Any]], schema: dict[str, Any],
                remaining: float | None, offer_tools: bool = False, endpoint: Endpoint | None = None,
                attempt: int = 1) -> ChatRequest:
        """The step's request; to a fallback, with its model (unless the step names one) and timeout."""
        cfg = self.config
        limit = endpoint.timeout_s if endpoint is not None and endpoint.timeout_s is not None else cfg.llm_timeout_s
        timeout = limit if remaining is None else max(0.05, min(limit, remaining))
        return ChatRequest(
            messages=messages,
            schema=schema,
            schema_name=f"{task.kind}_{step.name.lstrip('@')}",  # a pseudo-step (@summary) too
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
            kind=task.kind,
            cache_key=prompt_cache_key(task.kind, step.name, step.prompt_version),
        )

    async def _give_attempt_back(self, task: Task, step: Step, fence: int, failure: Failure, endpoint: Endpoint,
                                 waits_until: float, refused: int = 1) -> None:
        """The endpoint failed, not the task (its ``refused``-th refusal in a row): refund the attempt
        and wait for the endpoint (:func:`refusal_wait`), until ``waits_until`` at most (past it, the
        next :meth:`Capacity.endpoint` dead-letters the task)."""
        if not await self.ledger.refund_attempt(task.key, fence, step.name):
            raise LostFence(f"task {task.key}: fence {fence} no longer holds the task")
        log.info("task_id=%s step=%s: the endpoint %s failed (%s); no attempt spent",
                 task.key, step.name, endpoint.name, failure.error)
        left = waits_until - monotonic()
        if left > 0 and endpoint.accepting and (endpoint.available or self.capacity.policy(task) == "wait"):
            cfg = self.config
            delay = refusal_wait(failure.delay, refused, windowed=endpoint.window is not None,
                                 base_s=cfg.backoff_base_s, max_s=cfg.backoff_max_s)
            if delay > 0:
                await asyncio.sleep(min(left, delay))

    async def _spent_attempt(self, task: Task, step: Step, fence: int, step_attempt: int, attempts: int,
                             failure: Failure) -> None:
        """The task's own failure: its attempt is spent; back off before the next."""
        # the attempt's outcome is known: a worker that dies from here on gives nothing back
        if not await self.ledger.end_attempt(task.key, fence, step.name):
            raise LostFence(f"task {task.key}: fence {fence} no longer holds the task")
        with self.waits.waiting(task.key, "backoff", monotonic() + self.config.backoff_max_s):
            await self._back_off(step, step_attempt, attempts, failure, task.key)

    async def _back_off(self, step: Step, step_attempt: int, attempts: int, failure: Failure, task_key: str) -> None:
        """The task's own failure: dead-letter it after its last attempt, else wait before the next."""
        cfg = self.config
        if step_attempt >= cfg.max_attempts:
            reason = "invalid_output" if isinstance(failure.error, InvalidOutput) else "exhausted"
            raise ToDeadLetter(reason, f"step {step.name}, {step_attempt} attempts: {failure.error}", attempts)
        self.metrics.retries.inc()
        delay = failure.delay
        if delay is None:  # full jitter
            delay = random.uniform(0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (step_attempt - 1)))
        delay = min(delay, cfg.backoff_max_s)
        log.info("task_id=%s step=%s attempt %d failed (%s); retry in %.2fs",
                 task_key, step.name, step_attempt, failure.error, delay)
        await asyncio.sleep(delay)

    async def call_once(
        self, request: ChatRequest, step: Step, task_input: BaseModel, needed: int, step_attempt: int, attempts: int,
        endpoint: Endpoint | None = None, answered: list[tuple[str, str]] | None = None, *,
        deadline_s: float | None = None, priority: str = "batch", spend: Spend | None = None,
        task_key: str | None = None, waits_until: float | None = None,
    ) -> CallOutcome:
        """One model call: the step's output, the tools it asks to call, or a failure with its blame
        (the endpoint's for a 429 or an endpoint fault, never for a 5xx or a timeout, which the task's
        attempts pay for) and the delay it asks for. A 400 for this request dead-letters at once."""
        endpoint = endpoint or self.capacity.primary
        slot, request = await self.capacity.window_slot(endpoint, request, task_key=task_key or "",
                                                        deadline_s=deadline_s, attempts=attempts, priority=priority,
                                                        waits_until=waits_until)
        if spend is not None:
            spend.sent = True  # from here the endpoint may serve (and bill) the call
        answer = await self._chat(request, step, step_attempt, attempts, endpoint, slot, needed, spend, task_key)
        if isinstance(answer, Failure):
            return answer
        return self._read(answer, request, step, task_input, endpoint, answered)

    async def _chat(self, request: ChatRequest, step: Step, step_attempt: int, attempts: int, endpoint: Endpoint,
                    slot: Slot | None, needed: int, spend: Spend | None, task_key: str | None) -> ChatResult | Failure:
        """The call itself, told to the endpoint's guard and window: the endpoint's answer, or the failure."""
        guard, window = endpoint.guard, endpoint.window
        verdict: WindowOutcome = "ok"  # what the window learns from this call: the endpoint answered
        try:
            with self.tracing.llm_span(request.model or endpoint.model or self.model_name, step=step.name,
                                       attempt=step_attempt) as call:
                answer = await endpoint.client.chat(request)
                call.set_response(answer.model, answer.finish_reason, answer.prompt_tokens,
                                  answer.completion_tokens)
            await self.capacity.account(answer, needed, request, endpoint, spend)
        except PermanentError as exc:
            _endpoint_answered(guard, task_key)
            raise ToDeadLetter("permanent", str(exc), attempts) from exc
        except InvalidOutput as exc:
            _endpoint_answered(guard, task_key)
            return Failure(exc)
        except EndpointFault as exc:  # the endpoint's fault, not the task's: no attempt is spent
            verdict = "outage"
            _endpoint_unusable(exc, guard)
            return Failure(exc, "endpoint")
        except RetryableError as exc:
            # a 429 is the endpoint's: the attempt is given back. A 5xx or a timeout is the task's
            # attempt, whoever is to blame: the breaker (opened by many tasks failing) keeps the
            # others from calling, and a task that fails alone cannot call more than max_attempts times
            opened = await _endpoint_failed(exc, guard, task_key)
            verdict = _window_outcome(exc, opened)
            return Failure(exc, "endpoint" if isinstance(exc, LLMRateLimited) else "task", exc.delay)
        except BaseException:
            verdict = "none"
            raise
        finally:
            if slot is not None and window is not None:
                await window.release(slot, verdict)
        _endpoint_answered(guard, task_key)
        return answer

    @staticmethod
    def _read(answer: ChatResult, request: ChatRequest, step: Step, task_input: BaseModel, endpoint: Endpoint,
              answered: list[tuple[str, str]] | None) -> CallOutcome:
        """What the endpoint's answer says: the tools the model asks to call (when offered), or the
        step's output, parsed and checked."""
        if answer.tool_calls:
            if request.tool_choice == "auto":
                if answered is not None:
                    answered.append((endpoint.answers_as, answer.model))
                return ToolCalls(answer.tool_calls)
            return Failure(InvalidOutput("schema", f"{step.name}: asked for tools when told to answer"))
        try:
            output = step.parse(task_input, answer.content)
        except InvalidOutput as exc:
            return Failure(exc)
        if answered is not None:
            answered.append((endpoint.answers_as, answer.model))
        return Answer(output)


def refusal_wait(asked: float | None, refused: int, *, windowed: bool, base_s: float, max_s: float,
                 rng: random.Random | None = None) -> float:
    """How long a task waits after the endpoint refused its ``refused``-th call in a row, before it asks
    for the endpoint again: the delay the endpoint asked for (Retry-After), else a full-jitter back-off
    growing with the refusals in a row (up to ``base_s``, twice that, ... at most ``max_s`` and 1 s).

    Behind the fleet's window (``windowed``) the first refusal waits nothing: the 429 cut the window, and
    the retry waits for a slot of it like any call. A 429 of the window's probe one slot above the
    provider's limit so costs its task no sleep, and a burst's last tasks no tail of back-offs; a task
    refused again backs off as without a window."""
    if asked is not None:
        return asked
    n = refused - 1 if windowed else refused
    if n <= 0:
        return 0.0
    return (rng or random).uniform(0, min(max_s, 1.0, base_s * 2 ** (n - 1)))


def _endpoint_answered(guard: EndpointGuard | None, task_key: str | None = None) -> None:
    if guard is not None:
        guard.success(task_key)


async def _endpoint_failed(exc: RetryableError, guard: EndpointGuard | None, task_key: str | None = None) -> bool:
    """Tell the guard; True when the failure opened the breaker (or is a 429: the endpoint
    asked every caller to wait)."""
    if isinstance(exc, LLMRateLimited):
        if guard is not None and exc.delay:
            await guard.retry_after(exc.delay)  # a rate limit is not a broken endpoint
        return True
    if guard is None:
        return False
    return bool(guard.failure(task_key))


def _endpoint_unusable(exc: EndpointFault, guard: EndpointGuard | None) -> None:
    if guard is not None:
        guard.endpoint_fault(exc.reason, str(exc))


def _window_outcome(exc: RetryableError, endpoints_fault: bool) -> WindowOutcome:
    """A 429 or a timeout says "too many calls": the fleet's window is cut. A failure that opened
    the breaker is an outage: the window starts over. Any other failure tells it nothing."""
    if isinstance(exc, LLMRateLimited):
        return "rate_limited"
    if isinstance(exc, LLMTimeout):
        return "timeout"
    return "outage" if endpoints_fault else "none"
