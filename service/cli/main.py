"""The ``agent-service`` command: run the service, produce tasks, inspect the ledger and dead letters.

Settings come from ``AGENT_*`` environment variables and are read here, once; logging is
configured here too. An unreachable Redis or broker ends the command with one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka import KafkaError, KafkaException, Producer
from pydantic import ValidationError
from redis.exceptions import RedisError

from consumers.producers import ProduceFailed
from dedup.keys import Keys, is_valid_task_key
from dedup.ledger import Ledger, LedgerUnavailable
from service.agents.registry import default_agents, prepare_task
from service.agents.tasks import TaskEvent, describe_validation
from service.core.errors import EmbeddedError, PoisonError
from service.core.metrics import DLQ_REASONS
from service.core.settings import EMBEDDED_BROKERS, Settings
from service.pipeline.dlq import KAFKA_LOGGER, peek, replay

log = logging.getLogger(__name__)

PROG = "agent-service"
PROGRESS_AFTER = 1000
Handler = Callable[[Settings, argparse.Namespace], int]


class Unreachable(Exception):
    """Redis or the broker did not answer: one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------- arguments


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def coordinates(text: str) -> tuple[int, int]:
    """``PARTITION:OFFSET`` of a dead letter."""
    partition, sep, offset = text.partition(":")
    if not sep or not partition.isdigit() or not offset.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not PARTITION:OFFSET")
    return int(partition), int(offset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Runs LLM agents on Kafka task events.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="consume tasks and serve the HTTP API until signalled")
    run.add_argument("--embedded", action="store_true", help="start a local broker and redis-server")
    run.add_argument("--broker", choices=EMBEDDED_BROKERS, default="noida", help="embedded broker (default: noida)")
    run.add_argument("--data-dir", type=Path, help="where embedded servers keep their data")
    run.set_defaults(handler=_run)

    produce = sub.add_parser("produce", help="produce task events from JSON, JSON Lines or flags")
    produce.add_argument("file", nargs="?", metavar="FILE", help="JSON or JSON Lines file; - or nothing: stdin")
    produce.add_argument("--kind", help="produce one task of this kind (with --input)")
    produce.add_argument("--input", dest="task_input", metavar="JSON", help="the task's input object")
    produce.add_argument("--task-id", help="the task's id (default: a digest of kind and input)")
    produce.set_defaults(handler=_produce)

    task = sub.add_parser("task", help="inspect the ledger")
    task_sub = task.add_subparsers(dest="task_command", required=True, metavar="COMMAND")
    show = task_sub.add_parser("show", help="print a task's ledger record")
    show.add_argument("task_id", metavar="ID")
    show.set_defaults(handler=_task_show)

    dlq = sub.add_parser("dlq", help="inspect and replay dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    listing = dlq_sub.add_parser("list", help="show the newest dead letters")
    listing.add_argument("--limit", type=positive_int, default=50)
    listing.add_argument("--partition", type=int, help="only this partition")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_dlq_list)
    replay = dlq_sub.add_parser("replay", help="send dead letters back to the input topic")
    chosen = replay.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--reason", action="append", choices=DLQ_REASONS, help="replay dead letters with this reason")
    chosen.add_argument("--item", action="extend", nargs="+", type=coordinates, metavar="P:O",
                        help="replay the dead letter at partition P, offset O")
    replay.add_argument("--limit", type=positive_int, default=100)
    replay.add_argument("--json", action="store_true", help="print the report as JSON")
    replay.set_defaults(handler=_dlq_replay)

    demo = sub.add_parser("demo", help="run the service end to end on local servers")
    demo.add_argument("--tasks", type=positive_int, default=8)
    demo.add_argument("--broker", choices=EMBEDDED_BROKERS, default="noida")
    demo.add_argument("--data-dir", type=Path)
    demo.add_argument("--fake-llm", action="store_true", help="answer with a fake model instead of the local one")
    demo.set_defaults(handler=_demo)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "produce":
        if args.kind is None and (args.task_input is not None or args.task_id is not None):
            parser.error("--input and --task-id go with --kind")
        if args.kind is not None and args.file is not None:
            parser.error("give a FILE or --kind, not both")
        if args.kind is not None and args.task_input is None:
            parser.error("--kind needs --input")
    return args


