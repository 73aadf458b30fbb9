"""Whether the dependencies answer, waiting for them at start, and watching a running consumer.

- :class:`Dependencies` asks Redis (a ping), the broker (metadata) and the model endpoints (a TCP
  connection) whether they answer, each ask bounded by a short timeout.
- :class:`Startup` waits for all of them before the service is built: ``/readyz`` answers 503 with a
  check per dependency meanwhile, one line is logged when a dependency is missing and one when it
  answers again, and the asks back off exponentially, with jitter, up to ``retry_max_s``. With
  ``AGENT_KAFKA__CREATE_TOPICS=false`` a missing topic is waited for (and named), never created.
- :class:`Liveness` watches a running service once a second: the ``agent_stalled_seconds`` gauge
  (:class:`consumers.progress.Progress` measures it), what recently made records wait (the window,
  Retry-After, a rate limit, a budget: read from the counters those waits move), and, while an
  outage of Redis or the broker pauses consumption, a probe of both every ``probe_interval_s`` that
  ends the outage when they answer. Without the probe only a record that goes through would end
  it, and the records that met the outage may have lost their partitions in a rebalance while every
  new partition is paused on assignment: the consumer would wait for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from time import monotonic
from typing import Any
from urllib.parse import urlsplit

from confluent_kafka.admin import AdminClient
from prometheus_client import Counter

from consumers.runner import Runner
from dedup.client import RedisClient
from service.core.metrics import Metrics
from service.core.schema_registry import RegistryUser
from service.core.settings import LivenessSettings, Settings
from service.pipeline.processor import TaskProcessor
from service.pipeline.waits import WHY

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
TICK_S = 1.0

Probe = Callable[[], Awaitable[bool]]


class Dependencies:
    """Asks each dependency whether it answers; see the module docstring."""

    def __init__(self, settings: Settings, redis: RedisClient, model_urls: Iterable[str] = ()) -> None:
        self.settings = settings
        self.redis = redis
        self.model_urls = [u for u in model_urls if u]
        self._admin: AdminClient | None = None
        self.last_error: dict[str, str] = {}  # for the log only: never served

    async def redis_answers(self) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "not answering"
            self.last_error["redis"] = f"{type(exc).__name__}: {exc}"[:300]
            return False
        return True

    def _metadata(self) -> Any:
        if self._admin is None:
            self._admin = AdminClient(self.settings.kafka.common_config("admin"))
        return self._admin.list_topics(timeout=PROBE_TIMEOUT_S)

    async def broker_answers(self) -> bool:
        try:
            await asyncio.to_thread(self._metadata)
        except Exception as exc:  # noqa: BLE001 - any failure means "not answering"
            self.last_error["kafka"] = f"{type(exc).__name__}: {exc}"[:300]
            return False
        return True

    async def model_answers(self) -> bool:
        """Some model endpoint accepts a TCP connection (none configured: nothing to wait for)."""
        if not self.model_urls:
            return True
        for url in self.model_urls:
            parts = urlsplit(url)
            host = parts.hostname or "127.0.0.1"
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    _reader, writer = await asyncio.open_connection(host, port)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                return True
            except Exception as exc:  # noqa: BLE001 - any failure means "not answering"
                self.last_error["model"] = f"{host}:{port}: {type(exc).__name__}: {exc}"[:300]
        return False

    def outage_probes(self, *registry_users: object) -> dict[str, Probe]:
        """What must answer before an outage is over: Redis, the broker, and the Schema Registry
        when the input topic's values are read or the results written through one."""
        probes: dict[str, Probe] = {"redis": self.redis_answers, "kafka": self.broker_answers}
        users = [user for user in registry_users if isinstance(user, RegistryUser)]
        if users:  # one registry for both
            probes["schema_registry"] = users[0].answers
        return probes

    def close(self) -> None:
        self._admin = None


