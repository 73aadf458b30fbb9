"""The command line without servers: argument parsing, the task reader of ``produce``, progress."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.agents.tasks import TaskEvent
from service.cli.main import main
from service.cli.parser import parse_args
from service.cli.produce import Progress
from service.cli.reading import read_tasks
from service.core.log_context import json_formatter


def lines_of(text: str) -> list[tuple[int, TaskEvent | str]]:
    return list(read_tasks(io.StringIO(text)))


def task(task_id: str | None = None, text: str = "hello") -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "classify", "input": {"text": text, "labels": ["a", "b"]}}
    if task_id is not None:
        body["task_id"] = task_id
    return body


# ---------------------------------------------------------------------------- arguments


def test_run_defaults_and_flags() -> None:
    args = parse_args(["run"])
    assert (args.embedded, args.broker, args.data_dir) == (False, "noida", None)
    args = parse_args(["run", "--embedded", "--broker", "tansu", "--data-dir", "/tmp/x"])
    assert (args.embedded, args.broker, args.data_dir) == (True, "tansu", Path("/tmp/x"))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["run", "--broker", "kafka"],
        ["produce", "--input", "{}"],
        ["produce", "--task-id", "t-1"],
        ["produce", "--kind", "classify"],
        ["produce", "tasks.jsonl", "--kind", "classify", "--input", "{}"],
        ["task"],
        ["task", "show"],
        ["dlq", "list", "--limit", "0"],
        ["dlq", "list", "--limit", "many"],
        ["dlq", "replay"],
        ["dlq", "replay", "--reason", "exhausted", "--item", "0:1"],
        ["dlq", "replay", "--reason", "nonsense"],
        ["dlq", "replay", "--item", "0"],
        ["dlq", "replay", "--item", "a:1"],
        ["dlq", "replay", "--item", "-1:5"],
        ["demo", "--tasks", "0"],
        ["demo", "--broker", "redpanda"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: agent-service" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "produce", "task", "dlq", "demo"):
        assert command in out


def test_produce_arguments() -> None:
    args = parse_args(["produce"])
    assert args.file is None and args.kind is None
    assert parse_args(["produce", "-"]).file == "-"
    assert parse_args(["produce", "tasks.jsonl"]).file == "tasks.jsonl"
    args = parse_args(["produce", "--kind", "classify", "--input", '{"text": "x"}', "--task-id", "t-1"])
    assert (args.kind, args.task_input, args.task_id) == ("classify", '{"text": "x"}', "t-1")


def test_task_show_and_dlq_arguments() -> None:
    assert parse_args(["task", "show", "order-1"]).task_id == "order-1"
    args = parse_args(["dlq", "list"])
    assert (args.limit, args.json, args.partition) == (50, False, None)
    args = parse_args(["dlq", "list", "--limit", "7", "--json", "--partition", "2"])
    assert (args.limit, args.json, args.partition) == (7, True, 2)
    args = parse_args(["dlq", "replay", "--item", "0:5", "1:7", "--item", "2:3"])
    assert args.item == [(0, 5), (1, 7), (2, 3)] and args.reason is None and args.limit == 100
    args = parse_args(["dlq", "replay", "--reason", "exhausted", "--reason", "expired", "--limit", "5"])
    assert args.reason == ["exhausted", "expired"] and args.item is None and args.limit == 5


def test_demo_arguments() -> None:
    args = parse_args(["demo"])
    assert (args.tasks, args.broker, args.data_dir, args.fake_llm) == (8, "noida", None, False)
    args = parse_args(["demo", "--tasks", "3", "--broker", "tansu", "--data-dir", "d", "--fake-llm"])
    assert (args.tasks, args.broker, args.data_dir, args.fake_llm) == (3, "tansu", Path("d"), True)


def test_task_show_refuses_an_invalid_id_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "show", "a b{c}"]) == 1
    assert "invalid task id" in capsys.readouterr().err


def test_invalid_settings_are_one_line_without_the_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENT_MAX_TASK_BYTES", "secret-looking-value")
    assert main(["task", "show", "t-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_task_bytes" in err and "secret-looking-value" not in err


# ---------------------------------------------------------------------------- the task reader


def test_json_lines_with_line_numbers_and_bad_lines() -> None:
    text = "\n".join([
        json.dumps(task("t-1")),
        "",
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"kind": "classify"}),
        "   ",
        json.dumps(task("t-2")),
        '{"kind": "classify", "input": {"v": NaN}}',
    ]) + "\n"
    items = lines_of(text)
    assert [n for n, _ in items] == [1, 3, 4, 5, 7, 8]
    ok = {n: e.task_id for n, e in items if isinstance(e, TaskEvent)}
    assert ok == {1: "t-1", 7: "t-2"}
    errors = {n: e for n, e in items if isinstance(e, str)}
    assert errors[3].startswith("not JSON")
    assert "JSON object" in errors[4]
    assert "input" in errors[5]
    assert "NaN" in errors[8]


def test_json_lines_whose_first_line_is_bad() -> None:
    items = lines_of("oops\n" + json.dumps(task("t-1")) + "\n")
    assert items[0][0] == 1 and isinstance(items[0][1], str)
    assert items[1][0] == 2 and isinstance(items[1][1], TaskEvent)


def test_one_object_over_several_lines() -> None:
    items = lines_of("\n\n" + json.dumps(task("t-1"), indent=2) + "\n")
    assert len(items) == 1
    number, event = items[0]
    assert number == 3 and isinstance(event, TaskEvent) and event.task_id == "t-1"


def test_array_elements_carry_the_line_they_start_on() -> None:
    text = "[\n" + ",\n".join(json.dumps(t, indent=2) for t in [task("t-1"), task("t-2")]) + ',\n  "text"\n]\n'
    items = lines_of(text)
    assert [n for n, _ in items] == [2, 13, 24]
    assert [e.task_id for _, e in items[:2] if isinstance(e, TaskEvent)] == ["t-1", "t-2"]
    assert isinstance(items[2][1], str) and "JSON object" in items[2][1]


def test_array_on_one_line_and_empty_array() -> None:
    items = lines_of(json.dumps([task("t-1"), task("t-2")]))
    assert [(n, isinstance(e, TaskEvent)) for n, e in items] == [(1, True), (1, True)]
    assert lines_of("[]\n") == []
    assert lines_of("  [ ]  ") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"kind": "classify", "input": {}}\n', "expected ','"),
        ('[{"kind": "classify", "input": {}} {"kind": "x"}]', "expected ','"),
        ('[{"kind": "classify", "input": {}}]\nmore', "after the array"),
        ("[]\n[]", "after the array"),
        ("[\n{broken\n]", "not JSON"),
    ],
)
def test_broken_arrays_report_where(text: str, message: str) -> None:
    items = lines_of(text)
    assert items and isinstance(items[-1][1], str) and message in items[-1][1]


def test_empty_input_yields_nothing() -> None:
    assert lines_of("") == []
    assert lines_of("\n  \n\t\n") == []


def test_reader_streams_json_lines() -> None:
    def endless() -> Any:
        n = 0
        while True:
            n += 1
            yield json.dumps(task(f"t-{n}")) + "\n"

    reader = read_tasks(endless())
    first = [next(reader) for _ in range(3)]
    assert [n for n, _ in first] == [1, 2, 3]


task_ids = st.from_regex(r"[A-Za-z0-9._:@/+=-]{1,40}", fullmatch=True)
texts = st.text(min_size=1, max_size=40)


@given(st.lists(st.tuples(st.none() | task_ids, texts), max_size=20), st.booleans())
def test_any_events_round_trip_as_lines_or_array(rows: list[tuple[str | None, str]], as_array: bool) -> None:
    bodies = [task(tid, text) for tid, text in rows]
    text = json.dumps(bodies, indent=1) if as_array else "".join(json.dumps(b) + "\n" for b in bodies)
    items = lines_of(text)
    events = [e for _, e in items]
    assert all(isinstance(e, TaskEvent) for e in events)
    assert [e.model_dump(mode="json", exclude_defaults=True) for e in events if isinstance(e, TaskEvent)] == bodies
    if not as_array:
        assert [n for n, _ in items] == list(range(1, len(bodies) + 1))


# ---------------------------------------------------------------------------- progress and logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_past_the_threshold() -> None:
    quiet = io.StringIO()
    p = Progress(quiet, 5000, after=10)
    p.update(100, force=True)
    p.close(100)
    assert quiet.getvalue() == ""

    tty = Terminal()
    p = Progress(tty, 2000, after=1000, interval_s=0)
    p.update(999)
    assert tty.getvalue() == ""
    p.update(1500)
    p.close(2000)
    out = tty.getvalue()
    assert "line 1500/2000" in out and "line 2000/2000 100%" in out and out.endswith("\n")


def test_progress_without_a_total_counts() -> None:
    assert Progress(Terminal(), None).render(1234) == "\rline 1234"
    bar = Progress(Terminal(), 100, width=10).render(50)
    assert bar == "\r[#####.....] line 50/100  50%"


def test_json_log_lines() -> None:
    record = logging.LogRecord("service.x", logging.WARNING, __file__, 1, "task_id=%s failed", ("t-1",), None)
    data = json.loads(json_formatter().format(record))
    assert data["level"] == "WARNING" and data["logger"] == "service.x" and data["msg"] == "task_id=t-1 failed"
    assert data["ts"].endswith("+00:00")
