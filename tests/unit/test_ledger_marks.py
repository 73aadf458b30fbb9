"""The published marks of one turn go as one script, each caller with its own answer or the failure."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dedup.errors import LedgerUnavailable
from dedup.marks import Marks

ONE, MANY = object(), object()  # stand-ins for the registered scripts: only passed through


class Runs:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Any, list[str], list[Any]]] = []
        self.fail = fail

    async def __call__(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        self.calls.append((script, keys, args))
        if self.fail:
            raise LedgerUnavailable("redis: gone")
        if script is ONE:
            return 1 if args[0] == "succeeded" else 0
        return [1 if state == "succeeded" else 0 for state in args[1::3]]


def marks(runs: Runs, grouped: bool = True) -> Marks:
    return Marks(runs, ONE, MANY, "succeeded dead", grouped=grouped)  # type: ignore[arg-type]


async def three(m: Marks) -> list[Any]:
    return await asyncio.gather(m.mark("k1", "succeeded", "t[0]@1", "acked"), m.mark("k2", "running", "t[0]@2", ""),
                                m.mark("k3", "succeeded", "t[0]@3", "staged"), return_exceptions=True)


def test_the_marks_of_one_turn_go_as_one_script_in_their_order() -> None:
    runs = Runs()
    assert asyncio.run(three(marks(runs))) == [True, False, True]
    assert runs.calls == [(MANY, ["k1", "k2", "k3"], ["succeeded dead", "succeeded", "t[0]@1", "acked", "running",
                                                       "t[0]@2", "", "succeeded", "t[0]@3", "staged"])]


def test_a_lone_mark_and_every_mark_on_a_cluster_go_as_the_one_task_script() -> None:
    runs = Runs()
    assert asyncio.run(marks(runs).mark("k1", "succeeded", "t[0]@1", "acked")) is True
    assert asyncio.run(three(marks(runs, grouped=False))) == [True, False, True]
    assert [c[0] for c in runs.calls] == [ONE] * 4
    assert runs.calls[0] == (ONE, ["k1"], ["succeeded", "t[0]@1", "acked", "succeeded dead"])


def test_a_failed_script_fails_every_mark_it_carried() -> None:
    outcomes = asyncio.run(three(marks(Runs(fail=True))))
    assert [type(o) for o in outcomes] == [LedgerUnavailable] * 3


def test_a_mark_cancelled_in_its_turn_leaves_the_others_answered() -> None:
    async def main() -> list[Any]:
        m = marks(Runs())
        first = asyncio.ensure_future(m.mark("k1", "succeeded", "t[0]@1", "acked"))
        second = asyncio.ensure_future(m.mark("k2", "succeeded", "t[0]@2", "acked"))
        await asyncio.sleep(0)
        first.cancel()
        return await asyncio.gather(first, second, return_exceptions=True)

    first, second = asyncio.run(main())
    assert isinstance(first, asyncio.CancelledError) and second is True


@pytest.mark.parametrize("grouped", [True, False])
def test_marks_of_later_turns_go_in_scripts_of_their_own(grouped: bool) -> None:
    async def main(m: Marks) -> list[bool]:
        return [await m.mark(f"k{i}", "succeeded", f"t[0]@{i}", "acked") for i in range(3)]

    runs = Runs()
    assert asyncio.run(main(marks(runs, grouped))) == [True] * 3
    assert len(runs.calls) == 3
