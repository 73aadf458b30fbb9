"""Apache Kafka in KRaft mode, run straight from its jars, for local runs and the test suite.

``make kafka-jars`` copies the broker (``org.apache.kafka:kafka_2.13``), its command-line tools and a
log4j2 binding from Maven into ``.kafka/libs`` (``deploy/kafka/pom.xml`` pins the version). Each node
here is one JVM, ``java -cp '<libs>/*' kafka.Kafka server.properties``, acting as broker and controller
at once, on free loopback ports, with its storage formatted once by ``kafka.tools.StorageTool``.

- :func:`start_kafka`: one node, a single-voter dynamic quorum (``format --standalone``).
- :func:`start_kafka_cluster`: three nodes, a three-voter dynamic quorum (``format --initial-controllers``),
  replication factor 3 and ``min.insync.replicas=2`` everywhere.

A node looks like :class:`service.devtools.local.Server` (it is one): ``address``, ``stop()``, ``kill()``,
``restart()`` (same ports and data, no new format), ``log_path``, ``proc``. Topics are not created on
first use (``auto.create.topics.enable=false``): the service creates its own, and a test that forgets to
is told so. Group session timeouts may be as low as 1 s (classic and KIP-848 consumer groups).
"""

from __future__ import annotations

import atexit
import logging
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from service.core.errors import EmbeddedError
from service.devtools import processes
from service.devtools.kafka_jars import (
    JVM_FLAGS,
    LOG4J2,
    MAIN_CLASS,
    STORAGE_TOOL,
    java_argv,
    kafka_libs,
    kafka_version,
    random_uuid,
)
from service.devtools.local import Server, free_port, spawn, wait_for_port

log = logging.getLogger(__name__)

SINGLE_HEAP = "512m"
CLUSTER_HEAP = "384m"
@dataclass
class KafkaNode(Server):
    """One Kafka JVM (broker and controller); ``port`` is its PLAINTEXT listener."""

    node_id: int = 1
    controller_port: int = 0
    config_path: Path | None = None

    def stop(self, timeout_s: float = 20.0) -> None:
        super().stop(timeout_s)

    def restart(self, ready_timeout_s: float = 60.0) -> None:
        """Stop (if running) and start the same JVM again: same ports, same data, no new format."""
        self.stop()
        self.start(ready_timeout_s)

    def start(self, ready_timeout_s: float = 60.0) -> None:
        """Start the JVM again after :meth:`kill` or :meth:`stop` (no-op if it runs)."""
        if self.proc.poll() is None:
            return
        self.proc = spawn(self.argv, self.log_path)
        _LIVE.add(self.proc)
        with self.reaped_on_error():
            self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout_s: float = 60.0, brokers: int = 1) -> None:
        """Until this node answers a metadata request listing itself and at least ``brokers`` brokers."""
        deadline = time.monotonic() + timeout_s
        try:
            wait_for_port(self.port, timeout_s, self.proc)
        except EmbeddedError as exc:
            raise EmbeddedError(f"{exc}\n{self.log_tail()}") from exc
        _wait_for_metadata(self, brokers, deadline)

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-400:]
        text = [line for line in text if not line.startswith(("\tat ", "\t... "))][-lines:]  # stack frames
        return f"last lines of {self.log_path} (without stack frames):\n" + "\n".join(text)


# Nodes still running when the interpreter exits are killed: a JVM outlives its parent otherwise.
_LIVE: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        processes.kill(proc)


def _wait_for_metadata(node: KafkaNode, brokers: int, deadline: float) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": node.address, "log_level": 2})  # quiet while it starts
    problem = "no answer"
    while True:
        if node.proc.poll() is not None:
            raise EmbeddedError(f"kafka node {node.node_id} exited with {node.proc.returncode}\n{node.log_tail()}")
        try:
            metadata = admin.list_topics(timeout=2)
            seen = set(metadata.brokers)
            if node.node_id in seen and len(seen) >= brokers:
                return
            problem = f"metadata lists brokers {sorted(seen)}"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            problem = str(exc)
        if time.monotonic() > deadline:
            raise EmbeddedError(f"kafka node {node.node_id} on {node.address} is not ready: {problem}\n"
                                f"{node.log_tail()}")
        time.sleep(0.2)


