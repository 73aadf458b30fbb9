"""The ``agent-service`` command: run the service, produce tasks, inspect the ledger and dead letters.

Settings come from ``AGENT_*`` environment variables and are read here, once; logging is
configured here too. An unreachable Redis or broker ends a command with one line on stderr and
exit code 2, except ``run``: it waits for them, unready (see :mod:`service.runtime.liveness`), and
exits 2 only for a configuration it refuses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError
from redis.exceptions import RedisError

from consumers.producers import ProduceFailed
from dedup.ledger import LedgerUnavailable
from service.agents.tasks import describe_validation
from service.cli.base import PROG, Handler, Unreachable
from service.cli.parser import parse_args
from service.core.errors import EmbeddedError
from service.core.log_context import TaskFields, json_formatter
from service.core.settings import Settings
from service.core.settings_sources import SettingsRefused
from service.pipeline.dlq import KAFKA_LOGGER

log = logging.getLogger(__name__)


def configure_logging(level: str, fmt: str, *, quiet_kafka: bool = False) -> None:
    """Log lines to stderr, as text or JSON (with the fields of :mod:`service.core.log_context`). ``quiet_kafka`` hides librdkafka's connection chatter
    (below DEBUG): a short command reports an unreachable broker in one line of its own."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            json_formatter() if fmt == "json"
            else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
        handler.addFilter(TaskFields())  # the task's fields and its trace on each line handling it
        root.addHandler(handler)
    root.setLevel(logging.getLevelNamesMapping().get(level.upper(), logging.INFO))
    if quiet_kafka and root.level > logging.DEBUG:
        logging.getLogger(KAFKA_LOGGER).setLevel(logging.CRITICAL)


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
    except SettingsRefused as exc:  # an unknown AGENT_* name, or a file of settings that cannot be read
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    level = settings.log_level
    if args.command in ("demo", "try") and "AGENT_LOG_LEVEL" not in os.environ:
        level = "WARNING"  # the demo and try print their own story; AGENT_LOG_LEVEL=INFO shows every record
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
