"""Apache Kafka with a SASL_SSL listener: SCRAM-SHA-512 over TLS, with a certificate made here.

One KRaft node (:func:`service.devtools.kraft.start_kafka`) with two client listeners: PLAINTEXT, which
the tests use to produce and read what they check, and SASL_SSL, the only one the service is given.
The broker's certificate is self-signed by the JDK's ``keytool`` for ``127.0.0.1`` (so a client that
verifies the broker's name accepts it), and serves as the clients' CA. The SCRAM user is created through
the admin API (``AlterUserScramCredentials``) once the node runs.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

from service.devtools import kraft
from service.devtools.local import free_port

USERNAME = "agent-svc"
PASSWORD = "scram-pw-5d1c8e"  # the test broker's user
STORE_PASSWORD = "store-pw-0a9b"  # the broker's PKCS12 keystore
MECHANISM = "SCRAM-SHA-512"


@dataclass
class SecuredKafka:
    node: kraft.KafkaNode
    sasl_port: int
    ca_pem: Path  # the broker's certificate (self-signed), PEM

    @property
    def plaintext(self) -> str:
        return self.node.address

    @property
    def secured(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    def client_config(self, *, password: str = PASSWORD, with_ca: bool = True) -> dict[str, Any]:
        """librdkafka settings of a client of the SASL_SSL listener."""
        conf: dict[str, Any] = {"bootstrap.servers": self.secured, "security.protocol": "SASL_SSL",
                                "sasl.mechanism": MECHANISM, "sasl.username": USERNAME, "sasl.password": password}
        if with_ca:
            conf["ssl.ca.location"] = str(self.ca_pem)
        return conf

    def stop(self) -> None:
        self.node.stop()


def _keytool(*args: str, cwd: Path) -> None:
    keytool = shutil.which("keytool")
    assert keytool, "the JDK's keytool is not on PATH"
    done = subprocess.run([keytool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"keytool {args[0]} failed: {done.stdout}{done.stderr}"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A PKCS12 keystore holding a self-signed certificate for 127.0.0.1, and that certificate as PEM."""
    directory.mkdir(parents=True, exist_ok=True)
    keystore, pem = directory / "broker.p12", directory / "ca.pem"
    _keytool("-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity", "2",
             "-dname", "CN=127.0.0.1", "-ext", "SAN=IP:127.0.0.1,DNS:localhost", "-ext", "BC:c=ca:true",
             "-keystore", str(keystore), "-storetype", "PKCS12", "-storepass", STORE_PASSWORD,
             "-keypass", STORE_PASSWORD, "-noprompt", cwd=directory)
    _keytool("-exportcert", "-rfc", "-alias", "broker", "-keystore", str(keystore), "-storepass", STORE_PASSWORD,
             "-file", str(pem), cwd=directory)
    return keystore, pem


def _add_user(plaintext: str) -> None:
    admin = AdminClient({"bootstrap.servers": plaintext})
    upsert = UserScramCredentialUpsertion(USERNAME, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                                          PASSWORD.encode())
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=60)


def _wait_until_served(kafka: SecuredKafka, timeout_s: float) -> None:
    """Until the user can read metadata over SASL_SSL (the credential reaches the broker's metadata)."""
    deadline = time.monotonic() + timeout_s
    admin = AdminClient({**kafka.client_config(), "log_level": 2})
    while True:
        try:
            admin.list_topics(timeout=5)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            if time.monotonic() > deadline:
                raise AssertionError(f"SASL_SSL on {kafka.secured} never served {USERNAME}: {exc}\n"
                                     f"{kafka.node.log_tail()}") from exc
        time.sleep(0.5)


def start_secured_kafka(data_dir: Path, ready_timeout_s: float = 120.0) -> SecuredKafka:
    keystore, pem = make_certificate(data_dir / "tls")
    sasl_port = free_port()
    overrides = {
        "sasl.enabled.mechanisms": MECHANISM,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": keystore,
        "ssl.keystore.password": STORE_PASSWORD,
        "ssl.key.password": STORE_PASSWORD,
    }
    node = kraft.start_kafka(data_dir / "node", overrides=overrides, extra_listeners={"SASL_SSL": sasl_port},
                             ready_timeout_s=ready_timeout_s)
    kafka = SecuredKafka(node, sasl_port, pem)
    try:
        _add_user(node.address)
        _wait_until_served(kafka, ready_timeout_s)
    except BaseException:
        node.stop()
        raise
    return kafka