def node_properties(node_id: int, port: int, controller_port: int, log_dir: Path, bootstrap_controllers: str,
                    replication: int, auto_create_topics: bool = False,
                    overrides: Mapping[str, object] | None = None,
                    extra_listeners: Mapping[str, int] | None = None) -> dict[str, str]:
    """``server.properties`` of one combined node (``replication`` 1 for a single node, 3 for a cluster).

    ``extra_listeners`` adds listeners named by their security protocol (``{"SASL_SSL": port}``);
    their SASL and TLS settings come in ``overrides``. Brokers talk to each other over PLAINTEXT."""
    min_isr = min(2, replication)
    listeners = {"PLAINTEXT": port, "CONTROLLER": controller_port, **(extra_listeners or {})}
    urls = ",".join(f"{name}://127.0.0.1:{p}" for name, p in listeners.items())
    props: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": node_id,
        "controller.quorum.bootstrap.servers": bootstrap_controllers,
        "listeners": urls,
        "advertised.listeners": urls,
        "listener.security.protocol.map": ",".join(
            f"{name}:{'PLAINTEXT' if name == 'CONTROLLER' else name}" for name in listeners),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": log_dir,
        "auto.create.topics.enable": str(auto_create_topics).lower(),
        "num.partitions": 1,
        "default.replication.factor": replication,
        "min.insync.replicas": min_isr,
        "unclean.leader.election.enable": "false",
        # internal topics: fewer partitions than the defaults (50 each) start a first group faster
        "offsets.topic.replication.factor": replication,
        "offsets.topic.num.partitions": 5,
        "transaction.state.log.replication.factor": replication,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": 5,
        "share.coordinator.state.topic.replication.factor": replication,
        "share.coordinator.state.topic.min.isr": min_isr,
        "share.coordinator.state.topic.num.partitions": 5,
        # groups: join at once; tests may use session timeouts down to 1 s (classic, consumer, share)
        "group.initial.rebalance.delay.ms": 0,
        "group.min.session.timeout.ms": 1000,
        "group.consumer.min.session.timeout.ms": 1000,
        "group.consumer.session.timeout.ms": 10000,
        "group.consumer.min.heartbeat.interval.ms": 100,
        "group.consumer.heartbeat.interval.ms": 1000,
        "group.share.min.session.timeout.ms": 1000,
        "group.share.session.timeout.ms": 10000,
        "group.share.min.heartbeat.interval.ms": 100,
        "group.share.heartbeat.interval.ms": 1000,
        # a SIGKILLed node is fenced (its partitions move, and it may register again when restarted)
        # after 4 s rather than 9 s
        "broker.heartbeat.interval.ms": 500,
        "broker.session.timeout.ms": 4000,
        # a few threads, not Kafka's server-sized defaults: three JVMs share two cores
        "num.network.threads": 2,
        "num.io.threads": 4,
        "background.threads": 4,
        "log.cleaner.threads": 1,
        "log.cleaner.dedupe.buffer.size": 8 * 1024 * 1024,
    }
    props.update(overrides or {})
    return {k: str(v) for k, v in props.items()}


def _write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def _format(libs: Path, heap: str, log4j2: Path, config: Path, cluster_id: str, quorum_args: list[str],
            log_path: Path, jvm_flags: Sequence[str]) -> None:
    argv = java_argv(libs, heap, log4j2, STORAGE_TOOL, "format", "--cluster-id", cluster_id,
                     "--config", str(config), *quorum_args, jvm_flags=jvm_flags)
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          timeout=120, check=False)
    with open(log_path, "ab") as out:
        out.write(b"$ " + " ".join(argv).encode() + b"\n" + done.stdout)
    if done.returncode != 0:
        raise EmbeddedError(f"formatting {config.parent} failed ({done.returncode}): "
                            f"{done.stdout.decode(errors='replace')[-2000:]}")


@dataclass
class _Plan:
    node_id: int
    directory: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    directory_id: str = field(default_factory=random_uuid)

    @classmethod
    def load(cls, node_id: int, directory: Path) -> _Plan:
        """New free ports, or the ports of the formatted node already in ``directory``."""
        plan = cls(node_id, directory)
        if (plan.log_dir / "meta.properties").exists() and plan.config.exists():
            props = dict(line.split("=", 1) for line in plan.config.read_text().splitlines() if "=" in line)
            ports = {name: int(url.rsplit(":", 1)[1]) for name, url in
                     (item.split("://", 1) for item in props.get("listeners", "").split(","))}
            plan.port, plan.controller_port = ports["PLAINTEXT"], ports["CONTROLLER"]
        return plan

    @property
    def log_dir(self) -> Path:
        return self.directory / "data"

    @property
    def config(self) -> Path:
        return self.directory / "server.properties"

    @property
    def log4j2(self) -> Path:
        return self.directory / "log4j2.properties"

    @property
    def log_path(self) -> Path:
        return self.directory / "kafka.log"


def _prepare(plan: _Plan, libs: Path, heap: str, cluster_id: str, bootstrap_controllers: str,
             quorum_args: list[str], replication: int, auto_create_topics: bool, log_level: str,
             overrides: Mapping[str, object] | None, jvm_flags: Sequence[str],
             extra_listeners: Mapping[str, int] | None = None) -> KafkaNode:
    """Write the node's files and format its storage (once: a formatted directory is kept as it is)."""
    plan.directory.mkdir(parents=True, exist_ok=True)
    plan.log4j2.write_text(LOG4J2.format(level=log_level))
    props = node_properties(plan.node_id, plan.port, plan.controller_port, plan.log_dir, bootstrap_controllers,
                            replication, auto_create_topics, overrides, extra_listeners)
    _write_properties(plan.config, props)
    if not (plan.log_dir / "meta.properties").exists():
        _format(libs, heap, plan.log4j2, plan.config, cluster_id, quorum_args, plan.log_path, jvm_flags)
    argv = java_argv(libs, heap, plan.log4j2, MAIN_CLASS, str(plan.config), jvm_flags=jvm_flags)
    proc = spawn(argv, plan.log_path)
    node = KafkaNode(f"kafka-{plan.node_id}", plan.port, proc, plan.directory, argv, plan.log_path,
                     node_id=plan.node_id, controller_port=plan.controller_port, config_path=plan.config)
    _LIVE.add(proc)
    return node


