"""Room for one model call: the tenant's budget reserved, the endpoint chosen and waited for, a slot
in the fleet's window; and what the call used, counted afterwards.

Every wait here ends by the time the caller gives (``AGENT_LLM__MAX_WAIT_S`` from the last attempt
spent) or the task's deadline, whichever comes first; past it the task is dead-lettered
(`budget`, `unavailable`, `expired`). Each wait registers on the wait board while it lasts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from time import monotonic

from service.agents.registry import AgentRegistry
from service.agents.tasks import Task
from service.core.errors import EndpointFault, LLMRateLimited, PoisonError
from service.core.metrics import Metrics
from service.llm.affinity import rendezvous
from service.llm.client import ChatRequest, ChatResult
from service.llm.endpoints import Endpoint
from service.llm.guard import EndpointGuard, EndpointUnavailable
from service.llm.tenancy import OverBudget, Reservation, Tenancy, TenantBudgets
from service.llm.window import AdaptiveWindow, Slot
from service.pipeline.base import ProcessorConfig, ToDeadLetter
from service.pipeline.call_outcome import CallOutcome, Failure
from service.pipeline.waits import Waits

log = logging.getLogger(__name__)


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


class Capacity:
    """The endpoints a worker may call and the tenants' budgets: owns the choice of endpoint (the
    primary, or a fallback by the kind's policy) and the waits for room before a call.

    It holds no state of its own between calls: the breakers, rate limits and windows are the
    endpoints', the budgets the tenants'; the waits are on the shared board (``waits``)."""

    def __init__(self, *, primary: Endpoint, fallbacks: tuple[Endpoint, ...], agents: AgentRegistry,
                 default_unavailable: str, tenancy: Tenancy, budgets: TenantBudgets | None, waits: Waits,
                 metrics: Metrics, config: ProcessorConfig, clock: Callable[[], datetime], model_name: str,
                 replicas: tuple[Endpoint, ...] = ()) -> None:
        self.primary = primary  # llm, guard, limiter and window of AGENT_LLM__*, as an endpoint
        self.replicas = replicas  # AGENT_LLM__REPLICAS: the primary's model at other endpoints
        self._peers = {e.name: e for e in (primary, *replicas)}
        self.fallbacks = fallbacks  # AGENT_LLM__FALLBACKS, in order
        self.agents = agents
        self.default_unavailable = default_unavailable  # AGENT_LLM__UNAVAILABLE: for a kind that names none
        self.tenancy = tenancy  # AGENT_TENANCY__*: weights, budgets, labels, prices
        self.budgets = budgets  # the tenants' hard token budgets (None: no budgets)
        self.waits = waits  # every record of this process that waits, why and until when
        self.metrics = metrics
        self.config = config
        self.clock = clock
        self.model_name = model_name

    @property
    def guard(self) -> EndpointGuard | None:
        """The primary endpoint's guard."""
        return self.primary.guard

    def accepting(self) -> bool:
        """Whether some loaded kind can do without the primary, or it accepts (see
        :attr:`service.pipeline.processor.TaskProcessor.accepting`)."""
        if any(peer.accepting for peer in self._peers.values()):
            return True
        policies = {agent.unavailable or self.default_unavailable for agent in self.agents}
        return "fail_fast" in policies or (
            "fallback" in policies and any(f.accepting for f in self.fallbacks))

    def holding(self) -> str | None:
        """What an endpoint holds back now: a degraded endpoint, an open breaker, a half-open probe out."""
        for endpoint in (self.primary, *self.replicas, *self.fallbacks):
            guard = endpoint.guard
            if guard is None:
                continue
            if guard.degraded:
                return f"endpoint {guard.label} {guard.degraded}"
            if guard.is_open:
                return f"breaker open on {guard.label}"
            if not guard.available:
                return f"breaker probe out on {guard.label}"
        return None

    def time_left(self, task: Task, attempts: int) -> float | None:
        """Seconds to the task's deadline (None: no deadline); past it, the task is dead-lettered."""
        remaining = task.remaining_s(self.clock())
        if remaining is not None and remaining <= 0:
            raise ToDeadLetter("expired", f"deadline passed after {attempts} attempts", attempts)
        return remaining

    def policy(self, task: Task) -> str:
        """What the task's kind does while the primary is unavailable: wait, fallback or fail_fast."""
        try:
            agent = self.agents.get(task.kind)
        except PoisonError:
            return self.default_unavailable
        return agent.unavailable or self.default_unavailable

    def home(self, cache_key: str | None) -> Endpoint:
        """The endpoint serving the primary's model that a call with ``cache_key`` goes to: the first,
        in the key's rendezvous order, that is available (its breaker closed, no probe out) and whose
        window has room; else the first available; else the first (which the call waits for). With no
        replica, or no key, the primary."""
        if not self.replicas or cache_key is None:
            return self.primary
        order = [self._peers[name] for name in rendezvous(self._peers, cache_key)]
        ready = [e for e in order if e.available]
        roomy = [e for e in ready if e.window is None or not e.window.full]
        return (roomy or ready or order)[0]

    async def endpoint(self, task: Task, tokens: int, *, retry: bool, attempts: int = 0,
                       primary_only: bool = False, until: float | None = None,
                       cache_key: str | None = None) -> Endpoint:
        """Choose the endpoint to call and wait until it may be called (breaker, retry budget,
        Retry-After, rate limits); returns it.

        The primary, unless it is unavailable (its breaker open, or a probe out) and the kind's
        policy says otherwise: ``fail_fast`` dead-letters the task as ``unavailable`` at once;
        ``fallback`` takes the first fallback endpoint that is available, and while none is (nor
        the primary) it waits, within the task's deadline. With no fallback configured, a
        ``fallback`` kind waits for the primary as a ``wait`` kind does. With replicas, "the primary"
        is the call's :meth:`home` by its prompt cache key.
        """
        limit = self.config.max_wait_s if until is None else until - monotonic()
        if limit > 0 and (at_once := self._at_once(task, retry, cache_key)) is not None:
            return at_once  # nothing to wait for: no timeout scope (a timer made and cancelled per call)
        try:
            if limit <= 0:
                raise TimeoutError
            async with asyncio.timeout(limit):
                return await self._choose(task, tokens, retry=retry, attempts=attempts, primary_only=primary_only,
                                          cache_key=cache_key)
        except EndpointUnavailable as exc:
            raise ToDeadLetter("unavailable", f"{exc} after {attempts} attempts", attempts) from exc
        except TimeoutError:
            why = self.primary.guard.why_waiting() if self.primary.guard is not None else None
            raise ToDeadLetter("unavailable", f"waited {self.config.max_wait_s:.0f} s for the model endpoint "
                               f"({why or 'rate limits'}) after {attempts} attempts", attempts) from None

    def _at_once(self, task: Task, retry: bool, cache_key: str | None) -> Endpoint | None:
        """The endpoint :meth:`_choose` would return without waiting: the call's home while it is
        available (whatever the kind's policy), with no rate limits of its own, its guard letting the
        call go now (:meth:`EndpointGuard.acquire_now`); else None, and the call goes the long way."""
        home = self.home(cache_key)
        limiter = home.limiter
        if not home.available or (limiter is not None and limiter.enabled):
            return None
        guard = home.guard
        return home if guard is None or guard.acquire_now(retry=retry, task=task.key) else None

    async def _choose(self, task: Task, tokens: int, *, retry: bool, attempts: int, primary_only: bool,
                      cache_key: str | None) -> Endpoint:
        policy = "wait" if primary_only else self.policy(task)
        fallbacks = self.fallbacks
        while True:
            primary = self.home(cache_key)
            if policy == "wait" or primary.available or (policy == "fallback" and not fallbacks):
                return await self._acquire(primary, task, tokens, retry)
            if policy == "fail_fast":
                raise ToDeadLetter("unavailable", f"the model endpoint is unavailable ({primary.why_unavailable()}) "
                                   "and the kind's policy is fail_fast", attempts)
            for fallback in fallbacks:
                if fallback.available:
                    self.metrics.fallbacks.labels(endpoint=fallback.name).inc()
                    return await self._acquire(fallback, task, tokens, retry)
            self.time_left(task, attempts)  # every endpoint down: the deadline still holds
            await asyncio.sleep(0.1)

    async def _acquire(self, endpoint: Endpoint, task: Task, tokens: int, retry: bool) -> Endpoint:
        if endpoint.guard is not None:
            await endpoint.guard.acquire(retry=retry, task=task.key)
        if endpoint.limiter is not None:
            await endpoint.limiter.acquire(task.event.priority, tokens, *self.share(task))
        return endpoint

    def share(self, task: Task) -> tuple[str, float, str]:
        """The task's tenant, its weight and its metric label."""
        return task.tenant, self.tenancy.weight(task.tenant), self.tenancy.label(task.tenant)

    async def window_slot(self, endpoint: Endpoint, request: ChatRequest, *, task_key: str,
                          deadline_s: float | None, attempts: int, priority: str,
                          waits_until: float | None) -> tuple[Slot | None, ChatRequest]:
        """A slot in the endpoint's window of the fleet's calls (None: it has none), waited for within
        the task's deadline (``deadline_s`` from now) and until ``waits_until`` at most; the request's
        timeout is cut by the wait, so the call still ends by the deadline."""
        window = endpoint.window
        if window is None:
            return None, request
        started = monotonic()
        slot = window.kept_slot()  # a slot the process kept: no wait, so no timeout scope
        if slot is None:
            slot = await self._wait_for_slot(window, task_key=task_key, deadline_s=deadline_s, attempts=attempts,
                                             priority=priority, waits_until=waits_until)
        if deadline_s is None:
            return slot, request
        left = deadline_s - (monotonic() - started)
        if request.timeout_s is None or left < request.timeout_s:
            request = dataclasses.replace(request, timeout_s=max(0.05, left))
        return slot, request

    async def _wait_for_slot(self, window: AdaptiveWindow, *, task_key: str, deadline_s: float | None, attempts: int,
                             priority: str, waits_until: float | None) -> Slot:
        """A slot of ``window`` from Redis or the line of this process's calls, within the task's
        deadline and until ``waits_until`` at most; past either, the task is dead-lettered."""
        max_wait_s = self.config.max_wait_s if waits_until is None else waits_until - monotonic()
        with self.waits.waiting(task_key, "window", monotonic() + max_wait_s):
            limit = max_wait_s if deadline_s is None else min(deadline_s, max_wait_s)
            try:  # a timeout scope, not wait_for: no task of its own per call (a free slot never suspends)
                async with asyncio.timeout(max(limit, 0.0)):
                    return await window.acquire(priority)
            except TimeoutError:
                if deadline_s is not None and deadline_s <= max_wait_s:
                    raise ToDeadLetter("expired", "deadline passed waiting for the endpoint after "
                                       f"{attempts} attempts", attempts) from None
                raise ToDeadLetter("unavailable", "waited the longest wait allowed (AGENT_LLM__MAX_WAIT_S) for a "
                                   f"slot in the endpoint's window after {attempts} attempts", attempts) from None

    async def reserve(self, task: Task, tokens: int, attempts: int, until: float | None = None) -> Spend:
        """Reserve the call's estimated tokens of its tenant's budget, across replicas, before the
        call. Over budget, the policy decides: ``wait`` for room (the next period, or calls that
        used less than they reserved), within the task's deadline; ``dead_letter`` (`budget`). A
        call that alone is more than the whole budget can never go: dead letter at once."""
        tenant, weight, label = self.share(task)
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
                self.time_left(task, attempts)  # a deadline still holds while it waits
                if until is not None and monotonic() >= until:  # and so does the longest wait
                    raise ToDeadLetter("budget", f"{exc}; waited {self.config.max_wait_s:.0f} s for room",
                                       attempts) from exc
                with self.waits.waiting(task.key, "budget", until):
                    await asyncio.sleep(min(exc.wait_s, 1.0) * random.uniform(0.5, 1.0) + 0.01)

    async def settle(self, spend: Spend, outcome: CallOutcome | None) -> None:
        """Correct the reservation: the tokens the endpoint reported; nothing for a call never sent
        or refused by the endpoint (a 429, a revoked key, nothing listening); the estimate stands for
        a call whose fate is unknown (a timeout, a 5xx, a truncated answer, a cancellation)."""
        if spend.reservation is None:
            return
        if spend.tokens is not None:
            actual = spend.tokens
        elif not spend.sent or (isinstance(outcome, Failure) and isinstance(outcome.error,
                                                                            EndpointFault | LLMRateLimited)):
            actual = 0
        else:
            return
        if self.budgets is not None:
            await self.budgets.settle(spend.reservation, actual)

    async def account(self, answer: ChatResult, needed: int, request: ChatRequest, endpoint: Endpoint,
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
        tokens_in, tokens_out = self.metrics.tenant_tokens_of(spend.label, spend.kind)
        tokens_in.inc(prompt)
        tokens_out.inc(completion)
        cost = self.tenancy.cost(answered_by, prompt, completion)
        if cost is None:
            cost = self.tenancy.cost(asked, prompt, completion)
        if cost is not None:
            self.metrics.tenant_cost.labels(tenant=spend.label, kind=spend.kind).inc(cost)
