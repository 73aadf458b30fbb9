"""``python -m benchmarks``: measure, side by side in one run, and print a table.

Every figure is printed next to its baseline and target; a missed target says ``MISSED`` and the
command still exits 0 (a benchmark that could not run at all makes it exit 1). Progress goes to
stderr, the table to stdout.

    python -m benchmarks                      # every benchmark, full sizes, noida-db broker
    python -m benchmarks --quick              # scaled-down sizes: a smoke check of a few minutes
    python -m benchmarks --only e2e,replay --broker tansu --json figures.json
    python -m benchmarks --broker kafka       # on Apache Kafka (one KRaft node from make kafka-jars)
    python -m benchmarks --broker kafka --only naive --tasks 1000   # the service beside a naive consumer
    python -m benchmarks --broker kafka --only batch_lane           # cost per task, online and batched
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from benchmarks import backlog, batch_lane, burst, e2e, latency, naive, parallel, replay, workers
from benchmarks.env import REPO, Env, progress
from benchmarks.report import Figure, Report

BENCHMARKS: dict[str, Callable[[Env, bool], list[Figure]]] = {
    "e2e": e2e.run,
    "naive": naive.run,
    "parallel_consumer": parallel.run,
    "latency_bound": latency.run,
    "cold_burst": burst.run,
    "replay": replay.run,
    "backlog_rss": backlog.run,
    "workers": workers.run,
    "batch_lane": batch_lane.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="scaled-down sizes (a smoke check)")
    parser.add_argument("--tasks", type=int, default=None,
                        help="task count of the benchmarks that take one (naive, batch_lane), instead of their default")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the naive and cold_burst benchmarks' passes, in turn; their figures are the medians")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--broker", choices=("kafka", "noida", "tansu"), default="noida",
                        help="broker: Apache Kafka from `make kafka-jars`, or a PyPI stand-in (default noida)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = names
    return args


def _revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "-"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)  # stop the servers on the way out
    report = Report()
    report.context = {
        "broker": args.broker, "sizes": "quick" if args.quick else "full", "cpus": os.cpu_count(),
        "python": platform.python_version(), "revision": _revision(), "load_before": _loadavg(),
    }
    failed = False
    started = time.monotonic()
    with Env(args.broker) as env:
        env.tasks = args.tasks
        env.rounds = args.rounds
        for name in args.names:
            t0 = time.monotonic()
            progress(f"=== {name}")
            try:
                report.add(BENCHMARKS[name](env, args.quick))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
                failed = True
                traceback.print_exc(file=sys.stderr)
                report.add([Figure(name, "(did not run to the end)", None, "", error="failed",
                                   detail=f"{type(exc).__name__}: {str(exc)[:300]}")])
            progress(f"=== {name} took {time.monotonic() - t0:.0f}s")
    report.context["load_after"] = _loadavg()
    report.context["took"] = f"{time.monotonic() - started:.0f}s"
    print(report.table(), flush=True)
    if args.json is not None:
        report.write_json(args.json)
        progress(f"figures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
