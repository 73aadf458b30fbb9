"""``python -m benchmarks.scrape_cost``: what one read of ``/metrics`` costs the service (a part figure).

The service as a user runs it (``agent-service run`` in a child process, Apache Kafka or a stand-in,
redis-server, the zero-latency fake model) works through ``--tasks`` ``classify`` tasks, so that its
metrics have their series, and then idles. Its idle CPU is read over ``--idle-s``; then ``/metrics``
is read ``--scrapes`` times back to back, and the CPU per scrape is the process's CPU over them less
the idle CPU of that span. It is what a benchmark that watches the service through ``/metrics``
adds to the figure it measures (:data:`benchmarks.child.AFTER_FIRST_S`), and what a Prometheus adds
per scrape.

    python -m benchmarks.scrape_cost --broker kafka
"""

from __future__ import annotations

import argparse
import time
import urllib.request
from collections.abc import Sequence

from benchmarks.child import ChildService, cpu_seconds
from benchmarks.env import Env, task_records
from service.devtools import local


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scrape_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("kafka", "noida", "tansu"), default="kafka")
    parser.add_argument("--tasks", type=int, default=2_000, help="worked through first, so the series exist")
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--idle-s", type=float, default=5.0, help="how long the idle CPU is read")
    args = parser.parse_args(argv)
    with Env(args.broker) as env:
        fake = env.fake_model(0.0)
        try:
            size, used, took, idle = _measure(env, fake.base_url, args)
        finally:
            env.release(fake)
    print(f"/metrics after {args.tasks:,} tasks: {size:,} bytes; the service's CPU per scrape "
          f"{1000 * used / args.scrapes:.2f} ms ({args.scrapes} scrapes in {took:.2f}s, its idle CPU of "
          f"{1000 * idle:.1f} ms/s left out)")
    return 0


def _measure(env: Env, model_url: str, args: argparse.Namespace) -> tuple[int, float, float, float]:
    """The size of one read, the CPU the reads cost beyond idle, how long they took, the idle CPU a second."""
    from service.runtime.wiring import ensure_topics

    names = env.names("scrape")
    settings = env.settings(names, model_url, partitions=4, event_loop="uvloop",
                            http={"enabled": True, "host": "127.0.0.1", "port": local.free_port()})
    ensure_topics(settings)
    env.wait_for_topics([names.input_topic, names.results_topic, names.dlq_topic])
    env.produce(names.input_topic, task_records(names.run, args.tasks), what="tasks")
    with ChildService(settings, env.dir / "service.log") as svc:
        svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= args.tasks, total=args.tasks)
        time.sleep(1.0)  # the last commits and settles
        before = cpu_seconds(svc.pid)
        time.sleep(args.idle_s)
        idle = (cpu_seconds(svc.pid) - before) / args.idle_s
        size = len(_scrape(svc.url))
        before, started = cpu_seconds(svc.pid), time.monotonic()
        for _ in range(args.scrapes):
            _scrape(svc.url)
        took = time.monotonic() - started
        used = cpu_seconds(svc.pid) - before - idle * took
    return size, used, took, idle


def _scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
    return body


if __name__ == "__main__":
    raise SystemExit(main())
