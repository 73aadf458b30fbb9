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
- **Rate limits** (:class:`RateLimiter`): requests and tokens per minute across replicas, with a
  share reserved for interactive work, shared between tenants by weight when contended.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from dedup import scripts
from dedup.client import RedisClient
from dedup.keys import Keys
from dedup.ledger import LedgerUnavailable
from service.core.metrics import Metrics

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
    failure_threshold: int = 5
    open_s: float = 10.0
    retry_ratio: float = 0.2
    retry_floor: int = 10
    window_s: float = 10.0
    shared_refresh_s: float = 0.5
    max_wait_s: float = 300.0


class EndpointGuard:
    def __init__(
        self,
        endpoint: str,
        metrics: Metrics,
        config: GuardConfig | None = None,
        redis: RedisClient | None = None,
        key_prefix: str = "agent",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.metrics = metrics
        self.config = config or GuardConfig()
        self.redis = redis
        self.clock = clock
        self.shared_key = Keys(key_prefix).endpoint(endpoint_tag(endpoint), "blocked_until")
        self.label = _label(endpoint)
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._probe_started = 0.0
        self._blocked_until = 0.0  # monotonic, from Retry-After (local or shared)
        self._shared_checked = -1e9
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._degraded: str | None = None  # the EndpointFault reason while the endpoint is unusable
        self._extend_block = redis.register_script(EXTEND_BLOCK) if redis is not None else None
        self.metrics.breaker_open.labels(endpoint=self.label).set(0)

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        return self.clock() < self._open_until

    @property
    def degraded(self) -> str | None:
        """The reason (``auth``, ``not_found``, ``unreachable``) while the endpoint is unusable."""
        return self._degraded

    @property
    def available(self) -> bool:
        """False while a call would wait for the breaker: it is open, or a half-open probe is out.
        A kind whose policy is ``fallback`` or ``fail_fast`` goes elsewhere (or dead-letters) then;
        once the open period is over, its next call is the probe."""
        now = self.clock()
        if now < self._open_until:
            return False
        return not (self._probing and now - self._probe_started < self.config.open_s)

    @property
    def accepting(self) -> bool:
        """False while the endpoint is degraded: new work should not be taken."""
        return self._degraded is None

    def _trim(self, now: float) -> None:
        edge = now - self.config.window_s
        for q in (self._calls, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def retry_allowed(self) -> bool:
        now = self.clock()
        self._trim(now)
        budget = self.config.retry_floor + self.config.retry_ratio * len(self._calls)
        return len(self._retries) < budget

    # ------------------------------------------------------------------ before a call

    async def acquire(self, *, retry: bool) -> None:
        """Wait until a call may be made: no shared Retry-After, breaker not open, budget left."""
        waited_from = self.clock()
        while True:
            now = self.clock()
            await self._refresh_shared(now)
            delay = max(self._blocked_until - now, 0.0)
            if self.is_open:
                delay = max(delay, self._open_until - now)
            elif self._probing and now - self._probe_started < self.config.open_s:
                delay = max(delay, 0.05)  # one probe at a time while half-open
            elif now >= self._open_until > 0 and (
                self._degraded is not None or self._failures >= self.config.failure_threshold
            ):
                self._probing = True  # half-open: this caller is the probe (a lost probe is replaced)
                self._probe_started = now
                log.info("endpoint %s half-open: probing", self.label)
            if delay <= 0 and retry and not self.retry_allowed():
                self.metrics.retry_budget_refusals.inc()
                delay = min(1.0, self.config.window_s / 10)
            if delay <= 0:
                self._trim(now)  # both windows stay bounded, retried or not
                if retry:
                    self._retries.append(now)
                else:
                    self._calls.append(now)
                return
            if now - waited_from > self.config.max_wait_s and self._degraded is None:
                # do not wait forever; the call's own failure handling takes over (not while
                # degraded: then only the probe may call, whatever the wait)
                return
            await asyncio.sleep(min(delay, 1.0))

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

    def success(self) -> None:
        if self._degraded is not None:
            self.metrics.endpoint_degraded.labels(endpoint=self.label, reason=self._degraded).set(0)
            self._degraded = None
            log.info("endpoint %s answers again; resuming", self.label)
        elif self._failures or self._probing:
            log.info("endpoint %s closed after a successful call", self.label)
        self._failures = 0
        self._probing = False
        self._open_until = 0.0
        self.metrics.breaker_open.labels(endpoint=self.label).set(0)

    def failure(self) -> bool:
        """A retryable failure (timeout, 5xx, connection, 429). True when it opened the breaker."""
        self._failures += 1
        if self._probing or self._failures == self.config.failure_threshold:
            self._open()
            log.warning("endpoint %s open for %.1fs after %d failures", self.label, self.config.open_s, self._failures)
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
        self._probing = False
        self.metrics.breaker_opens.inc()
        self.metrics.breaker_open.labels(endpoint=self.label).set(1)

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


def endpoint_tag(endpoint: str) -> str:
    return hashlib.sha256(endpoint.encode()).hexdigest()[:16]


class RateLimiter:
    """Requests and tokens per minute for one endpoint, shared by every replica through Redis.

    Each call is counted before it is made with an estimate of its tokens, and the count is
    corrected with the usage the endpoint reports. ``batch`` work may use only the share not
    reserved for ``interactive`` work. The budgets are token buckets that refill continuously
    (:data:`dedup.scripts.RATE`): a caller over the limit waits until its share has refilled, so
    tasks stay in flight, the in-flight window fills and the consumer pauses its partitions.

    When the quota is contended, tenants share it by weight (:data:`dedup.scripts.FAIR`): a caller
    whose tenant has used more of it, for its weight, than a tenant that waits, yields to that
    tenant. A lone tenant may use the whole quota.
    """

    def __init__(
        self,
        redis: RedisClient,
        endpoint: str,
        metrics: Metrics,
        *,
        rpm: int = 0,
        tpm: int = 0,
        interactive_reserve: float = 0.2,
        key_prefix: str = "agent",
        half_life_s: float = 30.0,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.rpm = rpm
        self.tpm = tpm
        self.reserve = interactive_reserve
        self.half_life_ms = max(1, int(half_life_s * 1000))
        keys, tag = Keys(key_prefix), endpoint_tag(endpoint)
        self.key = keys.endpoint(tag, "rate")
        # the fairness state, beside the buckets (one hash tag: one slot on a cluster)
        self.keys = [self.key, *(keys.endpoint(tag, s) for s in ("fair", "wait:i", "wait:b", "wait:exp", "seen"))]
        self._acquire = redis.register_script(scripts.RATE)
        self._reconcile = redis.register_script(scripts.RATE_RECONCILE)

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    async def try_acquire(self, priority: str, tokens: int, tenant: str = "default", weight: float = 1.0) -> float:
        """0 when the call may go now (it is counted), else seconds until it may be tried again."""
        wait_s, _ = await self._try(priority, tokens, tenant, weight)
        return wait_s

    async def _try(self, priority: str, tokens: int, tenant: str, weight: float) -> tuple[float, bool]:
        """Seconds to wait (0: counted, go), and whether the caller yielded to a tenant further behind."""
        wait_ms, yielded = await self._acquire(
            keys=self.keys,
            args=[self.rpm, self.tpm, tokens, self.reserve, priority, tenant, repr(float(weight)), self.half_life_ms],
        )
        return int(wait_ms) / 1000, bool(int(yielded))

    async def acquire(self, priority: str, tokens: int, tenant: str = "default", weight: float = 1.0,
                      label: str = "default") -> None:
        """Wait until the call may go. ``tenant`` shares the quota at ``weight``; ``label`` is its
        bounded metric label."""
        if not self.enabled:
            return
        while True:
            try:
                wait_s, yielded = await self._try(priority, tokens, tenant, weight)
            except RedisError as exc:
                raise LedgerUnavailable(f"rate limiter: {exc}") from exc
            if wait_s <= 0:
                return
            self.metrics.rate_limited.labels(priority=priority).inc()
            if yielded:
                self.metrics.fair_yields.labels(tenant=label).inc()
            await asyncio.sleep(min(wait_s, 1.0))

    async def reconcile(self, estimated: int, actual: int, tenant: str = "default", weight: float = 1.0) -> None:
        if not self.enabled or actual == estimated:
            return
        try:
            await self._reconcile(keys=self.keys, args=[self.rpm, self.tpm, actual - estimated, 0, "",
                                                        tenant, repr(float(weight)), self.half_life_ms])
        except RedisError as exc:
            log.debug("token count not corrected: %s", exc)


def _label(endpoint: str) -> str:
    """host:port of the endpoint, a bounded label (never a path with secrets)."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    return parts.netloc.rsplit("@", 1)[-1] or "default"
