"""Settings from AGENT_* variables; security options reach librdkafka and Redis; secrets stay hidden."""

from __future__ import annotations

import os

import pytest

from service.core.settings import Settings


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AGENT_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092" and s.kafka.group_id == "agent-workers"
    assert (s.kafka.input_topic, s.kafka.results_topic, s.kafka.dlq_topic) == (
        "agent.tasks", "agent.results", "agent.tasks.dlq")
    assert s.kafka.session_timeout_ms == 10000 and s.max_task_bytes == 262144 and s.max_in_flight == 256
    assert s.redis.url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert s.llm.base_url is None and (s.http.host, s.http.port) == ("127.0.0.1", 8000)
    assert s.admin_token is None
    assert s.read_token is None and s.reads_open is False


def test_nested_variables_and_kafka_security_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_KAFKA__BOOTSTRAP_SERVERS", "k1:9093,k2:9093")
    monkeypatch.setenv("AGENT_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("AGENT_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("AGENT_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("AGENT_KAFKA__SASL_PASSWORD", "kafka-secret-1")
    monkeypatch.setenv("AGENT_KAFKA__SSL_CA_LOCATION", "/etc/ca.pem")
    monkeypatch.setenv("AGENT_ADMIN_TOKEN", "tok-2")
    monkeypatch.setenv("AGENT_LLM__API_KEY", "sk-3")
    s = Settings()
    conf = s.kafka.consumer_config()
    assert conf["bootstrap.servers"] == "k1:9093,k2:9093"
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "svc" and conf["sasl.password"] == "kafka-secret-1"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    producer = s.kafka.producer_config()
    assert producer["enable.idempotence"] is True and producer["acks"] == "all"
    assert producer["sasl.password"] == "kafka-secret-1"
    for secret in ("kafka-secret-1", "tok-2", "sk-3"):
        assert secret not in repr(s) and secret not in str(s.model_dump())


@pytest.mark.parametrize(
    "values",
    [
        {"rpm": 1, "interactive_reserve": 0.5},
        {"rpm": 4, "interactive_reserve": 0.9},
        {"tpm": 10, "interactive_reserve": 0.95},
        {"rpm": 100, "interactive_reserve": 1.0},
        # 10 * (1 - 0.9) is 0.999... in floating point: refused rather than trusted to round up
        {"rpm": 10, "interactive_reserve": 0.9},
    ],
)
def test_a_reserve_that_starves_batch_work_is_refused(values: dict[str, float]) -> None:
    from pydantic import ValidationError

    from service.core.settings import LLMSettings

    with pytest.raises(ValidationError, match="batch work"):
        LLMSettings(**values)


@pytest.mark.parametrize(
    "values",
    [
        {"rpm": 0, "tpm": 0, "interactive_reserve": 1.0},  # no limits: nothing to starve
        {"rpm": 2, "interactive_reserve": 0.5},
        {"rpm": 20, "tpm": 10_000, "interactive_reserve": 0.9},
    ],
)
def test_limits_that_leave_batch_work_a_share_are_accepted(values: dict[str, float]) -> None:
    from service.core.settings import LLMSettings

    LLMSettings(**values)


def test_the_consumer_group_protocol_of_kip_848_leaves_the_classic_settings_to_the_broker() -> None:
    classic = Settings().kafka.consumer_config()
    assert "group.protocol" not in classic
    assert classic["partition.assignment.strategy"] == "cooperative-sticky" and classic["session.timeout.ms"] == 10_000
    kip848 = Settings(kafka={"group_protocol": "consumer"}).kafka.consumer_config()
    assert kip848["group.protocol"] == "consumer"
    assert not {"partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms"} & set(kip848)
    from confluent_kafka import Consumer

    Consumer(kip848).close()  # librdkafka takes it as it is


def test_own_agents_and_a_kinds_file_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from service.core.settings import to_env

    for name in ("AGENT_AGENTS", "AGENT_KINDS_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert (Settings().agents, Settings().kinds_file) == (None, None)
    monkeypatch.setenv("AGENT_AGENTS", "mypkg.agents:all")
    monkeypatch.setenv("AGENT_KINDS_FILE", "conf/kinds.toml")
    s = Settings()
    assert (s.agents, s.kinds_file) == ("mypkg.agents:all", Path("conf/kinds.toml"))
    env = to_env(s)  # what a spawned worker is started with
    assert (env["AGENT_AGENTS"], env["AGENT_KINDS_FILE"]) == ("mypkg.agents:all", "conf/kinds.toml")


@pytest.mark.parametrize("topics", [(), ("team-a.replies", "team-b.replies")])
def test_the_settings_a_worker_is_spawned_with_rebuild_a_tuple(monkeypatch: pytest.MonkeyPatch,
                                                               topics: tuple[str, ...]) -> None:
    """``to_env`` wrote a tuple as its ``str()`` ("()"), which the spawned worker could not read."""
    from service.core.settings import to_env

    env = to_env(Settings(delegation={"reply_topics": topics}))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().delegation.reply_topics == topics
