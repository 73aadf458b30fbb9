"""Session fixtures: a real Kafka-protocol broker and a real redis-server on free loopback ports.

``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` point the same tests at servers started elsewhere (Apache
Kafka from docker-compose, say). Otherwise the brokers named in ``AGENT_TEST_BROKERS``
(default: both local brokers, ``noida,tansu``) are started here, and every integration test runs
once per broker. A missing server binary fails the session; it never skips.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service import local
from service.settings import Settings
from tests.support import Broker


def _brokers() -> list[str]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        return ["external"]
    names = [b.strip() for b in os.environ.get("AGENT_TEST_BROKERS", "noida,tansu").split(",") if b.strip()]
    unknown = set(names) - set(local.BROKERS)
    if unknown:
        raise pytest.UsageError(f"unknown brokers in AGENT_TEST_BROKERS: {sorted(unknown)}")
    return names


@pytest.fixture(scope="session", params=_brokers())
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    name: str = request.param
    if name == "external":
        yield Broker(name, os.environ["KAFKA_BOOTSTRAP"], None)
        return
    server = local.start_broker(name, tmp_path_factory.mktemp(f"broker-{name}"))
    try:
        yield Broker(name, server.address, server)
    finally:
        server.stop()


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


@pytest.fixture
def fake_llm() -> Iterator[Any]:
    from service.fakellm import FakeLLM

    with FakeLLM() as fake:
        yield fake


@pytest.fixture
def make_settings(broker: Broker, redis_url: str, fake_llm: Any) -> Any:
    """Settings with a unique topic set, group and ledger prefix per test."""
    run = uuid.uuid4().hex[:10]

    def make(**overrides: Any) -> Settings:
        kafka: dict[str, Any] = {
            "bootstrap_servers": broker.bootstrap,
            "group_id": f"g-{run}",
            "input_topic": f"t-{run}.tasks",
            "results_topic": f"t-{run}.results",
            "dlq_topic": f"t-{run}.dlq",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 500,
            "topic_partitions": 3,
            "partition_assignment_strategy": broker.assignment_strategy,
        }
        kafka.update(overrides.pop("kafka", {}))
        values: dict[str, Any] = {
            "kafka": kafka,
            "redis": {"url": redis_url, "key_prefix": f"t{run}"},
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
def data_dir(tmp_path: Path) -> Path:
    return tmp_path
