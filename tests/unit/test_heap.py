"""``AGENT_GC_FREEZE`` and ``AGENT_GC_GEN0_THRESHOLD``: the cyclic garbage collector of a long-lived service."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from service.core.heap import settle
from service.core.settings import Settings


@pytest.fixture
def collector() -> Iterator[None]:
    """The collector as the test found it, restored after."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_the_start_made_and_collects_the_young_generation_less_often(collector: None) -> None:
    made_at_start = [{"n": i} for i in range(1000)]  # containers the collector tracks
    _, gen1, gen2 = gc.get_threshold()
    text = settle(freeze=True, gen0_threshold=50_000)
    assert gc.get_freeze_count() >= len(made_at_start)
    assert gc.get_threshold() == (50_000, gen1, gen2)
    assert "gen0 50000" in text and "froze" in text


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_settle_collects_the_garbage_of_the_start_before_it_freezes(collector: None) -> None:
    node = _Node()
    gone = weakref.ref(node)
    del node  # unreachable: frozen, it would stay for the life of the process
    settle(freeze=True, gen0_threshold=0)
    assert gone() is None


def test_settle_off_leaves_the_collector_as_python_set_it(collector: None) -> None:
    threshold = gc.get_threshold()
    found = gc.get_freeze_count()
    text = settle(freeze=False, gen0_threshold=0)
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == found
    assert "as Python sets it" in text


def test_the_settings_default_to_a_frozen_start_and_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.gc_freeze is True and s.gc_gen0_threshold == 50_000
    monkeypatch.setenv("AGENT_GC_FREEZE", "false")
    monkeypatch.setenv("AGENT_GC_GEN0_THRESHOLD", "0")
    s = Settings()
    assert s.gc_freeze is False and s.gc_gen0_threshold == 0
    monkeypatch.setenv("AGENT_GC_GEN0_THRESHOLD", "-1")
    with pytest.raises(ValidationError):
        Settings()
