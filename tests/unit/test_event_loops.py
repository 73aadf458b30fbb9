"""``AGENT_EVENT_LOOP``: the service's event loop, uvloop's when installed (``auto``, the default), or
asyncio's own or uvloop's by name."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from pydantic import ValidationError

from service.core import loops
from service.core.loops import loop_kind, resolve, run_loop
from service.core.settings import Settings


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_uvloop_runs_the_service_coroutine_on_a_uvloop_loop() -> None:
    assert run_loop(_loop_type(), "uvloop") is uvloop.Loop


def test_asyncio_runs_it_on_asyncio_own_loop() -> None:
    loop_type = run_loop(_loop_type(), "asyncio")
    assert loop_type is not uvloop.Loop
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_the_setting_defaults_to_auto_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().event_loop == "auto"
    monkeypatch.setenv("AGENT_EVENT_LOOP", "asyncio")
    assert Settings().event_loop == "asyncio"
    monkeypatch.setenv("AGENT_EVENT_LOOP", "uvloop")
    assert Settings().event_loop == "uvloop"
    monkeypatch.setenv("AGENT_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError):
        Settings()


async def _kind() -> str:
    return loop_kind()


def test_loop_kind_names_the_running_loop() -> None:
    assert run_loop(_kind(), "uvloop") == "uvloop"
    assert run_loop(_kind(), "asyncio") == "asyncio"


def test_auto_runs_on_uvloop_when_it_is_installed() -> None:
    assert resolve("auto") == "uvloop"
    assert run_loop(_kind(), "auto") == "uvloop"


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops.importlib.util, "find_spec", lambda name: None)  # as if uvloop were not installed
    assert resolve("auto") == "asyncio"
    assert run_loop(_kind(), "auto") == "asyncio"
    assert resolve("uvloop") == "uvloop"  # named, it is never replaced
