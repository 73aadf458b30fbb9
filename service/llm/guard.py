"""Protection of the model endpoint: a circuit breaker, a retry budget and a shared Retry-After.

- **Circuit breaker** (per endpoint): after ``failure_threshold`` consecutive retryable failures it
  opens for ``open_s``; then one probe call is let through (half-open); its success closes it.
  While it is open, tasks wait instead of spending attempts, so the in-flight window fills and the
  consumer pauses its partitions rather than spinning.
- **Retry budget**: retries may be at most ``ratio`` of first calls over a sliding window (plus a
  small floor), so a steady error rate cannot turn into a retry storm. A retry over budget waits.
- **Endpoint faults** (:meth:`EndpointGuard.endpoint_fault`: revoked key, unknown model, nothing
  listening) open the breaker at once and mark the endpoint ``degraded``: :attr:`accepting` turns
  False (the runner pauses consumption) and one probe per ``open_s`` is let through until a
  success clears it. ``agent_endpoint_degraded{endpoint,reason}`` is 1 meanwhile.
- **Retry-After is a fact about the endpoint**, not the task: a 429's delay is stored in Redis
  (``<prefix>:endpoint:{<digest>}:blocked_until``) and every replica waits it out before calling.
  The write is one script that only ever lengthens the key's TTL.
- **Rate limits** (:class:`RateLimiter`, in :mod:`service.llm.rates`, re-exported here): requests and
  tokens per minute across replicas, with a share reserved for interactive work, shared between
  tenants by weight when contended.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from dedup.client import RedisClient
from dedup.keys import Keys
from service.core.errors import EndpointFault, RetryableError
from service.core.metrics import Metrics
from service.llm.client import ChatRequest
from service.llm.rates import RateLimiter
from service.llm.tags import endpoint_label, endpoint_tag

__all__ = [
    "Decision", "EndpointGuard", "EndpointUnavailable", "GuardConfig", "Probe", "RateLimiter", "chat_probe",
    "endpoint_tag",
]

log = logging.getLogger(__name__)

# KEYS[1] the shared Retry-After key; ARGV[1] the wait in ms. Sets the key only when its
# remaining TTL is shorter (or it is missing, -2, or has none, -1): one replica never shortens another's wait.
# Returns 1 when it wrote.
EXTEND_BLOCK = """
local ttl = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[1])
if ttl < want then
  redis.call('SET', KEYS[1], '1', 'PX', want)
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class GuardConfig:
    failure_threshold: int = 5  # distinct tasks failing in a row (no success between) that open it
    open_s: float = 10.0
    retry_ratio: float = 0.2
    retry_floor: int = 10
    window_s: float = 10.0
    shared_refresh_s: float = 0.5
    max_wait_s: float = 300.0  # the longest one call waits for the endpoint; then EndpointUnavailable
    # a task whose call failed (5xx, timeout) less than this long ago is a suspect: it is never the
    # half-open probe (None: window_s + open_s)
    suspect_s: float | None = None


class EndpointUnavailable(Exception):
    """A caller waited ``max_wait_s`` for the endpoint (``why``: breaker, degraded, retry_after,
    retry_budget) and gives up: the pipeline dead-letters its task ``unavailable``."""

    def __init__(self, why: str, waited_s: float) -> None:
        super().__init__(f"waited {waited_s:.0f} s for the model endpoint ({why})")
        self.why = why
        self.waited_s = waited_s


Probe = Callable[[], Awaitable[None]]  # a cheap call of the guard's own; raises as a model call does

_ANONYMOUS = "\x00"  # the task of a caller that names none: every such failure counts as another task
_OWN_PROBE = "\x00probe"


@dataclass(frozen=True, slots=True)
class Decision:
    """What :meth:`EndpointGuard.decide` says to a caller: go now, or wait ``delay`` s (``why``)."""

    delay: float
    why: str | None = None  # breaker, degraded, retry_after, retry_budget, probe (a probe of the guard's own)


