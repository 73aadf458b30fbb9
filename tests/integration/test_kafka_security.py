"""The service on Apache Kafka's SASL_SSL listener (SCRAM-SHA-512 over TLS, a certificate made by the
test): a task in, its result out, a poison record dead-lettered and listed, with the broker's CA given
only through ``AGENT_KAFKA__CONFIG`` (``ssl.ca.pem``), so every client must have received it; a wrong
password or a client without the CA is turned away, so the security is exercised, not just configured.

The test produces and reads through the broker's PLAINTEXT listener; the service knows only SASL_SSL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from service.core.settings import Settings
from tests.support import classify, produce, read_topic, settings_env, spawn_worker, stop_workers, succeeded
from tests.support.secured_kafka import MECHANISM, PASSWORD, USERNAME, SecuredKafka

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _settings(kafka: SecuredKafka, redis_url: str, llm_base_url: str) -> Settings:
    run = uuid.uuid4().hex[:10]
    return Settings(
        kafka={
            "bootstrap_servers": kafka.secured, "group_id": f"g-{run}", "input_topic": f"s-{run}.tasks",
            "results_topic": f"s-{run}.results", "dlq_topic": f"s-{run}.dlq", "audit_topic": f"s-{run}.audit",
            "approvals_topic": f"s-{run}.approvals", "replies_topic": f"s-{run}.replies",
            "session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "topic_partitions": 1,
            "security_protocol": "SASL_SSL", "sasl_mechanism": MECHANISM,
            "sasl_username": USERNAME, "sasl_password": PASSWORD,
            # the CA only here: without it no client of the service could verify the broker
            "config": {"ssl.ca.pem": kafka.ca_pem.read_text(), "client.rack": "rack-1"},
        },
        redis={"url": redis_url, "key_prefix": f"s{run}"},
        llm={"base_url": llm_base_url, "model": "fake", "timeout_s": 5, "backoff_base_s": 0.05},
        http={"enabled": False}, commit_interval_s=0.2, drain_timeout_s=10, worker_id=f"w-{run}",
    )


def _topics(kafka: SecuredKafka) -> set[str]:
    return set(AdminClient({"bootstrap.servers": kafka.plaintext}).list_topics(timeout=10).topics)


def _wait_for_topic(kafka: SecuredKafka, topic: str, worker: Any, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while topic not in _topics(kafka):
        assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the worker never created {topic}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _refusals(conf: dict[str, Any], timeout_s: float = 60.0) -> list[str]:
    """The errors a client with ``conf`` reports while it tries to read metadata (none: it was served)."""
    errors: list[str] = []
    admin = AdminClient({**conf, "error_cb": lambda err: errors.append(err.str()), "log_level": 2})
    deadline = time.monotonic() + timeout_s
    while not errors and time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=5)
            return []
        except Exception:  # noqa: BLE001 - refused: the error callback says why
            admin.poll(0.5)
    return errors


def test_a_wrong_password_or_a_missing_ca_is_turned_away(secured_kafka: SecuredKafka) -> None:
    assert _refusals(secured_kafka.client_config()) == []
    wrong = _refusals(secured_kafka.client_config(password="not-the-password"))
    assert any("Authentication failed" in e or "SASL authentication error" in e for e in wrong), wrong
    no_ca = _refusals(secured_kafka.client_config(with_ca=False))
    assert any("SSL handshake failed" in e or "certificate verify failed" in e for e in no_ca), no_ca


def test_the_service_runs_over_sasl_ssl_with_scram(secured_kafka: SecuredKafka, redis_url: str, fake_llm: Any,
                                                    tmp_path: Path) -> None:
    s = _settings(secured_kafka, redis_url, fake_llm.base_url)
    env = settings_env(s)
    assert json.loads(env["AGENT_KAFKA__CONFIG"])["ssl.ca.pem"].startswith("-----BEGIN CERTIFICATE-----")
    log = tmp_path / "worker.log"
    worker = spawn_worker(s, str(log))
    try:
        _wait_for_topic(secured_kafka, s.kafka.input_topic, worker, log)
        produce(secured_kafka.plaintext, s.kafka.input_topic,
                [(b"sec-1", classify("sec-1")), (b"bad-1", b"\xff not json")])
        results = succeeded(read_topic(secured_kafka.plaintext, s.kafka.results_topic, expect=1, timeout_s=120))
        dead = read_topic(secured_kafka.plaintext, s.kafka.dlq_topic, expect=1, timeout_s=120)
        listed = subprocess.run([sys.executable, "-m", "service.cli", "dlq", "list", "--json"], cwd=REPO,
                                env={**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}, **env},
                                capture_output=True, text=True, timeout=120, check=False)
    finally:
        stop_workers([worker])
    assert [(m.key, m.json()["task_id"], m.json()["status"]) for m in results] == [(b"sec-1", "sec-1", "succeeded")], \
        log.read_text()[-3000:]
    assert [(m.key, m.headers["dlq.reason"]) for m in dead] == [(b"bad-1", b"decode")]
    assert listed.returncode == 0, listed.stderr
    assert [letter["reason"] for letter in json.loads(listed.stdout)] == ["decode"], listed.stdout
    assert worker.returncode == 0, log.read_text()[-3000:]
    assert PASSWORD not in log.read_text()
