"""Apache Kafka as a folder of jars: where they are, which version, the ``java`` command line
that runs a class from them, and Kafka's own command-line tools.

``make kafka-jars`` copies the broker (``org.apache.kafka:kafka_2.13``), its command-line tools and
a log4j2 binding from Maven into ``.kafka/libs`` (``deploy/kafka/pom.xml`` pins the version).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from service.core.errors import EmbeddedError

LIBS_ENV = "AGENT_KAFKA_LIBS"
BROKER_JAR_PREFIX = "kafka_2.13-"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
# A small serial heap and the C1 compiler only: as quick to start as the defaults (G1, C2) on two cores,
# a quarter less memory, and no slower for test-sized loads.
JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError",
             "-Djava.awt.headless=true")
LOG4J2 = """\
status = error
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = OUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
# a stopped or killed node makes the others warn several times a second
logger.network.name = org.apache.kafka.clients.NetworkClient
logger.network.level = ERROR
"""


def kafka_libs() -> Path:
    """The folder of Kafka's jars: ``$AGENT_KAFKA_LIBS``, else ``.kafka/libs`` in the repository or cwd."""
    override = os.environ.get(LIBS_ENV)
    if override:
        candidates = [Path(override)]
    else:
        repo = Path(__file__).resolve().parents[2]
        candidates = list(dict.fromkeys([repo / ".kafka" / "libs", Path.cwd() / ".kafka" / "libs"]))
    for libs in candidates:
        if any(libs.glob(f"{BROKER_JAR_PREFIX}*.jar")):
            return libs.resolve()
    where = " or ".join(str(c) for c in candidates)
    raise EmbeddedError(f"Apache Kafka's jars are not in {where}: run `make kafka-jars` "
                        f"(needs Maven and a JDK 17+), or set {LIBS_ENV} to a folder of them")


def kafka_version(libs: Path | None = None) -> str:
    """The broker's version, read from the name of its jar (``kafka_2.13-4.4.0.jar`` gives ``4.4.0``)."""
    libs = libs or kafka_libs()
    jars = sorted(p.name for p in libs.glob(f"{BROKER_JAR_PREFIX}*.jar")
                  if not p.name.endswith(("-sources.jar", "-test.jar")))
    if len(jars) != 1:
        raise EmbeddedError(f"expected one {BROKER_JAR_PREFIX}*.jar in {libs}, found {jars}: run `make kafka-jars`")
    return jars[0].removeprefix(BROKER_JAR_PREFIX).removesuffix(".jar")


def java_binary() -> str:
    """``$JAVA_HOME/bin/java`` if it exists, else ``java`` on the PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise EmbeddedError("no java: Apache Kafka 4.x needs a JDK 17+ (Debian: apt-get install openjdk-17-jre-headless)")
    return found


def random_uuid() -> str:
    """A Kafka ``Uuid`` (cluster or directory id): 16 random bytes, URL-safe base64 without padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's own Uuid.randomUuid() avoids these too
            return text


def java_argv(libs: Path, heap: str, log4j2: Path, main: str, *args: str,
              jvm_flags: Sequence[str] = JVM_FLAGS) -> list[str]:
    return [java_binary(), f"-Xmx{heap}", "-Xms64m", *jvm_flags, f"-Dlog4j2.configurationFile={log4j2}",
            f"-Dkafka.logs.dir={log4j2.parent}", "-cp", f"{libs}/*", main, *args]


# Kafka's own command-line tools, run from the same jars (``kafka-tools``).
CONSUMER_GROUPS = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
CONSOLE_CONSUMER = "org.apache.kafka.tools.consumer.ConsoleConsumer"
CONSOLE_PRODUCER = "org.apache.kafka.tools.ConsoleProducer"


def kafka_tool(main: str, *args: str, timeout_s: float = 120.0, stdin: bytes | None = None) -> str:
    """Run one of Kafka's tools (``main`` is its class) and return what it printed on stdout.

    The tool logs only errors, to stderr; a non-zero exit raises :class:`EmbeddedError` with both.
    """
    libs = kafka_libs()
    with tempfile.TemporaryDirectory(prefix="kafka-tool-") as tmp:
        log4j2 = Path(tmp) / "log4j2.properties"
        log4j2.write_text(LOG4J2.format(level="ERROR").replace("appender.out.type = Console",
                                                                "appender.out.type = Console\nappender.out.target = SYSTEM_ERR"))
        argv = java_argv(libs, "256m", log4j2, main, *args)
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise EmbeddedError(f"{main} {' '.join(args)} exited with {done.returncode}: "
                            f"{done.stderr.decode(errors='replace')[-2000:]}{done.stdout.decode(errors='replace')[-1000:]}")
    return done.stdout.decode(errors="replace")