# ---------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure_logging(level: str, fmt: str, *, quiet_kafka: bool = False) -> None:
    """Log lines to stderr, as text or JSON. ``quiet_kafka`` hides librdkafka's connection chatter
    (below DEBUG): a short command reports an unreachable broker in one line of its own."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            JsonFormatter() if fmt == "json"
            else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
        root.addHandler(handler)
    root.setLevel(logging.getLevelNamesMapping().get(level.upper(), logging.INFO))
    if quiet_kafka and root.level > logging.DEBUG:
        logging.getLogger(KAFKA_LOGGER).setLevel(logging.CRITICAL)


# ---------------------------------------------------------------------------- reading tasks


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_WHITESPACE = " \t\r\n"


def _event(value: Any) -> TaskEvent | str:
    if not isinstance(value, dict):
        return f"task must be a JSON object, got {type(value).__name__}"
    try:
        return TaskEvent.model_validate(value)
    except ValidationError as exc:
        return describe_validation(exc)


def _line(text: str) -> TaskEvent | str:
    try:
        return _event(_DECODER.decode(text))
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {str(exc)[:200]}"


def _array(text: str, first_line: int) -> Iterator[tuple[int, TaskEvent | str]]:
    """The elements of a JSON array, each with the line it starts on."""
    n = len(text)
    counted, line = 0, first_line

    def skip(pos: int) -> int:
        while pos < n and text[pos] in _WHITESPACE:
            pos += 1
        return pos

    def line_at(pos: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = skip(text.index("[") + 1)
    if pos < n and text[pos] == "]":
        pos = skip(pos + 1)
        if pos < n:
            yield line_at(pos), "unexpected data after the array"
        return
    while True:
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            yield line_at(pos), f"not JSON: {str(exc)[:200]}"
            return
        yield line_at(pos), _event(value)
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            pos = skip(pos + 1)
            if pos < n:
                yield line_at(pos), "unexpected data after the array"
        else:
            yield line_at(pos), "expected ',' or ']' in the array"
        return


def read_tasks(stream: Iterable[str]) -> Iterator[tuple[int, TaskEvent | str]]:
    """Task events from one JSON object, a JSON array or JSON Lines, with their line numbers.

    Yields ``(line, event)`` or ``(line, error message)``; blank lines are skipped. JSON Lines are
    read as they come, so a long stream is never held in memory.
    """
    lines = iter(stream)
    first_line, first = 0, ""
    for first_line, first in enumerate(lines, 1):  # noqa: B007 - used after the loop
        if first.strip():
            break
    else:
        return
    if first.lstrip().startswith("["):
        yield from _array(first + "".join(lines), first_line)
        return
    item = _line(first)
    if not (isinstance(item, str) and item.startswith("not JSON")):
        yield first_line, item
        for number, text in enumerate(lines, first_line + 1):
            if text.strip():
                yield number, _line(text)
        return
    # The first line is not a whole value: one object over several lines, or a bad first line.
    rest = list(lines)
    whole = _line(first + "".join(rest))
    if not (isinstance(whole, str) and whole.startswith("not JSON")):
        yield first_line, whole
        return
    yield first_line, item
    for number, text in enumerate(rest, first_line + 1):
        if text.strip():
            yield number, _line(text)


# ---------------------------------------------------------------------------- progress


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


# ---------------------------------------------------------------------------- commands


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from service.runtime.wiring import StartupRefused, serve

    try:
        if args.embedded or settings.llm.base_url is None:
            from service.devtools.embedded import run_embedded

            run_embedded(settings, embedded=args.embedded, data_dir=args.data_dir, broker=args.broker)
        else:
            serve(settings, llm_base_url=settings.llm.base_url)
    except StartupRefused as exc:
        print(f"agent-service: refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from service.devtools.demo import main as demo_main

    return int(demo_main(settings, args))


def _check_topic(producer: Producer, settings: Settings) -> None:
    k = settings.kafka
    topics = producer.list_topics(timeout=10).topics
    if k.input_topic not in topics:
        raise Unreachable(f"topic {k.input_topic} does not exist on {k.bootstrap_servers}; "
                          "`agent-service run` creates it")


def _flag_task(args: argparse.Namespace) -> TaskEvent | str:
    try:
        task_input = _DECODER.decode(args.task_input)
    except (ValueError, RecursionError) as exc:
        return f"--input is not JSON: {str(exc)[:200]}"
    return _event({"kind": args.kind, "input": task_input, "task_id": args.task_id})


def _produce(settings: Settings, args: argparse.Namespace) -> int:

    agents = default_agents()
    topic = settings.kafka.input_topic
    invalid = failed = sent = 0

    def delivered(key: str) -> Callable[[KafkaError | None, Any], None]:
        def done(err: KafkaError | None, _msg: Any) -> None:
            nonlocal failed
            if err is None:
                print(key)
            else:
                failed += 1
                print(f"{PROG}: task {key} not delivered: {err.str()}", file=sys.stderr)
        return done

    with contextlib.ExitStack() as stack:
        total: int | None = None
        items: Iterable[tuple[int, TaskEvent | str]]
        if args.kind is not None:
            items = [(1, _flag_task(args))]
        elif args.file in (None, "-"):
            items = read_tasks(sys.stdin)
        else:
            path = Path(args.file)
            try:
                items = read_tasks(stack.enter_context(path.open(encoding="utf-8")))
            except OSError as exc:
                print(f"{PROG}: cannot read {path}: {exc.strerror}", file=sys.stderr)
                return 1
            total = _count_lines(path)
        conf = {**settings.kafka.producer_config(), "message.timeout.ms": 30_000,
                "logger": logging.getLogger(KAFKA_LOGGER)}
        producer = Producer(conf)
        _check_topic(producer, settings)
        progress = Progress(sys.stderr, total)
        number = 0
        try:
            for number, item in items:
                progress.update(number)
                if isinstance(item, str):
                    invalid += 1
                    print(f"line {number}: {item}", file=sys.stderr)
                    continue
                try:
                    key, value = prepare_task(item, agents, settings.max_task_bytes)
                except PoisonError as exc:
                    invalid += 1
                    print(f"line {number}: {exc}", file=sys.stderr)
                    continue
                _send(producer, topic, key, value, delivered(key))
                sent += 1
        except UnicodeDecodeError as exc:
            invalid += 1
            print(f"{PROG}: input is not UTF-8 ({exc.reason}); stopped reading", file=sys.stderr)
        remaining = producer.flush(60)
        progress.close(number)
    if remaining or failed:
        print(f"{PROG}: {remaining + failed} of {sent} tasks were not delivered", file=sys.stderr)
        return 2
    if invalid:
        print(f"{PROG}: {invalid} invalid tasks skipped, {sent} produced", file=sys.stderr)
        return 1
    return 0


def _send(producer: Producer, topic: str, key: str, value: bytes,
          on_delivery: Callable[[KafkaError | None, Any], None]) -> None:
    while True:
        try:
            producer.produce(topic, key=key.encode(), value=value, on_delivery=on_delivery)
            break
        except BufferError:
            producer.poll(0.1)
    producer.poll(0)


@contextlib.asynccontextmanager
async def _ledger(settings: Settings) -> AsyncIterator[Ledger]:
    from service.runtime.wiring import MIN_LEDGER_TTL_S, redis_client

    client = redis_client(settings)
    try:
        yield Ledger(client, keys=Keys(settings.redis.key_prefix), lease_ms=settings.ledger.lease_ms,
                     ttl_s=settings.ledger.result_ttl_s or MIN_LEDGER_TTL_S)
    finally:
        await client.aclose()


def _task_show(settings: Settings, args: argparse.Namespace) -> int:
    if not is_valid_task_key(args.task_id):
        print(f"{PROG}: invalid task id {args.task_id!r}", file=sys.stderr)
        return 1

    async def show() -> dict[str, Any] | None:
        async with _ledger(settings) as ledger:
            record = await ledger.get(args.task_id)
        return record.to_json() if record is not None else None

    data = asyncio.run(show())
    if data is None:
        print("unknown task", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


def _clip(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def _dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    letters = peek(settings.kafka, args.limit, args.partition)
    if args.json:
        print(json.dumps([d.model_dump(mode="json") for d in letters], indent=2, ensure_ascii=False))
        return 0
    if not letters:
        print(f"no dead letters on {settings.kafka.dlq_topic}")
        return 0
    rows = [
        [str(d.partition), str(d.offset), d.reason or "-", d.task_id or "-",
         "-" if d.attempts is None else str(d.attempts), _clip(d.error, 60) or "-"]
        for d in letters
    ]
    print(format_table(rows, ["PARTITION", "OFFSET", "REASON", "TASK_ID", "ATTEMPTS", "ERROR"]))
    return 0


def _dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> Any:
        async with _ledger(settings) as ledger:
            return await replay(settings.kafka, ledger, args.item, set(args.reason) if args.reason else None,
                                args.limit)

    report = asyncio.run(run())
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0
    print(f"replayed {report.replayed}, already succeeded {report.already_succeeded}, "
          f"not found {report.not_found}, failed {report.failed}")
    for item in report.items:
        extra = " (revived)" if item.revived else ""
        detail = f": {item.detail}" if item.detail else ""
        print(f"  {item.partition}:{item.offset} {item.decision} task_id={item.task_id or '-'}{extra}{detail}")
    return 0


# ---------------------------------------------------------------------------- entry point


def _unreachable(exc: BaseException, settings: Settings) -> str:
    if isinstance(exc, KafkaException):
        err = exc.args[0] if exc.args else None
        text = err.str() if isinstance(err, KafkaError) else str(exc)
        return f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {text}"
    if isinstance(exc, LedgerUnavailable | RedisError):
        return f"cannot reach Redis: {exc}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"{PROG}: invalid settings: {describe_validation(exc)}", file=sys.stderr)
        return 2
    level = settings.log_level
    if args.command == "demo" and "AGENT_LOG_LEVEL" not in os.environ:
        level = "WARNING"  # the demo prints its own story; AGENT_LOG_LEVEL=INFO shows every record
    configure_logging(level, settings.log_format, quiet_kafka=args.command != "run")
    handler: Handler = args.handler
    try:
        return handler(settings, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `agent-service dlq list | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (Unreachable, KafkaException, ProduceFailed, LedgerUnavailable, RedisError, EmbeddedError,
            ConnectionError) as exc:
        print(f"{PROG}: {_unreachable(exc, settings)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
