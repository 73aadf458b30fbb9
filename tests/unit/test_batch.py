"""The script batcher's failure handling, with a client that fails the way a client library can."""

from __future__ import annotations

import asyncio
import enum
from typing import Any

import msgpack
import pytest
from redis._parsers.encoders import Encoder
from redis.exceptions import ConnectionError, NoScriptError

from dedup.batch import Packer, ScriptBatcher


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


class _ForgettingPipeline:
    """Answers NOSCRIPT to every command, as Redis does after a restart or ``SCRIPT FLUSH``."""

    def __init__(self) -> None:
        self.commands = 0

    async def __aenter__(self) -> _ForgettingPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def execute_command(self, *args: Any) -> None:
        self.commands += 1

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return [NoScriptError("NOSCRIPT") for _ in range(self.commands)]


class ForgettingClient:
    def pipeline(self, transaction: bool = False) -> _ForgettingPipeline:
        return _ForgettingPipeline()


class StuckLoad:
    """A script whose load (after NOSCRIPT) never ends, until cancelled."""

    sha = "1" * 40

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        await asyncio.Event().wait()


def test_a_batch_cancelled_while_it_loads_a_script_leaves_no_caller_waiting() -> None:
    async def scenario() -> list[BaseException | Any]:
        batcher = ScriptBatcher(ForgettingClient())  # type: ignore[arg-type]
        runs = [asyncio.ensure_future(batcher.run(StuckLoad(), [f"k{i}"], [1])) for i in range(3)]  # type: ignore[arg-type]
        while not batcher._flushes:
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)  # the batch now waits on the first call's load
        for flush in list(batcher._flushes):
            flush.cancel()
        return await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 5)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, ConnectionError) for o in outcomes), outcomes


class Color(enum.IntEnum):
    RED = 1


class Name(enum.StrEnum):
    ADA = "ada"


@pytest.mark.parametrize("value", ["é€", "", b"\xff\x00", 0, -(2**70), 1e16, 0.1, memoryview(b"mv"), Color.RED,
                                   Name.ADA, True, None, bytearray(b"x"), object(), "lone \udc80"])
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_grouped_argument_is_what_redis_py_would_send_or_fails_as_it_would(value: Any, encoding: str) -> None:
    encoder = Encoder(encoding, "strict", False)  # type: ignore[no-untyped-call]
    try:
        expected: Any = bytes(encoder.encode(value))
    except Exception as exc:  # noqa: BLE001 - the packer must fail the same way
        with pytest.raises(type(exc)):
            Packer(encoder).call(0, [value])
        return
    packer = Packer(encoder)
    group = msgpack.unpackb(packer.group([packer.call(2, [value]), packer.call(0, ["x"])]), raw=True)
    assert group == [[2, expected], [0, b"x"]]
