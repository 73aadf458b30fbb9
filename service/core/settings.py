"""Service settings: one model, read from ``AGENT_*`` environment variables (and ``AGENT_CONFIG_FILE``).

Nested groups use ``__``: ``AGENT_KAFKA__BOOTSTRAP_SERVERS``, ``AGENT_LLM__MODEL``.
Built once in the entry point (:func:`service.runtime.wiring.build`), never at import time.
Secrets are :class:`~pydantic.SecretStr` and render as ``**********``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dedup.keys import is_valid_tenant
from service.core.batch_settings import BatchSettings
from service.core.endpoint_settings import FallbackEndpoint, OtherEndpoint, ReplicaEndpoint
from service.core.kafka_config import Client, ClientConfig, check_oidc, client_properties, security_properties
from service.core.schedule_spec import SchedulerSettings
from service.core.schema_registry import SchemaRegistrySettings
from service.core.sessions_settings import SessionsSettings, stall_outlasts_lease
from service.core.settings_sources import CheckedSettings

EMBEDDED_BROKERS = ("noida", "tansu")  # what `agent-service run --embedded --broker` may start


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "agent-workers"
    input_topic: str = "agent.tasks"
    results_topic: str = "agent.results"
    dlq_topic: str = "agent.tasks.dlq"
    # one event per side effect of a tool call and per decision on a parked task
    audit_topic: str = "agent.audit"
    # approvals and rejections of parked tasks, as JSON {"task_id", "approve", "reason", "by"}
    approvals_topic: str = "agent.approvals"
    # replies of this deployment's children to their parents (docs/DELEGATION.md)
    replies_topic: str = "agent.replies"
    session_timeout_ms: int = Field(10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(1_000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=10_000)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    partition_assignment_strategy: str = "cooperative-sticky"
    # the consumer group protocol: "classic" (assignment by the group leader, every broker), or
    # "consumer" (KIP-848, Apache Kafka 4.x: the broker assigns, and the session timeout, the
    # heartbeat interval and the assignor are the broker's group settings, not the client's)
    group_protocol: Literal["classic", "consumer"] = "classic"
    # librdkafka's prefetch, the memory a worker spends on records it has not taken yet:
    # queued.max.messages.kbytes, queued.min.messages and fetch.max.bytes
    prefetch_kbytes: int = Field(16_384, ge=1_024)
    prefetch_messages: int = Field(10_000, ge=100)
    fetch_max_bytes: int = Field(8 * 1024 * 1024, ge=1024 * 1024)
    client_id: str = "agent-service"
    # security: passed through to librdkafka as typed fields
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    sasl_oauthbearer_method: Literal["default", "oidc"] = "default"  # "oidc": tokens from the token endpoint
    sasl_oauthbearer_client_id: str | None = None
    sasl_oauthbearer_client_secret: SecretStr | None = None
    sasl_oauthbearer_token_endpoint_url: str | None = None
    sasl_oauthbearer_scope: str | None = None
    sasl_oauthbearer_extensions: str | None = None  # "key=value,key=value"
    # any other librdkafka property, as a JSON object: for every client, and per client (overriding)
    config: ClientConfig = Field(default_factory=dict)
    consumer_extra: ClientConfig = Field(default_factory=dict, validation_alias=AliasChoices("consumer_config", "consumer_extra"))
    producer_extra: ClientConfig = Field(default_factory=dict, validation_alias=AliasChoices("producer_config", "producer_extra"))
    admin_extra: ClientConfig = Field(default_factory=dict, validation_alias=AliasChoices("admin_config", "admin_extra"))
    # exactly-once output: each outcome and the offset of the record that produced it are written
    # in one Kafka transaction (read the output topics with isolation.level=read_committed)
    transactional: bool = False
    # unique per live worker; keep it stable across restarts of one replica (a StatefulSet ordinal,
    # a container name) so a restarted worker aborts its predecessor's open transaction at once.
    # Unset: "<group_id>-<hostname>-<pid>" (stable in a container, whose service runs as pid 1)
    transactional_id: str | None = Field(None, min_length=1, max_length=200)
    # how long the coordinator keeps a dead worker's transaction open before aborting it
    transaction_timeout_ms: int = Field(10_000, ge=1_000, le=900_000)
    create_topics: bool = True
    topic_partitions: int = Field(6, ge=1)
    topic_replication_factor: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _oidc_complete(self) -> Self:
        return check_oidc(self)

    def common_config(self, client: Client | None = None) -> dict[str, Any]:
        """librdkafka settings shared by the consumer, producers and admin client (and ``client``'s own)."""
        conf = {"bootstrap.servers": self.bootstrap_servers, "client.id": self.client_id, **security_properties(self)}
        return {**conf, **client_properties(self.config, getattr(self, f"{client}_extra") if client else {})}

    def consumer_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            **self.common_config("consumer"),
            "group.id": self.group_id,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": self.auto_offset_reset,
            "max.poll.interval.ms": self.max_poll_interval_ms,
            "queued.max.messages.kbytes": self.prefetch_kbytes, "queued.min.messages": self.prefetch_messages,
            "fetch.max.bytes": self.fetch_max_bytes,
        }
        if self.group_protocol == "consumer":  # librdkafka refuses the classic-only settings with it
            conf["group.protocol"] = "consumer"
        else:
            conf.update({
                "session.timeout.ms": self.session_timeout_ms,
                "heartbeat.interval.ms": self.heartbeat_interval_ms,
                "partition.assignment.strategy": self.partition_assignment_strategy,
            })
        return conf

    def producer_config(self) -> dict[str, Any]:
        return {
            **self.common_config("producer"),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5, "compression.type": "lz4",
        }

    def transactional_producer_config(self) -> dict[str, Any]:
        """The outcome producer's settings with transactions on (see :mod:`consumers.transactions`)."""
        return {
            **self.producer_config(),
            "transactional.id": self.transactional_id or f"{self.group_id}-{socket.gethostname()}-{os.getpid()}",
            "transaction.timeout.ms": self.transaction_timeout_ms,
        }