def start_kafka(data_dir: Path, *, heap: str = SINGLE_HEAP, auto_create_topics: bool = False,
                log_level: str = "WARN", overrides: Mapping[str, object] | None = None,
                jvm_flags: Sequence[str] = JVM_FLAGS, ready_timeout_s: float = 90.0,
                extra_listeners: Mapping[str, int] | None = None) -> KafkaNode:
    """One combined broker+controller node (node id 1) in ``data_dir``, ready to serve when returned.

    ``overrides`` are extra or replacing ``server.properties`` entries; ``extra_listeners`` more
    listeners besides PLAINTEXT (see :func:`node_properties`). Starting again on a ``data_dir`` that
    holds a formatted node reuses its data and its ports (no new format).
    """
    libs = kafka_libs()
    plan = _Plan.load(1, data_dir)
    node = _prepare(plan, libs, heap, random_uuid(), f"127.0.0.1:{plan.controller_port}", ["--standalone"],
                    1, auto_create_topics, log_level, overrides, jvm_flags, extra_listeners)
    try:
        node.wait_ready(ready_timeout_s)
    except BaseException:
        node.kill()
        raise
    log.info("kafka %s on %s (logs: %s)", kafka_version(libs), node.address, node.log_path)
    return node


@dataclass
class KafkaCluster:
    """Combined nodes with ids 1..n sharing one KRaft quorum; ``bootstrap`` lists all of them."""

    data_dir: Path
    cluster_id: str
    nodes: list[KafkaNode]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes)

    @property
    def address(self) -> str:
        return self.bootstrap

    def node(self, node_id: int) -> KafkaNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def running(self) -> list[KafkaNode]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def leader(self, topic: str, partition: int = 0, timeout_s: float = 10.0) -> KafkaNode:
        """The node that leads ``topic``/``partition`` now, asked of a running node."""
        from confluent_kafka.admin import AdminClient

        alive = self.running()
        if not alive:
            raise EmbeddedError("no node of the cluster runs")
        admin = AdminClient({"bootstrap.servers": ",".join(n.address for n in alive)})
        metadata = admin.list_topics(topic, timeout=timeout_s)
        leader = metadata.topics[topic].partitions[partition].leader
        return self.node(int(leader))

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every running node answers and lists every running node as a broker."""
        deadline = time.monotonic() + timeout_s
        alive = self.running()
        for n in alive:
            n.wait_ready(max(1.0, deadline - time.monotonic()), brokers=len(alive))

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to every node at once (one by one, the last would wait for a lost quorum), then
        kill; every node is reaped."""
        processes.stop_all([n.proc for n in self.nodes], grace_s=timeout_s)

    def kill(self) -> None:
        processes.stop_all([n.proc for n in self.nodes], grace_s=0)

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_kafka_cluster(data_dir: Path, nodes: int = 3, *, heap: str = CLUSTER_HEAP, auto_create_topics: bool = False,
                        log_level: str = "WARN", overrides: Mapping[str, object] | None = None,
                        jvm_flags: Sequence[str] = JVM_FLAGS, ready_timeout_s: float = 180.0) -> KafkaCluster:
    """``nodes`` combined nodes (ids 1..n, all voters) in ``data_dir/node-<id>``, started concurrently.

    Replication factor ``min(3, nodes)`` for new and internal topics, ``min.insync.replicas`` 2,
    no unclean leader election. Returns when every node lists every node as a broker.
    """
    if nodes < 1:
        raise ValueError("a cluster needs at least one node")
    libs = kafka_libs()
    cluster_id = random_uuid()
    plans = [_Plan.load(i, data_dir / f"node-{i}") for i in range(1, nodes + 1)]
    bootstrap_controllers = ",".join(f"127.0.0.1:{p.controller_port}" for p in plans)
    voters = ",".join(f"{p.node_id}@127.0.0.1:{p.controller_port}:{p.directory_id}" for p in plans)
    replication = min(3, nodes)

    def prepare(plan: _Plan) -> KafkaNode:
        return _prepare(plan, libs, heap, cluster_id, bootstrap_controllers, ["--initial-controllers", voters],
                        replication, auto_create_topics, log_level, overrides, jvm_flags)

    with ThreadPoolExecutor(nodes) as pool:
        futures = [pool.submit(prepare, p) for p in plans]
    started = [f.result() for f in futures if f.exception() is None]
    cluster = KafkaCluster(data_dir, cluster_id, started)
    try:
        for f in futures:
            f.result()  # the first failure, after every node that did start is known to the cluster
        cluster.wait_ready(ready_timeout_s)
    except BaseException:
        cluster.kill()
        raise
    log.info("kafka %s cluster of %d on %s (logs: %s)", kafka_version(libs), nodes, cluster.bootstrap, data_dir)
    return cluster