class Startup:
    """Waits until Redis, the broker (and the topics) and a model endpoint answer; see the module docstring.

    ``ensure_topics(create)`` creates what is missing (when ``create``) and returns the topics still
    missing; it runs in a thread once the broker answers."""

    def __init__(self, settings: Settings, dependencies: Dependencies,
                 ensure_topics: Callable[[bool], list[str]]) -> None:
        self.settings = settings
        self.dependencies = dependencies
        self.ensure_topics = ensure_topics
        self.checks: dict[str, bool] = {"started": False, "redis": False, "kafka": False, "topics": False,
                                        "model": False}
        self._missing_since: dict[str, float] = {}

    def _note(self, name: str, ok: bool, what: str) -> None:
        """One line when ``name`` goes missing, one when it answers again."""
        now = monotonic()
        since = self._missing_since.get(name)
        if not ok and since is None:
            self._missing_since[name] = now
            log.warning("waiting for %s: %s; retrying with backoff", name, what)
        elif ok and since is not None:
            del self._missing_since[name]
            log.info("%s reachable again after %.0f s", name, now - since)
        self.checks[name] = ok

    async def check(self) -> bool:
        """Ask every dependency once; True when all answer."""
        deps = self.dependencies
        redis_ok, kafka_ok, model_ok = await asyncio.gather(
            deps.redis_answers(), deps.broker_answers(), deps.model_answers())
        self._note("redis", redis_ok, f"cannot reach Redis ({deps.last_error.get('redis', '')})")
        self._note("kafka", kafka_ok, f"cannot reach Kafka at {self.settings.kafka.bootstrap_servers} "
                                      f"({deps.last_error.get('kafka', '')})")
        self._note("model", model_ok, f"no model endpoint answers ({deps.last_error.get('model', '')})")
        topics_ok = False
        if kafka_ok:
            create = self.settings.kafka.create_topics
            try:
                missing = await asyncio.to_thread(self.ensure_topics, create)
            except Exception as exc:
                from confluent_kafka import KafkaException

                if not isinstance(exc, KafkaException):
                    raise
                missing = [f"unknown ({exc})"]
            topics_ok = not missing
            self._note("topics", topics_ok, f"topics missing: {', '.join(missing)}" + (
                "" if create else " (AGENT_KAFKA__CREATE_TOPICS=false: create them)"))
        return redis_ok and kafka_ok and model_ok and topics_ok

    async def wait(self) -> None:
        """Return once every dependency answers; back off (with jitter) between asks."""
        delay = 0.2
        cap = self.settings.liveness.retry_max_s
        while not await self.check():
            await asyncio.sleep(min(delay, cap) * random.uniform(0.5, 1.0))
            delay = min(delay * 2, cap)

    def started(self) -> None:
        self.checks["started"] = True


def wait_counters(metrics: Metrics) -> tuple[tuple[Counter, dict[str, str] | None, str], ...]:
    """The counters a wait moves (with the labels that mark a wait), and the mechanism each names."""
    return (
        (metrics.llm_requests, {"outcome": "rate_limited"}, "retry-after"),
        (metrics.llm_window_waits, None, "window"),
        (metrics.rate_limited, None, "rate limit"),
        (metrics.budget_refusals, {"policy": "wait"}, "budget"),
    )


def _total(counter: Counter, labels: dict[str, str] | None) -> float:
    total = 0.0
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and (
                    labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                total += sample.value
    return total


class Liveness:
    """Watches a running service once a second; see the module docstring."""

    def __init__(self, runner: Runner, processor: TaskProcessor, metrics: Metrics, probes: dict[str, Probe],
                 settings: LivenessSettings, clock: Callable[[], float] = monotonic) -> None:
        self.runner = runner
        self.processor = processor
        self.metrics = metrics
        self.probes = probes
        self.settings = settings
        self.clock = clock
        self._last_probe = -1e9
        self._waits: deque[tuple[float, dict[str, float]]] = deque()
        self._wait_counters = wait_counters(metrics)
        progress = runner.progress
        # the processor names a mechanism first, then a recent wait, then the runner (paused, retrying)
        progress.causes.insert(0, processor.holding)
        progress.causes.insert(1, processor.waits.holding)  # what the records waiting now wait for
        progress.causes.insert(2, self.recent_wait)

    def _counters(self) -> dict[str, float]:
        return {why: _total(counter, labels) for counter, labels, why in self._wait_counters}

    def recent_wait(self) -> str | None:
        """The wait whose counter moved within the last ``stall_s``, if any."""
        if len(self._waits) < 2:
            return None
        _t, oldest = self._waits[0]
        _t, newest = self._waits[-1]
        moved = [why for why in newest if newest[why] > oldest.get(why, 0.0)]
        return ", ".join(moved) or None

    async def tick(self) -> None:
        now = self.clock()
        progress = self.runner.progress
        progress.observe(self.runner.pending)
        self.metrics.stalled_seconds.set(progress.stalled_s())
        waiting = self.processor.waits.counts()
        for why in WHY:
            self.metrics.waiting_records.labels(why=why).set(waiting.get(why, 0))
        _ = progress.stalled  # logs once when a stall begins and once when it ends, asked or not
        self._waits.append((now, self._counters()))
        # the baseline is the last reading from before the window of stall_s
        while len(self._waits) > 2 and now - self._waits[1][0] >= self.settings.stall_s:
            self._waits.popleft()
        if self.processor.outage is not None and now - self._last_probe >= self.settings.probe_interval_s:
            self._last_probe = now
            answers = await asyncio.gather(*(probe() for probe in self.probes.values()))
            if all(answers):
                self.processor.outage_over()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - watching must never stop the service
                log.exception("liveness tick failed")
            await asyncio.sleep(TICK_S)
