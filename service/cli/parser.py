"""The command line's grammar: commands, their arguments, and the handler each one calls."""

from __future__ import annotations

import argparse
import getpass
import socket
from pathlib import Path

from service.cli.admin import dlq_list, dlq_replay, task_compensate, task_decide, task_parked, task_show
from service.cli.base import PROG
from service.cli.kinds import kinds_command
from service.cli.produce import produce_tasks
from service.cli.schedules import schedule_list, schedule_show
from service.cli.serve import demo_command, run_command
from service.cli.sessions import session_delete, session_list, session_show
from service.cli.trying import try_command
from service.core.metrics import DLQ_REASONS
from service.core.settings import EMBEDDED_BROKERS


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


def default_actor() -> str:
    """Who an operator's decision is recorded as, unless ``--by`` says: ``$USER@host``."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


# the subcommands' action: argparse names no public type for it
Commands = argparse._SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Runs LLM agents on Kafka task events.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_produce(sub)
    kinds = sub.add_parser("kinds", help="list the kinds this service runs: source, steps, versions, input schema")
    kinds.add_argument("--json", action="store_true", help="print JSON instead of text")
    kinds.set_defaults(handler=kinds_command)
    _add_task(sub)
    _add_dlq(sub)
    _add_session(sub)
    _add_schedule(sub)
    _add_demo(sub)
    _add_try(sub)
    return parser


def _add_run(sub: Commands[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="consume tasks and serve the HTTP API until signalled")
    run.add_argument("--embedded", action="store_true", help="start a local broker and redis-server")
    run.add_argument("--broker", choices=EMBEDDED_BROKERS, default="noida", help="embedded broker (default: noida)")
    run.add_argument("--data-dir", type=Path, help="where embedded servers keep their data")
    run.add_argument("--workers", type=positive_int, default=1, metavar="N",
                     help="consumer processes in the group, supervised by this one (default 1: this process)")
    run.set_defaults(handler=run_command)


def _add_produce(sub: Commands[argparse.ArgumentParser]) -> None:
    produce = sub.add_parser("produce", help="produce task events from JSON, JSON Lines or flags")
    produce.add_argument("file", nargs="?", metavar="FILE", help="JSON or JSON Lines file; - or nothing: stdin")
    produce.add_argument("--kind", help="produce one task of this kind (with --input)")
    produce.add_argument("--input", dest="task_input", metavar="JSON", help="the task's input object")
    produce.add_argument("--task-id", help="the task's id (default: a digest of kind and input)")
    produce.set_defaults(handler=produce_tasks)


def _add_task(sub: Commands[argparse.ArgumentParser]) -> None:
    task = sub.add_parser("task", help="inspect the ledger; decide on parked tasks; compensate")
    task_sub = task.add_subparsers(dest="task_command", required=True, metavar="COMMAND")
    show = task_sub.add_parser("show", help="print a task's ledger record")
    show.add_argument("task_id", metavar="ID")
    show.set_defaults(handler=task_show)
    for command, decision, what in (("approve", "approved", "approve the tool call a parked task waits on"),
                                    ("reject", "rejected", "reject it: the task is dead-lettered as rejected"),
                                    ("landed", "landed", "say the call the task waits on did land (it is not "
                                                         "run again)"),
                                    ("absent", "absent", "say it did not land: it runs again, with the same key")):
        decide = task_sub.add_parser(command, help=what)
        decide.add_argument("task_id", metavar="ID")
        decide.add_argument("--reason", default="", help="recorded in the audit trail")
        decide.add_argument("--by", default=default_actor(), help="who decides (default: $USER@host)")
        if command == "landed":
            decide.add_argument("--result", metavar="JSON", help="what the call returned (the model sees it)")
        decide.set_defaults(handler=task_decide, decision=decision)
    undo = task_sub.add_parser("compensate", help="undo a task's tool calls in reverse order, each once")
    undo.add_argument("task_id", metavar="ID")
    undo.add_argument("--rerun", action="store_true", help="then run the task again as a new generation")
    undo.add_argument("--by", default=default_actor())
    undo.set_defaults(handler=task_compensate)
    parked = task_sub.add_parser("parked", help="list the tasks waiting for a person")
    parked.add_argument("--limit", type=positive_int, default=100)
    parked.set_defaults(handler=task_parked)


def _add_dlq(sub: Commands[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="inspect and replay dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    listing = dlq_sub.add_parser("list", help="show the newest dead letters")
    listing.add_argument("--limit", type=positive_int, default=50)
    listing.add_argument("--partition", type=int, help="only this partition")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=dlq_list)
    replay = dlq_sub.add_parser("replay", help="send dead letters back to the input topic")
    chosen = replay.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--reason", action="append", choices=DLQ_REASONS, help="replay dead letters with this reason")
    chosen.add_argument("--item", action="extend", nargs="+", type=coordinates, metavar="P:O",
                        help="replay the dead letter at partition P, offset O")
    replay.add_argument("--limit", type=positive_int, default=100)
    replay.add_argument("--json", action="store_true", help="print the report as JSON")
    replay.set_defaults(handler=dlq_replay)


def _add_session(sub: Commands[argparse.ArgumentParser]) -> None:
    session = sub.add_parser("session", help="the sessions: list them, show one with its turns, erase one")
    session_sub = session.add_subparsers(dest="session_command", required=True, metavar="COMMAND")
    listing = session_sub.add_parser("list", help="the most recently changed sessions, the last first")
    listing.add_argument("--limit", type=positive_int, default=100)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=session_list)
    show = session_sub.add_parser("show", help="one session: kind, version, state, summary, turns, holder, queue")
    show.add_argument("session_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(handler=session_show)
    delete = session_sub.add_parser("delete", help="erase a session: its state, turns, queue and listing")
    delete.add_argument("session_id", metavar="ID")
    delete.set_defaults(handler=session_delete)


def _add_schedule(sub: Commands[argparse.ArgumentParser]) -> None:
    schedule = sub.add_parser("schedule", help="the schedules: last and next slot, produced and skipped, lateness")
    schedule_sub = schedule.add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")
    listing = schedule_sub.add_parser("list", help="every schedule of the deployment, as a table")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=schedule_list)
    show = schedule_sub.add_parser("show", help="one schedule: its declaration and its state in the ledger")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(handler=schedule_show)


def _add_demo(sub: Commands[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="run the service end to end on local servers")
    demo.add_argument("--tasks", type=positive_int, default=8)
    demo.add_argument("--broker", choices=EMBEDDED_BROKERS, default="noida")
    demo.add_argument("--data-dir", type=Path)
    demo.add_argument("--fake-llm", action="store_true", help="answer with a fake model instead of the local one")
    demo.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                      help="how long to wait for every task to end before printing what there is")
    demo.set_defaults(handler=demo_command)


def _add_try(sub: Commands[argparse.ArgumentParser]) -> None:
    trial = sub.add_parser("try", help="run one task of a kind in-process (no Kafka, no Redis) and print each step")
    trial.add_argument("kind", metavar="KIND")
    trial.add_argument("--input", dest="task_input", required=True, metavar="JSON", help="the task's input")
    trial.add_argument("--model", default="fake", metavar="fake|local|URL",
                       help="the fake model (default), the local one, or an OpenAI-compatible base URL")
    trial.add_argument("--kinds", type=Path, metavar="FILE", help="a kinds file (TOML or YAML) to load as well")
    trial.set_defaults(handler=try_command)


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
