"""Any librdkafka property reaches the consumer, the producers and the admin client; the properties the
service owns are refused at start; OAUTHBEARER with OIDC has its fields; secrets stay hidden."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from service.core.settings import KafkaSettings, Settings, to_env


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AGENT_") and name != "AGENT_TEST_BROKERS":
            monkeypatch.delenv(name)


def test_the_common_properties_reach_every_client_and_each_clients_own_override_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_KAFKA__CONFIG", json.dumps(
        {"socket.keepalive.enable": True, "client.rack": "use1-az1", "reconnect.backoff.ms": 200}))
    monkeypatch.setenv("AGENT_KAFKA__CONSUMER_CONFIG", json.dumps({"fetch.wait.max.ms": 50, "client.rack": "az2"}))
    monkeypatch.setenv("AGENT_KAFKA__PRODUCER_CONFIG", json.dumps({"batch.num.messages": 500}))
    monkeypatch.setenv("AGENT_KAFKA__ADMIN_CONFIG", json.dumps({"socket.timeout.ms": 20000}))
    k = Settings().kafka
    consumer, producer, admin = k.consumer_config(), k.producer_config(), k.common_config("admin")
    transactional = KafkaSettings.model_validate({**k.model_dump(), "transactional": True}).transactional_producer_config()
    for conf in (consumer, producer, admin, transactional):
        assert conf["socket.keepalive.enable"] == "true" and conf["reconnect.backoff.ms"] == "200"
    assert consumer["client.rack"] == "az2" and consumer["fetch.wait.max.ms"] == "50"
    assert producer["client.rack"] == admin["client.rack"] == "use1-az1"
    assert producer["batch.num.messages"] == "500" and transactional["batch.num.messages"] == "500"
    assert "batch.num.messages" not in consumer and "batch.num.messages" not in admin
    assert admin["socket.timeout.ms"] == "20000" and "socket.timeout.ms" not in consumer
    # what the service sets is still there
    assert consumer["enable.auto.commit"] is False and producer["enable.idempotence"] is True
    assert consumer["group.id"] == "agent-workers" and admin["bootstrap.servers"] == "127.0.0.1:9092"


@pytest.mark.parametrize(("where", "prop"), [
    ("CONFIG", "enable.auto.commit"), ("CONSUMER_CONFIG", "enable.auto.offset.store"),
    ("PRODUCER_CONFIG", "enable.idempotence"), ("CONSUMER_CONFIG", "isolation.level"),
    ("PRODUCER_CONFIG", "transactional.id"), ("CONFIG", "group.id"), ("ADMIN_CONFIG", "bootstrap.servers"),
    ("CONFIG", "metadata.broker.list"), ("CONSUMER_CONFIG", "auto.offset.reset"),
    ("CONSUMER_CONFIG", "enable.partition.eof"), ("CONFIG", "on_commit"), ("CONFIG", "error_cb"),
    ("PRODUCER_CONFIG", "acks"), ("PRODUCER_CONFIG", "request.required.acks"), ("PRODUCER_CONFIG", "batch.size"),
    ("CONFIG", "sasl.password"), ("CONFIG", "sasl.oauthbearer.client.secret"), ("CONFIG", "Enable.Auto.Commit"),
])
def test_a_property_the_service_owns_is_refused_naming_it_and_why(
        monkeypatch: pytest.MonkeyPatch, where: str, prop: str) -> None:
    monkeypatch.setenv(f"AGENT_KAFKA__{where}", json.dumps({prop: "x"}))
    with pytest.raises(ValidationError) as caught:
        Settings()
    text = str(caught.value)
    assert prop.lower() in text.lower() and ("owned by the service" in text or "use AGENT_KAFKA__" in text)


def test_a_value_that_is_no_scalar_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_KAFKA__CONFIG", json.dumps({"debug": ["broker", "topic"]}))
    with pytest.raises(ValidationError, match="debug"):
        Settings()
    monkeypatch.setenv("AGENT_KAFKA__CONFIG", "not json")
    with pytest.raises(ValidationError, match="JSON object"):
        Settings()


def test_secret_properties_never_show_and_still_reach_librdkafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_KAFKA__CONFIG", json.dumps(
        {"sasl.oauthbearer.config": "principal=svc secret=jaas-1", "ssl.keystore.password": "ks-2"}))
    monkeypatch.setenv("AGENT_KAFKA__CONSUMER_CONFIG", json.dumps({"ssl.key.pem": "PEM-3"}))
    s = Settings()
    conf = s.kafka.consumer_config()
    assert conf["sasl.oauthbearer.config"] == "principal=svc secret=jaas-1"
    assert conf["ssl.keystore.password"] == "ks-2" and conf["ssl.key.pem"] == "PEM-3"
    for secret in ("jaas-1", "ks-2", "PEM-3"):
        assert secret not in repr(s) and secret not in str(s.model_dump())
        assert secret not in s.model_dump_json()
    # a spawned worker is given them back
    rebuilt = {k: v for k, v in to_env(s).items() if k.startswith("AGENT_KAFKA__")}
    for name, value in rebuilt.items():
        monkeypatch.setenv(name, value)
    assert Settings().kafka.consumer_config() == conf


def test_oauthbearer_with_oidc_reaches_librdkafka(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "OAUTHBEARER", "SASL_OAUTHBEARER_METHOD": "oidc",
           "SASL_OAUTHBEARER_CLIENT_ID": "svc-1", "SASL_OAUTHBEARER_CLIENT_SECRET": "oidc-secret-9",
           "SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/oauth2/token",
           "SASL_OAUTHBEARER_SCOPE": "kafka", "SASL_OAUTHBEARER_EXTENSIONS": "logicalCluster=lkc-1,identityPoolId=pool-2"}
    for name, value in env.items():
        monkeypatch.setenv(f"AGENT_KAFKA__{name}", value)
    s = Settings()
    for conf in (s.kafka.consumer_config(), s.kafka.producer_config(), s.kafka.common_config("admin")):
        assert conf["sasl.mechanism"] == "OAUTHBEARER" and conf["sasl.oauthbearer.method"] == "oidc"
        assert conf["sasl.oauthbearer.client.id"] == "svc-1"
        assert conf["sasl.oauthbearer.client.secret"] == "oidc-secret-9"
        assert conf["sasl.oauthbearer.token.endpoint.url"] == "https://idp.example/oauth2/token"
        assert conf["sasl.oauthbearer.scope"] == "kafka"
        assert conf["sasl.oauthbearer.extensions"] == "logicalCluster=lkc-1,identityPoolId=pool-2"
    assert "oidc-secret-9" not in repr(s) and "oidc-secret-9" not in str(s.model_dump())


def test_without_oidc_no_oauthbearer_property_is_set() -> None:
    conf = KafkaSettings().consumer_config()
    assert not [name for name in conf if name.startswith("sasl.")]


@pytest.mark.parametrize("missing", ["client_id", "client_secret", "token_endpoint_url"])
def test_oidc_without_its_client_or_endpoint_is_refused(missing: str) -> None:
    fields = {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_oauthbearer_method": "oidc",
              "sasl_oauthbearer_client_id": "svc", "sasl_oauthbearer_client_secret": "s",
              "sasl_oauthbearer_token_endpoint_url": "https://idp.example/token"}
    del fields[f"sasl_oauthbearer_{missing}"]
    with pytest.raises(ValidationError, match=f"sasl_oauthbearer_{missing}"):
        KafkaSettings.model_validate(fields)


def test_oidc_without_the_oauthbearer_mechanism_is_refused() -> None:
    with pytest.raises(ValidationError, match="OAUTHBEARER"):
        KafkaSettings.model_validate({
            "sasl_mechanism": "SCRAM-SHA-512", "sasl_oauthbearer_method": "oidc",
            "sasl_oauthbearer_client_id": "svc", "sasl_oauthbearer_client_secret": "s",
            "sasl_oauthbearer_token_endpoint_url": "https://idp.example/token"})