class RedisSettings(BaseModel):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    username: str | None = None
    password: SecretStr | None = None
    # a redis+sentinel:// URL's sentinels' own ACL user and password (username/password: the master's)
    sentinel_username: str | None = None
    sentinel_password: SecretStr | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    socket_timeout_s: float = Field(5.0, gt=0)
    # the ledger's connection pool (per node on a cluster). Unset: it follows the model calls a worker may
    # have open (one Redis call each at a time) plus a few for lease renewals, the guard and the API; set, a cap
    max_connections: int | None = Field(None, ge=2)
    key_prefix: str = Field("agent", pattern=r"^[A-Za-z0-9_.-]{1,32}$")


UnavailablePolicy = Literal["wait", "fallback", "fail_fast"]
UNAVAILABLE_POLICIES: tuple[str, ...] = ("wait", "fallback", "fail_fast")


class LLMSettings(BaseModel):
    base_url: str | None = None  # None: the embedded local model
    api_key: SecretStr = SecretStr("not-needed")
    model: str = "smollm2"
    timeout_s: float = Field(30.0, gt=0)
    response_format: Literal["json_schema", "json_object"] = "json_object"
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(512, ge=1)
    # the model's window: a prompt not fitting with its answer is dead-lettered oversize, never cut (embedded: 2048)
    context_tokens: int = Field(8192, ge=256)
    max_attempts: int = Field(4, ge=1)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    # model calls a worker may have open. Unset: it follows max_in_flight (times the most calls one
    # task can have open at once, see service.runtime.limits); set, it is a cap (logged at start)
    max_concurrency: int | None = Field(None, ge=1)
    # different tasks whose calls fail in a row (5xx, timeouts; no success between) that open the breaker
    breaker_failures: int = Field(5, ge=1)
    breaker_open_s: float = Field(10.0, gt=0)
    # the longest one call of a task waits for the endpoint (breaker, degraded, Retry-After, rate limits,
    # the window); then the task is dead-lettered `unavailable` (replay it once the endpoint is back)
    max_wait_s: float = Field(300.0, gt=0)
    retry_budget_ratio: float = Field(0.2, ge=0, le=1)  # retries per first call, over 10 s
    rpm: int = Field(0, ge=0)  # requests per minute across replicas (0: no limit)
    tpm: int = Field(0, ge=0)  # tokens per minute across replicas (0: no limit)
    interactive_reserve: float = Field(0.2, ge=0, le=1)  # share of rpm/tpm batch work cannot use
    # the fleet's adaptive window of model calls open per endpoint, shared through Redis
    # (service.llm.window): it opens window_initial slots, doubles every round trip (slow start), then
    # grows by one per round trip; a 429 or a timeout cuts it to window_backoff of its size, an outage
    # starts it over. window_max caps it (0: no fleet-wide cap; each worker's own limit still holds)
    window: bool = True
    window_initial: int = Field(4, ge=1)
    window_max: int = Field(0, ge=0)
    window_backoff: float = Field(0.7, gt=0, lt=1)
    # in slow start a window that is full and wanted also doubles every window_ramp_s while no 429 or
    # timeout comes back (0: only answers grow it): a provider refuses at once above its limit, so a
    # 2 s model need not take 2 s per doubling
    window_ramp_s: float = Field(0.1, ge=0)
    # the largest window that ran a round trip full without a 429 or a timeout is remembered in Redis
    # per endpoint: a cold window (after idle, a restart, a new worker) opens at it, and a 429 above it
    # cuts back to it. Trusted whole for window_memory_s, then halved per window_memory_s (0: no memory)
    window_memory_s: float = Field(3600.0, ge=0)
    shadow_sample_rate: float = Field(0.0, ge=0, le=1)  # duplicates re-run in shadow to measure divergence
    local_gguf: str | None = None  # path to a GGUF file for the embedded model
    tokenizer_gguf: str | None = None  # a GGUF whose vocabulary counts prompts (service.llm.tokens)
    # the most of a response body read from the endpoint: a larger 2xx answer is invalid output
    max_response_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # endpoints tried in order while the primary is unavailable, by kinds whose policy is `fallback`:
    # a JSON list of {"base_url", "api_key", "model", "timeout_s"?, "rpm"?, "tpm"?, "name"?}
    fallbacks: list[FallbackEndpoint] = Field(default_factory=list)
    # more endpoints serving `model`: a JSON list of {"base_url", "api_key"?, "rpm"?, "tpm"?, "name"?,
    # "prompt_cache_key"?}; each step's calls go to the one its prompt cache key prefers (see ReplicaEndpoint)
    replicas: list[ReplicaEndpoint] = Field(default_factory=list)
    # send each step's prompt cache key (OpenAI's `prompt_cache_key`); off for a server refusing unknown fields
    prompt_cache_key: bool = True
    # what a kind does while the primary's breaker is open or it is degraded, unless the kind says:
    # wait (for it), fallback (to the first fallback that accepts), fail_fast (dead letter `unavailable`)
    unavailable: UnavailablePolicy = "wait"

    @model_validator(mode="after")
    def _name_fallbacks(self) -> Self:
        """Each fallback and replica gets a name (its position unless set); two with one name are refused."""
        names: list[str] = []
        for role, others in (("fallback", self.fallbacks), ("replica", self.replicas)):
            for i, other in enumerate(others, 1):
                if other.name is None:
                    other.name = f"{role}-{i}"
                if other.name in names or other.name == "primary":
                    raise ValueError(f"llm.{role}s: the name {other.name!r} is used twice (the primary is 'primary')")
                names.append(other.name)
        return self

    @model_validator(mode="after")
    def _batch_can_run(self) -> Self:
        """A limit whose batch share rounds below one per minute would starve batch work forever."""
        share = 1 - self.interactive_reserve
        for name, limit in (("rpm", self.rpm), ("tpm", self.tpm)):
            if limit > 0 and limit * share < 1:
                raise ValueError(
                    f"llm.{name}={limit} with llm.interactive_reserve={self.interactive_reserve} "
                    f"leaves batch work {limit * share:.2f} per minute: it could never run; "
                    f"raise {name} or lower interactive_reserve"
                )
        return self


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    enabled: bool = True
    # the key the console's session cookies and CSRF tokens are signed with, the same on every
    # replica; unset, it is derived from the admin and read tokens (a token change ends every session)
    session_secret: SecretStr | None = None


