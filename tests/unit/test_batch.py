"""The script batcher's failure handling, with a client that fails the way a client library can."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError

from dedup.batch import ScriptBatcher


class BrokenClient:
    """Raises from inside the library, as redis-py's cluster client does while a node goes away."""

    async def execute_command(self, *args: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    def pipeline(self, transaction: bool = False) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")


class Script:
    sha = "0" * 40


@pytest.mark.parametrize("calls", [1, 5])
def test_a_failure_inside_the_client_library_is_an_outage_for_every_caller(calls: int) -> None:
    async def scenario() -> list[BaseException | Any]:
        batcher = ScriptBatcher(BrokenClient())  # type: ignore[arg-type]
        runs = [batcher.run(Script(), [f"k{i}"], [1]) for i in range(calls)]  # type: ignore[arg-type]
        return await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 5)

    outcomes = asyncio.run(scenario())
    assert len(outcomes) == calls
    assert all(isinstance(o, ConnectionError) and "AttributeError" in str(o) for o in outcomes), outcomes


def _raising_inside(module: str) -> Any:
    namespace: dict[str, Any] = {"__name__": module}
    exec("async def hgetall(*args, **kwargs):\n    raise AttributeError('writelines')\n", namespace)  # noqa: S102
    return namespace["hgetall"]


@pytest.mark.parametrize(("module", "outage"), [("redis.asyncio.connection", True), ("service.pipeline.processor", False)])
def test_the_ledger_calls_a_failure_inside_redis_an_outage_and_leaves_others_alone(module: str, outage: bool) -> None:
    from dedup.ledger import Ledger, LedgerUnavailable

    class Client:
        hgetall = staticmethod(_raising_inside(module))

        def register_script(self, source: str) -> Script:
            return Script()

    ledger = Ledger(Client())  # type: ignore[arg-type]
    expected: type[Exception] = LedgerUnavailable if outage else AttributeError
    with pytest.raises(expected):
        asyncio.run(ledger.steps("task-1"))
