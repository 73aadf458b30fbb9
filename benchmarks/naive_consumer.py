"""The plain asyncio consumer a team would write without this service: the baseline of ``naive``.

Standalone on purpose (it imports nothing from ``service``): confluent-kafka, redis-py's asyncio
client and aiohttp, with no guarantee beyond "claimed once". Per batch of up to ``--batch`` records:
one Redis ``SET NX`` per task (a claim that is never released or fenced), one chat completion per
claimed task over one aiohttp session, all of the batch at once, one result event per answer,
``flush()``, then a synchronous commit. No retries, no schema check, no dead letters, no metrics,
no spans, no lease: a crash between the claim and the commit loses the task.

It prints JSON lines on stdout: ``{"event": "first"}`` when it holds its first record (the parent
starts its CPU meter there, as it does for the service), then ``{"event": "done", ...}`` once
``--tasks`` tasks are committed, and exits.

    python -m benchmarks.naive_consumer --bootstrap HOST:PORT --topic T --results R --group G \\
        --redis redis://HOST:PORT/0 --prefix P --model-url http://HOST:PORT/v1 --tasks 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from confluent_kafka import Consumer, Message, Producer

SYSTEM = ("Classify the text with exactly one of the labels and a confidence from 0 to 1. Answer with one "
          "JSON object that matches the given schema and nothing else.")


def request_body(task: dict[str, Any]) -> dict[str, Any]:
    """The chat completion of one ``classify`` task (the same prompt and schema as the service's)."""
    labels = task["input"]["labels"]
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": labels},
                                               "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
              "required": ["label", "confidence"], "additionalProperties": False}
    return {
        "model": "fake", "temperature": 0.7, "max_tokens": 512,
        "messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": f"Labels: {json.dumps(labels)}\n\nText:\n{task['input']['text']}"}],
        "response_format": {"type": "json_object", "schema": schema},
    }


class Naive:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                                  "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
        self.producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True, "acks": "all",
                                  "linger.ms": 5, "compression.type": "lz4"})
        self.redis = aioredis.Redis.from_url(args.redis, max_connections=args.batch)
        self.done = 0
        self.claimed = 0

    async def handle(self, http: aiohttp.ClientSession, msg: Message) -> None:
        task = json.loads(msg.value() or b"{}")
        task_id = task["task_id"]
        if not await self.redis.set(f"{self.args.prefix}:claim:{task_id}", "1", nx=True, ex=86_400):
            return  # claimed before: skip it
        self.claimed += 1
        async with http.post(f"{self.args.model_url}/chat/completions", json=request_body(task),
                             headers={"Idempotency-Key": task_id}) as resp:
            resp.raise_for_status()
            answer = await resp.json()
        output = json.loads(answer["choices"][0]["message"]["content"])
        event = {"task_id": task_id, "kind": task["kind"], "status": "succeeded", "output": output}
        self.producer.produce(self.args.results, json.dumps(event).encode(), msg.key())

    async def run(self) -> None:
        self.consumer.subscribe([self.args.topic])
        first: float | None = None
        connector = aiohttp.TCPConnector(limit=self.args.batch)
        async with aiohttp.ClientSession(connector=connector) as http:
            while self.done < self.args.tasks:
                batch = [m for m in self.consumer.consume(self.args.batch, 0.05) if not m.error()]
                if not batch:
                    continue
                if first is None:
                    first = time.monotonic()
                    print(json.dumps({"event": "first"}), flush=True)
                await asyncio.gather(*(self.handle(http, m) for m in batch))
                self.producer.flush()
                self.consumer.commit(asynchronous=False)
                self.done += len(batch)
        assert first is not None
        elapsed = time.monotonic() - first
        print(json.dumps({"event": "done", "tasks": self.done, "claimed": self.claimed, "seconds": elapsed}),
              flush=True)
        self.consumer.close()
        await self.redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.naive_consumer", description=__doc__.split("\n\n")[0])
    for name in ("bootstrap", "topic", "results", "group", "redis", "prefix", "model-url"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    asyncio.run(Naive(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
