"""A Sentinel-managed Redis on loopback ports: a master, its replicas and a quorum of sentinels.

Every process is Debian's ``redis-server`` (a sentinel is ``redis-server <conf> --sentinel``, which
is what the ``redis-sentinel`` name runs); each sentinel writes its own configuration file, as
sentinels do, to remember the master it follows after a failover.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from service.core.errors import EmbeddedError
from service.devtools import processes
from service.devtools.local import Server, free_port, redis_argv, spawn, start_redis, wait_for_port

SERVICE = "ledger"


@dataclass
class SentinelSet:
    """The data servers (``servers[0]`` the first master) and the sentinels that watch them."""

    servers: list[Server]
    sentinels: list[Server]
    service: str = SERVICE

    def url(self, db: int = 0) -> str:
        """What ``AGENT_REDIS__URL`` takes for this set."""
        return f"redis+sentinel://{','.join(s.address for s in self.sentinels)}/{self.service}/{db}"

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=2)
            try:
                address: Any = client.sentinel_get_master_addr_by_name(self.service)
                return int(address[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise EmbeddedError("no sentinel answers")

    def server(self, port: int) -> Server:
        return next(s for s in self.servers if s.port == port)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every sentinel agrees on the master, knows every replica up and every other sentinel,
        and every replica is in sync with the master."""
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if time.monotonic() > deadline:
                raise EmbeddedError(f"sentinel set not ready after {timeout_s}s")
            time.sleep(0.2)

    def _ready(self) -> bool:
        masters = set()
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=2, decode_responses=True)
            try:
                state: Any = client.sentinel_master(self.service)
                replicas: Any = client.sentinel_slaves(self.service)
            except redis.RedisError:
                return False
            finally:
                client.close()
            up = [r for r in replicas if not (r["is_sdown"] or r["is_odown"]) and r.get("master-link-status") == "ok"]
            if (not state["is_master"] or state["is_sdown"] or state["is_odown"]
                    or state["num-other-sentinels"] < len(self.sentinels) - 1 or len(up) < len(self.servers) - 1):
                return False
            masters.add(int(state["port"]))
        return len(masters) == 1

    def stop(self) -> None:
        processes.stop_all([s.proc for s in [*self.sentinels, *self.servers]])


def sentinel_conf(port: int, data_dir: Path, master_port: int, service: str, quorum: int, down_after_ms: int) -> str:
    return "\n".join([
        f"port {port}", "bind 127.0.0.1", "protected-mode no", f"dir {data_dir}",
        f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
        f"sentinel down-after-milliseconds {service} {down_after_ms}",
        f"sentinel failover-timeout {service} {max(4 * down_after_ms, 3000)}",
        f"sentinel parallel-syncs {service} 1", "",
    ])


def start_sentinel(data_dir: Path, master_port: int, service: str = SERVICE, quorum: int = 2,
                   down_after_ms: int = 1000) -> Server:
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "sentinel.conf"
    conf.write_text(sentinel_conf(port, data_dir, master_port, service, quorum, down_after_ms))
    argv = [redis_argv(port, data_dir)[0], str(conf), "--sentinel"]
    log_path = data_dir / "sentinel.log"
    server = Server("sentinel", port, spawn(argv, log_path), data_dir, argv, log_path)
    with server.reaped_on_error():
        wait_for_port(port, 15, server.proc)
    return server


def start_sentinel_set(data_dir: Path, replicas: int = 1, sentinels: int = 3, down_after_ms: int = 1000) -> SentinelSet:
    """A master, ``replicas`` replicas of it and ``sentinels`` sentinels (quorum: a majority);
    returns once the sentinels agree and every replica is in sync."""
    started = SentinelSet([], [])
    try:
        master = start_redis(data_dir / "server-0")
        started.servers.append(master)
        for i in range(replicas):
            started.servers.append(start_redis(data_dir / f"server-{i + 1}", None,
                                               "--replicaof", "127.0.0.1", str(master.port)))
        for i in range(sentinels):
            started.sentinels.append(start_sentinel(data_dir / f"sentinel-{i}", master.port,
                                                    quorum=sentinels // 2 + 1, down_after_ms=down_after_ms))
        started.wait_ready()
    except BaseException:
        processes.stop_all([s.proc for s in [*started.sentinels, *started.servers]], grace_s=0)
        raise
    return started
