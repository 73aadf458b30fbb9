"""A Schema Registry speaking Confluent's API on a free loopback port: Apicurio Registry, built
from Maven Central by ``make schema-registry`` (deploy/schema-registry/pom.xml) into
``.kafka/schema-registry``. Its storage is an H2 file in the data directory, so a registry stopped
and started again (an outage) still knows every schema it was given."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from service.core.errors import EmbeddedError
from service.devtools import local
from service.devtools.kafka_jars import java_binary

HOME_ENV = "AGENT_SCHEMA_REGISTRY_HOME"  # a folder holding the runner jar and its lib/
CCOMPAT_PATH = "/apis/ccompat/v6"  # Confluent's API, as Apicurio 2.x serves it


def registry_home() -> Path:
    """``$AGENT_SCHEMA_REGISTRY_HOME``, else ``.kafka/schema-registry`` in the repository."""
    override = os.environ.get(HOME_ENV)
    home = Path(override) if override else Path(__file__).resolve().parents[2] / ".kafka" / "schema-registry"
    if not any(home.glob("*-runner.jar")):
        raise EmbeddedError(f"no Schema Registry in {home}: run `make schema-registry` (needs Maven and a JDK 17+), "
                            f"or set {HOME_ENV} to a folder holding its runner jar")
    return home.resolve()


def registry_argv(port: int, home: Path | None = None) -> list[str]:
    home = home or registry_home()
    jar = next(iter(sorted(home.glob("*-runner.jar"))))
    return [java_binary(), "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            f"-Dquarkus.http.port={port}", "-Dquarkus.http.host=127.0.0.1", "-Dquarkus.log.level=WARN",
            "-jar", str(jar)]


class SchemaRegistry(local.Server):
    @property
    def url(self) -> str:
        """The base URL of Confluent's API: ``SchemaRegistryClient({"url": ...})``."""
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"

    def restart(self, ready_timeout_s: float = 120.0) -> None:
        """Start it again on the same port and storage, and wait until it answers."""
        self.stop()
        self.start(ready_timeout_s)

    def start(self, ready_timeout_s: float = 120.0) -> None:
        self.proc = local.spawn(self.argv, self.log_path)
        with self.reaped_on_error():
            wait_until_serving(self, ready_timeout_s)


def start_schema_registry(data_dir: Path, port: int | None = None, ready_timeout_s: float = 120.0) -> SchemaRegistry:
    """Start the registry (its H2 database and log in ``data_dir``) and wait until it serves."""
    port = port or local.free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = ["env", f"REGISTRY_DATASOURCE_URL=jdbc:h2:file:{data_dir / 'registry'}", *registry_argv(port)]
    log_path = data_dir / "registry.log"
    registry = SchemaRegistry("schema-registry", port, local.spawn(argv, log_path), data_dir, argv, log_path)
    with registry.reaped_on_error():
        wait_until_serving(registry, ready_timeout_s)
    return registry


def wait_until_serving(registry: SchemaRegistry, timeout_s: float) -> None:
    """Until ``GET /subjects`` answers 200 (the port opens before the storage is ready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if registry.proc.poll() is not None:
            raise EmbeddedError(f"the Schema Registry exited with {registry.proc.returncode}: see {registry.log_path}")
        try:
            with urllib.request.urlopen(f"{registry.url}/subjects", timeout=2) as answer:  # noqa: S310 - loopback
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise EmbeddedError(f"the Schema Registry did not serve within {timeout_s}s: see {registry.log_path}")