class LivenessSettings(BaseModel):
    # with work pending (records in flight, paused partitions with lag, or outcomes staged for a
    # transaction; while transactions fail, staging one is not finishing it) and no record finished
    # for stall_s seconds, /readyz answers 503 naming what holds the work; after restart_s, /healthz
    # fails too so the platform restarts the process (0: never)
    stall_s: float = Field(120.0, gt=0)
    restart_s: float = Field(600.0, ge=0)
    # how often the dependencies (Redis, the broker) are asked while consumption is paused by an
    # outage, and at start; waits between asks at start back off (with jitter) up to retry_max_s
    probe_interval_s: float = Field(5.0, gt=0)
    retry_max_s: float = Field(5.0, gt=0)


class LedgerSettings(BaseModel):
    lease_ms: int = Field(30_000, ge=100)
    busy_poll_s: float = Field(0.5, gt=0)
    # How long a ledger record outlives its task. It must outlive every record that can be
    # replayed: unset, it is the input topic's retention (read from the broker at start; at least
    # 7 days, and 100 years for a topic kept for ever). Set below that retention, the service
    # refuses to start.
    result_ttl_s: int | None = Field(None, ge=60)
    # Durability after COMPLETE on replicated Redis: wait until this many replicas acknowledged
    # the write (WAIT), and with wait_aof until the AOF of the primary and of that many replicas
    # holds it (WAITAOF, Redis 7.2+), before the result is published and its offset committed.
    wait_replicas: int = Field(0, ge=0)
    wait_aof: bool = False
    wait_timeout_ms: int = Field(1000, ge=1)
    # A worker that dies (its lease runs out) with a model call of a task under way gives that
    # attempt back; its death is counted apart, and this many deaths end the task `crashed`.
    max_deaths: int = Field(3, ge=1)


