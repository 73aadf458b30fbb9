"""Task events read from one JSON object, a JSON array or JSON Lines, each with its line number."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from service.agents.tasks import TaskEvent, describe_validation


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_WHITESPACE = " \t\r\n"


def event(value: Any) -> TaskEvent | str:
    if not isinstance(value, dict):
        return f"task must be a JSON object, got {type(value).__name__}"
    try:
        return TaskEvent.model_validate(value)
    except ValidationError as exc:
        return describe_validation(exc)


def _line(text: str) -> TaskEvent | str:
    try:
        return event(DECODER.decode(text))
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {str(exc)[:200]}"


class _Lines:
    """The line of a position in a text, counted forward as the positions grow."""

    def __init__(self, text: str, first_line: int) -> None:
        self.text = text
        self.counted = 0
        self.line = first_line

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.counted, pos)
        self.counted = pos
        return self.line


def _skip(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not whitespace."""
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _array(text: str, first_line: int) -> Iterator[tuple[int, TaskEvent | str]]:
    """The elements of a JSON array, each with the line it starts on."""
    lines = _Lines(text, first_line)
    pos = _skip(text, text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        yield from _after_array(text, pos, lines)
        return
    while True:
        try:
            value, end = DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            yield lines.at(pos), f"not JSON: {str(exc)[:200]}"
            return
        yield lines.at(pos), event(value)
        pos = _skip(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            yield from _after_array(text, pos, lines)
        else:
            yield lines.at(pos), "expected ',' or ']' in the array"
        return


def _after_array(text: str, closing: int, lines: _Lines) -> Iterator[tuple[int, TaskEvent | str]]:
    """Nothing but whitespace may follow the array's closing bracket."""
    pos = _skip(text, closing + 1)
    if pos < len(text):
        yield lines.at(pos), "unexpected data after the array"


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
