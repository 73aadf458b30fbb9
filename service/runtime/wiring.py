"""The composition root: builds every part from one :class:`Settings` and hands them in.

Nothing here runs at import. ``Service.run()`` serves the consumer and the HTTP app in one event
loop; ``serve()`` is what ``agent-service run`` calls on configured servers
(:mod:`service.devtools.embedded` starts embedded ones for what the settings leave unconfigured).

The parts it builds from come from small modules beside it, whose names it exports as well:
:mod:`~service.runtime.topics` (the topics and their retention), :mod:`~service.runtime.front` (the
HTTP port from the start, the wait for the dependencies), :mod:`~service.runtime.connections` (the
Redis client) and :mod:`~service.runtime.endpoints` (fallback endpoints, windows, tenants).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from consumers.partitions import RunnerConfig, RunnerMetrics
from consumers.producers import Outputs, Publisher
from consumers.progress import Progress
from consumers.runner import Runner
from consumers.transactions import TransactionalProducer
from dedup.client import RedisClient, close
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.agents.declared import DeclaredAgent
from service.agents.loading import AgentsNotLoaded, agents_from_settings, describe, summary
from service.agents.registry import AgentRegistry
from service.api.app import create_app
from service.core import heap
from service.core.loops import loop_kind, run_loop
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.core.tracing import Tracing
from service.llm.client import LLMClient
from service.llm.endpoints import PRIMARY, public_url
from service.llm.guard import EndpointGuard, GuardConfig, RateLimiter, chat_probe
from service.llm.tenancy import TenantBudgets
from service.llm.tokens import prompt_counter
from service.pipeline.base import ChatClient, ProcessorConfig
from service.pipeline.processor import TaskProcessor
from service.runtime.connections import redis_client
from service.runtime.endpoints import adaptive_window, fallback_endpoints, replica_endpoints, tenants
from service.runtime.front import Front, http_server, model_urls, wait_for_dependencies
from service.runtime.limits import Limits, limits, log_limits
from service.runtime.liveness import Dependencies, Liveness, Startup
from service.runtime.outputs import outputs_of
from service.runtime.parked import ApprovalsConsumer, approval_applier, sweep_forever
from service.runtime.replies import start_replies
from service.runtime.scheduler import Scheduler, scheduler_for
from service.runtime.topics import FOREVER_S, ensure_topics, topic_retention_s

__all__ = [
    "FOREVER_S",
    "MIN_LEDGER_TTL_S",
    "Front",
    "Service",
    "StartupRefused",
    "adaptive_window",
    "build",
    "ensure_topics",
    "fallback_endpoints",
    "http_server",
    "install_signal_handlers",
    "load_registry",
    "model_urls",
    "redis_client",
    "serve",
    "tenants",
    "topic_retention_s",
    "wait_for_dependencies",
    "worker_id",
]

log = logging.getLogger(__name__)


class _RunnerMetrics(RunnerMetrics):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._finish_due = False  # the last finish time is set once per loop turn, not per record

    def first_record(self) -> None:
        self.m.first_record_time.set_to_current_time()

    def consumed(self, n: int) -> None:
        self.m.messages_consumed.inc(n)

    def finished(self, n: int) -> None:
        if self._finish_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.m.last_finish_time.set_to_current_time()
            return
        self._finish_due = True
        loop.call_soon(self._set_finish_time)

    def _set_finish_time(self) -> None:
        self._finish_due = False
        self.m.last_finish_time.set_to_current_time()

    def inflight(self, n: int) -> None:
        self.m.inflight.set(n)

    def paused(self, n: int) -> None:
        self.m.paused_partitions.set(n)

    def assigned(self, n: int) -> None:
        self.m.assigned_partitions.set(n)

    def committed(self) -> None:
        self.m.committed_offsets.inc()

    def lag(self, topic: str, partition: int, lag: int | None) -> None:
        labels = {"topic": topic, "partition": str(partition)}
        if lag is None:
            with contextlib.suppress(KeyError):
                self.m.consumer_lag.remove(*labels.values())
        else:
            self.m.consumer_lag.labels(**labels).set(lag)


MIN_LEDGER_TTL_S = 7 * 24 * 3600


class StartupRefused(RuntimeError):
    """The service must not start with this configuration; the message says why and what to change."""


def worker_id(settings: Settings) -> str:
    return settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    redis: RedisClient
    ledger: Ledger
    llm: ChatClient
    publisher: Publisher
    outputs: Outputs
    agents: AgentRegistry
    processor: TaskProcessor
    runner: Runner
    llm_base_url: str
    _closers: list[Any] = field(default_factory=list)
    liveness: Liveness | None = None

    async def preflight(self) -> None:
        """Refuse to start on a ledger that cannot keep its promise; settle the ledger's retention.

        Raises :class:`StartupRefused` when Redis may evict ledger keys, or when the configured
        ledger retention is shorter than the input topic's (a replay would then run the model
        again for a task whose record is gone).
        """
        problem = await self.ledger.check_durability()
        if problem:
            raise StartupRefused(problem)
        await self.pin_declared_kinds()
        retention_s = await asyncio.to_thread(topic_retention_s, self.settings)
        configured = self.settings.ledger.result_ttl_s
        if configured is None:
            self.ledger.ttl_s = max(MIN_LEDGER_TTL_S, retention_s if retention_s is not None else 0)
        elif retention_s is not None and configured < retention_s:
            raise StartupRefused(
                f"AGENT_LEDGER__RESULT_TTL_S={configured} is shorter than the retention of "
                f"{self.settings.kafka.input_topic} ({retention_s} s): a replayed record would find no ledger "
                "entry and run the model again. Raise it, or leave it unset to follow the topic.")
        log.info("ledger retention %d s (input topic retention %s)", self.ledger.ttl_s,
                 "unknown" if retention_s is None else f"{retention_s} s")

    async def pin_declared_kinds(self) -> None:
        """A declared kind's version names one definition for ever: record its digest per (kind,
        version) the first time, and refuse to start when that version now means something else."""
        versions = [version for agent in self.agents for version in (agent, agent.candidate) if version is not None]
        for agent in versions:
            if not isinstance(agent, DeclaredAgent):
                continue  # Python agents version their steps themselves
            recorded = await self.ledger.pin_definition(agent.kind, agent.version, agent.definition_digest)
            if recorded is not None:
                raise StartupRefused(
                    f"kind {agent.kind} version {agent.version} was changed without a new version "
                    f"({self.agents.source(agent.kind)}: {agent.definition_digest}, recorded {recorded}): "
                    "give the changed kind a new version")

    async def preflight_when_reachable(self, startup: Startup | None) -> None:
        """The preflight; with ``startup``, a dependency that stopped answering since the wait is
        waited for again (a refusal still ends the start)."""
        from confluent_kafka import KafkaException
        from redis.exceptions import RedisError

        from dedup.ledger import LedgerUnavailable

        while True:
            try:
                await self.preflight()
                return
            except (LedgerUnavailable, RedisError, KafkaException, ConnectionError) as exc:
                if startup is None:
                    raise
                log.warning("a dependency stopped answering before the start (%s): waiting again", exc)
                await startup.wait()

    async def run(self, *, http: bool | None = None, front: Front | None = None,
                  startup: Startup | None = None) -> None:
        """Preflight, then consume and serve until stopped. ``front``: the HTTP port already served
        (it switches to this service's app once the preflight passed); ``startup``: what waited for
        the dependencies, asked again if one stops answering before the preflight is done."""
        await self.preflight_when_reachable(startup)
        scheduler = load_scheduler(self)  # a schedule that cannot run here refuses the start
        serve_http = (self.settings.http.enabled if http is None else http) and front is None
        server = None
        tasks = [asyncio.create_task(self.runner.run(), name="consumer")]
        watcher = asyncio.create_task(self.liveness.run(), name="liveness") if self.liveness is not None else None
        if front is not None:
            front.app = create_app(self)
            if startup is not None:
                startup.started()
            if front.task is not None:
                tasks.append(front.task)
        send = self.publisher.send
        sweeper = asyncio.create_task(sweep_forever(self.ledger, send, self.metrics, self.settings), name="sweeper")
        scheduling = [asyncio.create_task(scheduler.run(), name="scheduler")] if scheduler is not None else []
        approvals = ApprovalsConsumer(self.settings, approval_applier(self.ledger, send, self.metrics, self.settings),
                                      asyncio.get_running_loop(), metrics=self.metrics)
        approvals.start()
        replies = start_replies(self.ledger, send, self.metrics, self.settings)
        if serve_http:
            import uvicorn

            app = create_app(self)
            config = uvicorn.Config(
                app, host=self.settings.http.host, port=self.settings.http.port,
                log_level="warning", access_log=False, lifespan="off",
            )
            server = http_server(config)
            tasks.append(asyncio.create_task(server.serve(), name="http"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            self.runner.stop()
            sweeper.cancel()
            for background in scheduling:
                background.cancel()
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(approvals.stop)
            await asyncio.to_thread(replies.stop)
            if server is not None:
                server.should_exit = True
            if front is not None and front.server is not None:
                front.server.should_exit = True
            await asyncio.gather(*tasks, sweeper, *scheduling, *([watcher] if watcher else []), return_exceptions=True)
            await self.aclose()

    async def aclose(self) -> None:
        self.publisher.close()
        for closer in self._closers:
            await closer()
        for agent in self.agents:
            for version in (agent, agent.candidate):
                for step in version.steps if version is not None else ():
                    for tool in step.tools:
                        await tool.aclose()
        await close(self.redis)


def load_registry(settings: Settings) -> AgentRegistry:
    """The kinds this service runs, each logged with its steps and source; :class:`StartupRefused`
    when one cannot be loaded."""
    try:
        agents = agents_from_settings(settings)
    except AgentsNotLoaded as exc:
        raise StartupRefused(f"agents not loaded: {exc}") from exc
    for item in describe(agents):
        log.info("loaded %s", summary(item))
    return agents


def load_scheduler(service: Service) -> Scheduler | None:
    """:func:`scheduler_for` the service; :class:`StartupRefused` when a schedule cannot run here."""
    try:
        return scheduler_for(service.settings, service.agents, service.ledger, service.publisher.send, service.metrics)
    except AgentsNotLoaded as exc:
        raise StartupRefused(f"schedules not loaded: {exc}") from exc


def _session_config(s: Settings) -> dict[str, Any]:  # AGENT_SESSIONS__* as the processor's session_*, and batch
    return {f"session_{name}": value for name, value in s.sessions.model_dump().items()} | {"batch": s.batch}


def build(settings: Settings, *, llm_base_url: str, llm: ChatClient | None = None,
          agents: AgentRegistry | None = None, metrics: Metrics | None = None,
          tracing: Tracing | None = None) -> Service:
    """Every part, from one settings object. Tracing follows the standard ``OTEL_*`` variables.

    Without ``agents``, the registry is the built-in kinds, the entry points, ``AGENT_AGENTS`` and
    ``AGENT_KINDS_FILE`` (:mod:`service.agents.loading`); one that cannot load refuses the start.
    """
    agents = agents if agents is not None else load_registry(settings)
    metrics = metrics or Metrics()
    tracing = tracing or Tracing.from_env()
    tracing.name_group(settings.kafka.group_id)
    log_limits(bounds := limits(settings, agents))
    client = redis_client(settings, bounds.redis_connections)
    ledger = ledger_of(settings, client)
    closers: list[Any] = [lambda: asyncio.to_thread(tracing.shutdown)]
    if llm is None:
        real = LLMClient(settings.llm, llm_base_url, metrics, max_open=bounds.model_calls)
        closers.append(real.aclose)
        llm = real
    publisher, outputs, transactions = outputs_of(settings, closers)
    s, guard_config = settings, guard_config_of(settings)
    fallbacks = fallback_endpoints(s, metrics, client, guard_config, bounds.model_calls, closers)
    replicas = replica_endpoints(s, metrics, client, guard_config, bounds.model_calls, closers)
    tenancy = tenants(s, metrics)
    processor = TaskProcessor.build(
        ledger=ledger, agents=agents, llm=llm, outputs=outputs, metrics=metrics,
        config=ProcessorConfig(
            max_task_bytes=s.max_task_bytes, max_attempts=s.llm.max_attempts,
            backoff_base_s=s.llm.backoff_base_s, backoff_max_s=s.llm.backoff_max_s,
            llm_timeout_s=s.llm.timeout_s, busy_poll_s=s.ledger.busy_poll_s, lease_ms=s.ledger.lease_ms,
            context_tokens=s.llm.context_tokens, max_output_tokens=s.llm.max_tokens, count_tokens=prompt_counter(s.llm),
            shadow_sample_rate=s.llm.shadow_sample_rate, internal_retries=s.internal_retries,
            audit_topic=s.kafka.audit_topic, max_wait_s=s.llm.max_wait_s,
            max_children=s.delegation.max_children, max_depth=s.delegation.max_depth,
            delegation_max_wait_s=s.delegation.max_wait_s, replies_topic=s.kafka.replies_topic,
            reply_topics=s.delegation.reply_topics, input_topic=s.kafka.input_topic, **_session_config(s),
            read_value=s.schema_registry.reader(s.kafka.input_topic),
        ),
        worker_id=worker_id(s), model_name=s.llm.model, tracing=tracing,
        guard=EndpointGuard(llm_base_url, metrics, guard_config, redis=client, key_prefix=s.redis.key_prefix,
                            probe=chat_probe(llm, s.llm.timeout_s)),
        tenancy=tenancy, budgets=TenantBudgets(client, tenancy, key_prefix=s.redis.key_prefix),
        limiter=RateLimiter(
            client, llm_base_url, metrics, rpm=s.llm.rpm, tpm=s.llm.tpm,
            interactive_reserve=s.llm.interactive_reserve, key_prefix=s.redis.key_prefix,
            half_life_s=s.tenancy.fair_half_life_s,
        ),
        primary_url=public_url(llm_base_url), fallbacks=fallbacks, unavailable=s.llm.unavailable, replicas=replicas,
        window=adaptive_window(s, client, llm_base_url, metrics, PRIMARY, s.llm.timeout_s, closers),
    )
    closers.extend([processor.config.read_value.aclose] if processor.config.read_value is not None else [])
    # the guards' own probes end before the clients they call are closed
    closers[:0] = [e.guard.aclose for e in (processor.primary, *replicas, *fallbacks) if e.guard is not None]
    runner = runner_of(s, processor, bounds, metrics, transactions)
    dependencies = Dependencies(s, client)
    liveness = Liveness(runner, processor, metrics, dependencies.outage_probes(processor.config.read_value, outputs.encoder), s.liveness)
    return Service(s, metrics, client, ledger, llm, publisher, outputs, agents, processor, runner,
                   llm_base_url, closers, liveness)


def ledger_of(settings: Settings, client: RedisClient) -> Ledger:
    """The ledger on ``client``; its retention is settled by :meth:`Service.preflight`."""
    return Ledger(
        client, keys=Keys(settings.redis.key_prefix), lease_ms=settings.ledger.lease_ms,
        ttl_s=settings.ledger.result_ttl_s or MIN_LEDGER_TTL_S,
        wait_replicas=settings.ledger.wait_replicas, wait_aof=settings.ledger.wait_aof,
        wait_timeout_ms=settings.ledger.wait_timeout_ms, max_deaths=settings.ledger.max_deaths,
    )


def guard_config_of(s: Settings) -> GuardConfig:
    """The breaker and retry budget every endpoint's guard keeps (``AGENT_LLM__BREAKER_*``)."""
    return GuardConfig(failure_threshold=s.llm.breaker_failures, open_s=s.llm.breaker_open_s,
                       retry_ratio=s.llm.retry_budget_ratio, max_wait_s=s.llm.max_wait_s)


def runner_of(s: Settings, processor: TaskProcessor, bounds: Limits, metrics: Metrics,
              transactions: TransactionalProducer | None) -> Runner:
    """The consumer of the input topic, handing each record to ``processor``."""
    consumer_conf = s.kafka.consumer_config()
    # A fetch must hold the largest task the service accepts.
    consumer_conf["fetch.max.bytes"] = max(s.kafka.fetch_max_bytes, s.max_task_bytes * 4)
    return Runner(
        consumer_conf, processor,
        RunnerConfig(
            topic=s.kafka.input_topic, max_in_flight=s.max_in_flight,
            max_in_flight_per_partition=bounds.per_partition,
            commit_interval_s=s.commit_interval_s, drain_timeout_s=s.drain_timeout_s,
        ),
        _RunnerMetrics(metrics),
        gate=lambda: processor.accepting,
        transactions=transactions,
        screen=processor.screen(),
        progress=Progress(stall_s=s.liveness.stall_s, restart_s=s.liveness.restart_s),
    )


def install_signal_handlers(service: Service) -> None:
    """First SIGTERM/SIGINT drains; a second one exits at once."""
    loop = asyncio.get_running_loop()
    seen = {"n": 0}

    def handle(signum: int) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            log.warning("signal %s: draining (send it again to exit now)", signal.Signals(signum).name)
            service.runner.stop()
        else:
            log.error("second signal: exiting without draining")
            os._exit(130)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


def serve(settings: Settings, *, llm_base_url: str) -> None:
    """``agent-service run`` on configured servers, on the event loop of ``AGENT_EVENT_LOOP``: load the agents
    (before any server is asked, so an agent that cannot load says so at once), serve ``/healthz`` and ``/readyz``
    while waiting for Redis, the broker (creating the topics unless told not to) and the model endpoint, then
    serve until signalled. Only a configuration the service refuses ends the start."""
    agents = load_registry(settings)

    async def main() -> None:
        started = await wait_for_dependencies(settings, llm_base_url, lambda startup: Front(settings, startup))
        if started is None:
            return
        startup, front = started
        service = build(settings, llm_base_url=llm_base_url, agents=agents)
        install_signal_handlers(service)
        collector = heap.settle(freeze=settings.gc_freeze, gen0_threshold=settings.gc_gen0_threshold)
        log.info("serving: input=%s group=%s http=%s:%d llm=%s loop=%s gc=%s", settings.kafka.input_topic,
                 settings.kafka.group_id, settings.http.host, settings.http.port, llm_base_url, loop_kind(), collector)
        try:
            await service.run(front=front, startup=startup)
        finally:
            await front.stop()

    run_loop(main(), settings.event_loop)