class EndpointGuard:
    """Whose fault a retryable failure is, decided by breadth (see DESIGN.md, "Whose fault is a
    failure"): the breaker opens only when ``failure_threshold`` *different* tasks fail in a row, so
    a task that keeps failing while the endpoint serves others cannot hold it open; it spends its
    own attempts and ends. A task whose call failed recently (a *suspect*) is never the half-open
    probe: a task that has not failed probes, and while only suspects wait the guard makes a cheap
    probe call of its own (``probe``). Every wait ends: after ``max_wait_s`` the caller gets
    :class:`EndpointUnavailable`."""

    def __init__(
        self,
        endpoint: str,
        metrics: Metrics,
        config: GuardConfig | None = None,
        redis: RedisClient | None = None,
        key_prefix: str = "agent",
        clock: Callable[[], float] = time.monotonic,
        probe: Probe | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.metrics = metrics
        self.config = config or GuardConfig()
        self.redis = redis
        self.clock = clock
        self.probe = probe
        self.shared_key = Keys(key_prefix).endpoint(endpoint_tag(endpoint), "blocked_until")
        self.label = endpoint_label(endpoint)
        self._streak: dict[object, None] = {}  # the distinct tasks failing since the last success, in order
        self._open_until = 0.0
        self._probing: str | None = None  # who holds the half-open probe: a task key, or _OWN_PROBE
        self._probe_started = 0.0
        self._own_probe: asyncio.Task[None] | None = None
        self._suspects: dict[str, float] = {}  # task -> when its last retryable failure was seen
        self._blocked_until = 0.0  # monotonic, from Retry-After (local or shared)
        self._shared_checked = -1e9
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._degraded: str | None = None  # the EndpointFault reason while the endpoint is unusable
        self._extend_block = redis.register_script(EXTEND_BLOCK) if redis is not None else None
        self._breaker_open = self.metrics.breaker_open.labels(endpoint=self.label)  # set at every success
        self._breaker_open.set(0)

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        return self.clock() < self._open_until

    @property
    def degraded(self) -> str | None:
        """The reason (``auth``, ``not_found``, ``unreachable``) while the endpoint is unusable."""
        return self._degraded

    @property
    def _failures(self) -> int:
        """Distinct tasks that failed in a row since the last success."""
        return len(self._streak)

    @property
    def _needs_probe(self) -> bool:
        return self._open_until > 0 and (self._degraded is not None
                                          or self._failures >= self.config.failure_threshold)

    def _probe_out(self, now: float) -> bool:
        return self._probing is not None and now - self._probe_started < self.config.open_s

    @property
    def available(self) -> bool:
        """False while a call would wait for the breaker: it is open, or a half-open probe is out.
        A kind whose policy is ``fallback`` or ``fail_fast`` goes elsewhere (or dead-letters) then;
        once the open period is over, its next call is the probe."""
        now = self.clock()
        if now < self._open_until:
            return False
        return not self._probe_out(now)

    @property
    def accepting(self) -> bool:
        """False while the endpoint is degraded: new work should not be taken."""
        return self._degraded is None

    def why_waiting(self) -> str | None:
        """What a call made now would wait for (None: nothing)."""
        now = self.clock()
        if self._degraded is not None and (now < self._open_until or self._probe_out(now)):
            return f"degraded:{self._degraded}"
        if now < self._open_until or self._probe_out(now):
            return "breaker"
        if now < self._blocked_until:
            return "retry_after"
        return None

    def suspect(self, task: str | None) -> bool:
        """The task's call failed recently (a 5xx or a timeout): it may not be the probe."""
        if task is None:
            return False
        seen = self._suspects.get(task)
        return seen is not None and self.clock() - seen < self._suspect_s

    @property
    def _suspect_s(self) -> float:
        cfg = self.config
        return cfg.suspect_s if cfg.suspect_s is not None else cfg.window_s + cfg.open_s

    def _trim(self, now: float) -> None:
        edge = now - self.config.window_s
        for q in (self._calls, self._retries):
            while q and q[0] < edge:
                q.popleft()
        if len(self._suspects) > 1024:  # forget the old suspects (insertion order is failure order)
            edge = now - self._suspect_s
            for task in [t for t, seen in self._suspects.items() if seen < edge]:
                del self._suspects[task]

    def retry_allowed(self) -> bool:
        now = self.clock()
        self._trim(now)
        budget = self.config.retry_floor + self.config.retry_ratio * len(self._calls)
        return len(self._retries) < budget

    # ------------------------------------------------------------------ before a call

    def decide(self, *, retry: bool, task: str | None = None) -> Decision:
        """May a call go now? Takes the half-open probe for ``task`` when it may be the probe
        (starting the guard's own probe instead when ``task`` is a suspect), and counts the call
        when it goes. Never blocks; :meth:`acquire` waits on it."""
        now = self.clock()
        delay = max(self._blocked_until - now, 0.0)
        why = "retry_after" if delay > 0 else None
        degraded = f"degraded:{self._degraded}" if self._degraded is not None else None
        if self.is_open:
            delay, why = max(delay, self._open_until - now), degraded or "breaker"
        elif self._probe_out(now):
            delay, why = max(delay, 0.05), degraded or ("probe" if self._probing == _OWN_PROBE else "breaker")
        elif self._needs_probe:
            if self.suspect(task):
                # a task that just failed would only fail again: the guard probes with a call of its own
                if self.probe is not None:
                    self._start_own_probe(now)
                    delay, why = max(delay, 0.05), degraded or "probe"
                else:  # no probe of its own: a task that has not failed probes, or this one once it is no suspect
                    seen = self._suspects.get(task or "", now)
                    delay, why = max(delay, 0.05, seen + self._suspect_s - now), degraded or "breaker"
            else:
                self._take_probe(task or _ANONYMOUS, now)
        if delay <= 0 and retry and not self.retry_allowed():
            self.metrics.retry_budget_refusals.inc()
            delay, why = min(1.0, self.config.window_s / 10), "retry_budget"
        if delay <= 0:
            self._trim(now)  # both windows stay bounded, retried or not
            (self._retries if retry else self._calls).append(now)
            return Decision(0.0)
        return Decision(delay, why)

    def _take_probe(self, holder: str, now: float) -> None:
        self._probing = holder  # half-open: this caller is the probe (a lost probe is replaced)
        self._probe_started = now
        log.info("endpoint %s half-open: probing", self.label)

    def acquire_now(self, *, retry: bool, task: str | None = None) -> bool:
        """:meth:`acquire` for a call that would not wait: a first call (a retry asks the retry
        budget), no shared Retry-After due to be read from Redis, none in force, the breaker closed,
        no probe wanted or out. True once the call is counted (as :meth:`decide` counts it); False
        changes nothing, and the caller waits in :meth:`acquire`."""
        now = self.clock()
        if retry or now < self._blocked_until or self.is_open or self._probe_out(now) or self._needs_probe:
            return False
        if self.redis is not None and now - self._shared_checked >= self.config.shared_refresh_s:
            return False
        return self.decide(retry=False, task=task).delay <= 0

    async def acquire(self, *, retry: bool, task: str | None = None) -> None:
        """Wait until a call may be made: no shared Retry-After, breaker not open, budget left.
        Raises :class:`EndpointUnavailable` after ``max_wait_s`` of waiting."""
        waited_from = self.clock()
        while True:
            await self._refresh_shared(self.clock())
            decision = self.decide(retry=retry, task=task)
            if decision.delay <= 0:
                return
            waited = self.clock() - waited_from
            if waited >= self.config.max_wait_s:
                raise EndpointUnavailable(decision.why or "breaker", waited)
            await asyncio.sleep(min(decision.delay, 1.0, max(self.config.max_wait_s - waited, 0.01)))

    def _start_own_probe(self, now: float) -> None:
        if self._own_probe is not None and not self._own_probe.done():
            return
        self._take_probe(_OWN_PROBE, now)
        self.metrics.breaker_probes.labels(endpoint=self.label).inc()
        self._own_probe = asyncio.get_running_loop().create_task(self._run_own_probe(), name=f"probe {self.label}")

    async def _run_own_probe(self) -> None:
        assert self.probe is not None
        try:
            await self.probe()
        except EndpointFault as exc:
            self.endpoint_fault(exc.reason, str(exc))
        except RetryableError:
            self.failure(_OWN_PROBE)
        except asyncio.CancelledError:
            self._probing = None
            raise
        except Exception as exc:  # noqa: BLE001 - a 400 or an odd answer: the endpoint answered
            log.debug("endpoint %s probe answered: %s", self.label, exc)
            self.success()
        else:
            self.success()

    async def aclose(self) -> None:
        """Stop the guard's own probe, if one is out."""
        probe, self._own_probe = self._own_probe, None
        if probe is not None and not probe.done():
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)

    async def _refresh_shared(self, now: float) -> None:
        if self.redis is None or now - self._shared_checked < self.config.shared_refresh_s:
            return
        self._shared_checked = now
        try:
            ttl_ms = await self.redis.pttl(self.shared_key)
        except RedisError as exc:
            log.debug("shared Retry-After not readable: %s", exc)
            return
        if ttl_ms and ttl_ms > 0:
            self._blocked_until = max(self._blocked_until, now + ttl_ms / 1000)

    # ------------------------------------------------------------------ after a call

    def success(self, task: str | None = None) -> None:
        if task is not None:
            self._suspects.pop(task, None)
        if self._degraded is not None:
            self.metrics.endpoint_degraded.labels(endpoint=self.label, reason=self._degraded).set(0)
            self._degraded = None
            log.info("endpoint %s answers again; resuming", self.label)
        elif self._streak or self._probing:
            log.info("endpoint %s closed after a successful call", self.label)
        self._streak.clear()
        self._probing = None
        self._open_until = 0.0
        self._breaker_open.set(0)

    def failure(self, task: str | None = None) -> bool:
        """A retryable failure (timeout, 5xx, connection) of ``task``'s call. True when it opened
        the breaker: the probe failed, or ``failure_threshold`` different tasks failed in a row."""
        now = self.clock()
        if task is not None and task != _OWN_PROBE:
            self._suspects.pop(task, None)
            self._suspects[task] = now
        probe = self._probing is not None and (task == self._probing or task is None)
        key: object = task if task is not None else object()
        repeat = key in self._streak  # the same task again: no wider than before
        self._streak[key] = None
        if probe or (not repeat and not self.is_open and not self._probe_out(now)
                     and self._failures >= self.config.failure_threshold):
            self._open()
            log.warning("endpoint %s open for %.1fs after %d tasks failed in a row%s", self.label,
                        self.config.open_s, self._failures, " (the probe failed)" if probe else "")
            return True
        return False

    def endpoint_fault(self, reason: str, message: str) -> None:
        """The endpoint cannot serve anyone (``reason``: auth, not_found, unreachable).

        Opens the breaker at once and marks the endpoint degraded until a call succeeds; while
        degraded, one probe per ``open_s`` is let through. Logs a WARNING once per transition.
        """
        previous = self._degraded
        self._open()
        if previous == reason:
            return
        if previous is not None:
            self.metrics.endpoint_degraded.labels(endpoint=self.label, reason=previous).set(0)
        self._degraded = reason
        self.metrics.endpoint_degraded.labels(endpoint=self.label, reason=reason).set(1)
        log.warning(
            "endpoint %s unusable (%s): %s; consumption paused, probing every %.0f s",
            self.label, reason, message, self.config.open_s,
        )

    def _open(self) -> None:
        self._open_until = self.clock() + self.config.open_s
        self._probing = None
        self.metrics.breaker_opens.inc()
        self._breaker_open.set(1)

    async def retry_after(self, delay_s: float) -> None:
        """The endpoint asked every caller to wait ``delay_s``: remember it here and in Redis."""
        delay_s = min(max(delay_s, 0.0), self.config.max_wait_s)
        now = self.clock()
        self._blocked_until = max(self._blocked_until, now + delay_s)
        if self._extend_block is None or delay_s <= 0:
            return
        try:
            # keep the later of the two deadlines, atomically: never shorten another replica's wait
            await self._extend_block(keys=[self.shared_key], args=[max(1, int(delay_s * 1000))])
        except RedisError as exc:
            log.debug("shared Retry-After not written: %s", exc)


def chat_probe(client: Any, timeout_s: float, model: str | None = None) -> Probe:
    """The guard's own half-open probe: the smallest chat completion (one token, no schema) to the
    endpoint ``client`` calls. Any answer closes the breaker; a 5xx, a timeout or an endpoint fault
    keeps it open."""

    async def probe() -> None:
        await client.chat(ChatRequest(
            messages=[{"role": "user", "content": "ping"}], schema=None, schema_name="probe",
            idempotency_key=f"probe:{uuid.uuid4().hex}", timeout_s=min(timeout_s, 10.0), max_tokens=1,
            model=model,
        ))

    return probe
