"""``agent-service produce``: task events from a file, stdin or flags to the input topic."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka import KafkaError, Producer

from service.agents.loading import AgentsNotLoaded, agents_from_settings
from service.agents.registry import AgentRegistry, prepare_task
from service.agents.tasks import TaskEvent
from service.cli.base import PROG, Unreachable
from service.cli.reading import DECODER, event, read_tasks
from service.core.errors import PoisonError
from service.core.settings import Settings
from service.pipeline.dlq import KAFKA_LOGGER

PROGRESS_AFTER = 1000


class Progress:
    """A one-line progress bar through the input's lines, on a terminal, past ``after`` lines."""

    def __init__(self, stream: TextIO, total: int | None, *, after: int = PROGRESS_AFTER,
                 interval_s: float = 0.1, width: int = 30) -> None:
        self.stream = stream
        self.total = total
        self.after = after
        self.interval_s = interval_s
        self.width = width
        self.enabled = stream.isatty()
        self.shown = False
        self._last = 0.0

    def render(self, done: int) -> str:
        if not self.total:
            return f"\rline {done}"
        frac = min(1.0, done / self.total)
        filled = int(frac * self.width)
        return f"\r[{'#' * filled}{'.' * (self.width - filled)}] line {done}/{self.total} {frac:4.0%}"

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled or done <= self.after:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            self.shown = True
            self.stream.write(self.render(done))
            self.stream.flush()

    def close(self, done: int) -> None:
        self.update(done, force=True)
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _count_lines(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None


def _check_topic(producer: Producer, settings: Settings) -> None:
    k = settings.kafka
    topics = producer.list_topics(timeout=10).topics
    if k.input_topic not in topics:
        raise Unreachable(f"topic {k.input_topic} does not exist on {k.bootstrap_servers}; "
                          "`agent-service run` creates it")


def _flag_task(args: argparse.Namespace) -> TaskEvent | str:
    try:
        task_input = DECODER.decode(args.task_input)
    except (ValueError, RecursionError) as exc:
        return f"--input is not JSON: {str(exc)[:200]}"
    return event({"kind": args.kind, "input": task_input, "task_id": args.task_id})


class _Tally:
    """What became of the tasks read: produced, skipped as invalid, not delivered."""

    def __init__(self) -> None:
        self.invalid = self.failed = self.sent = 0

    def delivered(self, key: str) -> Callable[[KafkaError | None, Any], None]:
        def done(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                print(key)
            else:
                self.failed += 1
                print(f"{PROG}: task {key} not delivered: {err.str()}", file=sys.stderr)
        return done

    def exit_code(self, remaining: int) -> int:
        if remaining or self.failed:
            print(f"{PROG}: {remaining + self.failed} of {self.sent} tasks were not delivered", file=sys.stderr)
            return 2
        if self.invalid:
            print(f"{PROG}: {self.invalid} invalid tasks skipped, {self.sent} produced", file=sys.stderr)
            return 1
        return 0


def produce_tasks(settings: Settings, args: argparse.Namespace) -> int:
    try:  # the kinds the service runs, so that a task is checked as the consumer would check it
        agents = agents_from_settings(settings)
    except AgentsNotLoaded as exc:
        print(f"{PROG}: agents not loaded: {exc}", file=sys.stderr)
        return 2
    tally = _Tally()
    with contextlib.ExitStack() as stack:
        source = _task_source(args, stack)
        if source is None:
            return 1
        items, total = source
        conf = {**settings.kafka.producer_config(), "message.timeout.ms": 30_000,
                "logger": logging.getLogger(KAFKA_LOGGER)}
        producer = Producer(conf)
        _check_topic(producer, settings)
        progress = Progress(sys.stderr, total)
        number = _send_all(producer, settings, agents, items, progress, tally)
        remaining = producer.flush(60)
        progress.close(number)
    return tally.exit_code(remaining)


def _task_source(args: argparse.Namespace, stack: contextlib.ExitStack,
                 ) -> tuple[Iterable[tuple[int, TaskEvent | str]], int | None] | None:
    """The numbered tasks to produce and how many lines they span (None: unknown); None when the
    file cannot be read (said on stderr)."""
    if args.kind is not None:
        return [(1, _flag_task(args))], None
    if args.file in (None, "-"):
        return read_tasks(sys.stdin), None
    path = Path(args.file)
    try:
        items = read_tasks(stack.enter_context(path.open(encoding="utf-8")))
    except OSError as exc:
        print(f"{PROG}: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return None
    return items, _count_lines(path)


def _send_all(producer: Producer, settings: Settings, agents: AgentRegistry,
              items: Iterable[tuple[int, TaskEvent | str]], progress: Progress, tally: _Tally) -> int:
    """Send every valid task, report every invalid one; returns the number of the last line read."""
    number = 0
    try:
        for number, item in items:
            progress.update(number)
            prepared = _prepared(number, item, agents, settings.max_task_bytes)
            if prepared is None:
                tally.invalid += 1
                continue
            key, value = prepared
            _send(producer, settings.kafka.input_topic, key, value, tally.delivered(key))
            tally.sent += 1
    except UnicodeDecodeError as exc:
        tally.invalid += 1
        print(f"{PROG}: input is not UTF-8 ({exc.reason}); stopped reading", file=sys.stderr)
    return number


def _prepared(number: int, item: TaskEvent | str, agents: AgentRegistry, max_bytes: int) -> tuple[str, bytes] | None:
    """The record key and value of a task; None for an invalid one (said on stderr with its line)."""
    if isinstance(item, str):
        print(f"line {number}: {item}", file=sys.stderr)
        return None
    try:
        return prepare_task(item, agents, max_bytes)
    except PoisonError as exc:
        print(f"line {number}: {exc}", file=sys.stderr)
        return None


def _send(producer: Producer, topic: str, key: str, value: bytes,
          on_delivery: Callable[[KafkaError | None, Any], None]) -> None:
    while True:
        try:
            producer.produce(topic, key=key.encode(), value=value, on_delivery=on_delivery)
            break
        except BufferError:
            producer.poll(0.1)
    producer.poll(0)