class DelegationSettings(BaseModel):
    max_children: int = Field(32, ge=1)  # children of one delegating step
    max_depth: int = Field(5, ge=1)  # a root is at depth 0; its children at 1
    max_wait_s: float = Field(86_400.0, gt=0)  # the longest a parent without a deadline waits
    # the replies topics of other deployments whose parents may delegate here: a child replies to
    # its record's agent.reply_to only when it is this deployment's replies topic or one of these
    reply_topics: tuple[str, ...] = ()


class ToolsSettings(BaseModel):
    # how often each replica looks for parked tasks past their deadline (and decisions not yet resumed)
    sweep_interval_s: float = Field(5.0, gt=0)
    # the ticketing API behind the built-in kind `support_ticket` (unset: the kind is not offered)
    tickets_url: str | None = None
    # `support_ticket`: a refund above this amount waits for a person's approval, at most this long
    approval_above: float = Field(100.0, ge=0)
    approval_timeout_s: float = Field(24 * 3600.0, gt=0)


OverBudgetPolicy = Literal["wait", "dead_letter"]
MAX_NAMED_TENANTS = 100  # each named tenant is a metric label: the table stays small
RESERVED_TENANT_LABELS = ("other",)  # the label of every tenant the table does not name


class TenantPolicy(BaseModel):
    """One named tenant: its share of a contended quota and its hard token budget."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, gt=0, le=1000)  # its share, relative to the other tenants waiting
    # tokens (prompt + completion) it may use per period, across replicas (None: default_budget_tokens)
    budget_tokens: int | None = Field(None, ge=0)


class ModelPrice(BaseModel):
    """What a model costs, per 1,000 tokens, in the table's currency."""

    model_config = ConfigDict(extra="forbid")

    prompt: float = Field(ge=0)
    completion: float = Field(ge=0)


class TenancySettings(BaseModel):
    """Tenants' shares of the endpoint's quota, their token budgets and the price table.

    A task names its tenant in the field or the header ``tenant`` (none: ``default``). Named tenants
    (``tenants``) get their weight, their budget and a metric label of their own; every other tenant
    gets ``default_weight``, ``default_budget_tokens`` (each its own) and the label ``other``. With
    ``default_budget_tokens`` 0, a tenant with no budget of its own spends the ``default`` tenant's
    (so no task escapes budgets when some are configured: :meth:`service.llm.tenancy.Tenancy.account`)."""

    # JSON: {"acme": {"weight": 3, "budget_tokens": 2000000}, "beta": {"weight": 1}}
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    default_weight: float = Field(1.0, gt=0, le=1000)
    default_budget_tokens: int = Field(0, ge=0)  # per tenant and period (0: no budget)
    # budgets are counted per period of this length, aligned to the Unix epoch (86400: UTC days)
    budget_period_s: int = Field(86_400, ge=1, le=366 * 86_400)
    # a task whose next call would go over its tenant's budget: wait for the next period, or dead_letter (`budget`)
    over_budget: OverBudgetPolicy = "wait"
    # how fast a tenant's past use of a contended quota is forgotten when shares are compared
    fair_half_life_s: float = Field(30.0, gt=0, le=3600)
    # JSON: {"gpt-4o-mini": {"prompt": 0.00015, "completion": 0.0006}}, per 1,000 tokens, by the
    # model that answered; a model not in the table has its tokens counted and no money
    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounded_tenants(self) -> Self:
        if len(self.tenants) > MAX_NAMED_TENANTS:
            raise ValueError(f"tenancy.tenants: {len(self.tenants)} named, at most {MAX_NAMED_TENANTS} "
                             "(each is a metric label; the others share the label 'other')")
        for name in self.tenants:
            if not is_valid_tenant(name):
                raise ValueError(f"tenancy.tenants: {name[:80]!r} is not a tenant id "
                                 "(1-64 of A-Za-z0-9._-, starting with a letter or digit)")
            if name in RESERVED_TENANT_LABELS:
                raise ValueError(f"tenancy.tenants: {name!r} is the label of every tenant not named")
        for model in self.prices:
            if not model or len(model) > 200:
                raise ValueError("tenancy.prices: a model name is 1-200 characters")
        budgeted = sorted(name for name, t in self.tenants.items() if t.budget_tokens)
        default = self.tenants.get("default")
        if budgeted and not self.default_budget_tokens and (default is None or default.budget_tokens is None):
            # tasks of a tenant not named (and those naming none) spend the default tenant's budget
            raise ValueError(f"tenancy: tenants {budgeted[:5]} have budgets and every other tenant would have none: "
                             "set default_budget_tokens (a budget for each tenant not named), a budget for "
                             "the tenant 'default' (shared by every tenant not named and by tasks naming "
                             "none), or 'default' with budget_tokens 0 to leave them without")
        return self


