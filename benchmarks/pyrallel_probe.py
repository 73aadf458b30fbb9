"""The ``parallel_consumer`` workload on pyrallel-consumer, run under its own interpreter.

pyrallel-consumer needs Python 3.12 or newer, so this file runs in a separate virtual environment
and imports nothing from this project. It consumes ``--records`` records of one topic with
key-ordered concurrency (``ordering_mode=key_hash``, the asyncio engine, the library's defaults
otherwise), does the same per-record work as the other consumers (``asyncio.sleep`` of a delay
drawn per offset from one seeded generator) and prints one JSON line with its timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time


def delays(seed: int, n: int, max_work_s: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0, max_work_s) for _ in range(n)]


async def main(args: argparse.Namespace) -> dict[str, object]:
    from pyrallel_consumer.config import KafkaConfig
    from pyrallel_consumer.consumer import PyrallelConsumer
    from pyrallel_consumer.dto import ExecutionMode, OrderingMode, WorkItem

    work = delays(args.seed, args.records, args.max_work_s)
    state: dict[str, object] = {"count": 0, "first": None, "last": None, "violations": 0}
    last_offset: dict[object, int] = {}
    done = asyncio.Event()

    async def worker(item: WorkItem) -> None:
        if state["first"] is None:
            state["first"] = time.monotonic()
        previous = last_offset.get(item.key)
        if previous is not None and item.offset < previous:
            state["violations"] = int(state["violations"]) + 1  # type: ignore[call-overload]
        last_offset[item.key] = item.offset
        await asyncio.sleep(work[item.offset % len(work)])
        state["count"] = int(state["count"]) + 1  # type: ignore[call-overload]
        state["last"] = time.monotonic()
        if state["count"] == args.records:
            done.set()

    config = KafkaConfig(BOOTSTRAP_SERVERS=args.bootstrap, CONSUMER_GROUP=args.group,
                         AUTO_OFFSET_RESET="earliest", SESSION_TIMEOUT_MS=6000, dlq_enabled=False)
    config.metrics.enabled = False
    config.parallel_consumer.ordering_mode = OrderingMode.KEY_HASH
    config.parallel_consumer.execution.mode = ExecutionMode.ASYNC
    consumer = PyrallelConsumer(config=config, worker=worker, topic=args.topic)
    started = time.monotonic()
    await consumer.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=args.timeout_s)
    finally:
        await consumer.stop()
    first, last = state["first"], state["last"]
    assert isinstance(first, float) and isinstance(last, float)
    return {
        "records": state["count"],
        "wall_s": last - first,
        "join_s": first - started,
        "order_violations": state["violations"],
        "max_in_flight": config.parallel_consumer.execution.max_in_flight,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--max-work-s", type=float, default=0.005)
    parser.add_argument("--timeout-s", type=float, default=300)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result), flush=True)