class Settings(CheckedSettings):  # AGENT_* variables, then AGENT_CONFIG_FILE; unknown names refused
    model_config = SettingsConfigDict(env_prefix="AGENT_", env_nested_delimiter="__", extra="ignore", case_sensitive=False)

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    llm: LLMSettings = LLMSettings()
    http: HttpSettings = HttpSettings()
    ledger: LedgerSettings = LedgerSettings()
    liveness: LivenessSettings = LivenessSettings()
    tools: ToolsSettings = ToolsSettings()
    delegation: DelegationSettings = DelegationSettings()
    tenancy: TenancySettings = TenancySettings()
    scheduler: SchedulerSettings = SchedulerSettings()  # AGENT_SCHEDULER__SCHEDULES: a JSON list
    sessions: SessionsSettings = SessionsSettings()  # AGENT_SESSIONS__POLL_S, __MAX_WAIT_S, __STALL_S
    batch: BatchSettings = BatchSettings()  # AGENT_BATCH__ENABLED, __PRIORITY, __MAX_SIZE, __MAX_AGE_S...
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()  # AGENT_SCHEMA_REGISTRY__URL, __INPUT_FORMAT
    max_task_bytes: int = Field(262_144, ge=64)
    max_in_flight: int = Field(256, ge=1)
    max_in_flight_per_partition: int | None = Field(None, ge=1)  # unset: max_in_flight
    commit_interval_s: float = Field(1.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    # a failure of the service's own code on one record: retried this many times, then `internal`
    internal_retries: int = Field(3, ge=0)
    admin_token: SecretStr | None = None
    # reads of task records and dead letters (model output, raw payloads): this or the admin token, unless reads_open
    read_token: SecretStr | None = None
    reads_open: bool = False
    submit_token: SecretStr | None = None  # POST /tasks only: producers need no admin rights nor reads
    worker_id: str | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "text"
    # "auto": uvloop when installed (less interpreter time per task), else asyncio's (core/loops.py)
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    # the cyclic garbage collector (service/core/heap.py): freeze what the start made out of its sight, and
    # collect the youngest generation every gc_gen0_threshold allocations (0: as Python sets it, 700)
    gc_freeze: bool = True
    gc_gen0_threshold: int = Field(50_000, ge=0)
    # a user's own agents besides the built-in kinds and the `agent_service.agents` entry points, comma-separated:
    # "package.module:attribute" (an Agent, an iterable of Agents, or a callable returning either)
    agents: str | None = None
    # kinds declared in a TOML (.toml) or YAML (.yaml, .yml) file (see docs/AGENTS.md)
    kinds_file: Path | None = None
    _session_stall = model_validator(mode="after")(stall_outlasts_lease)  # AGENT_SESSIONS__STALL_S > the lease


def to_env(settings: BaseSettings) -> dict[str, str]:
    """The ``AGENT_*`` environment that rebuilds ``settings`` in another process (secrets included)."""
    env: dict[str, str] = {}

    def put(prefix: str, model: BaseModel) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{prefix}{name.upper()}"
            if isinstance(value, BaseModel):
                put(key + "__", value)
            elif isinstance(value, list | tuple):
                env[key] = json.dumps([v.to_json() if isinstance(v, OtherEndpoint) else
                                       v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value])
            elif isinstance(value, dict):
                env[key] = json.dumps({k: v.model_dump() if isinstance(v, BaseModel) else
                                       v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in value.items()})
            elif isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            elif value is not None:
                env[key] = str(value)

    put("AGENT_", settings)
    return env
