"""Replicas of the primary's model and the prompt cache key switch, as AGENT_LLM__* variables."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from service.core.settings import Settings, to_env


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AGENT_"):
            monkeypatch.delenv(name)


def test_no_replica_and_the_key_sent_by_default() -> None:
    s = Settings()
    assert s.llm.replicas == [] and s.llm.prompt_cache_key is True


def test_replicas_are_named_by_position_and_a_spawned_worker_gets_them_with_their_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_LLM__REPLICAS", json.dumps([
        {"base_url": "http://r1/v1", "api_key": "sk-r1"},
        {"base_url": "http://r2/v1", "name": "east", "prompt_cache_key": False, "rpm": 60},
    ]))
    monkeypatch.setenv("AGENT_LLM__PROMPT_CACHE_KEY", "false")
    s = Settings()
    first, second = s.llm.replicas
    assert (first.name, first.prompt_cache_key, second.name, second.prompt_cache_key, second.rpm) == (
        "replica-1", True, "east", False, 60)
    assert "sk-r1" not in repr(s) and not s.llm.prompt_cache_key
    for key, value in to_env(s).items():
        monkeypatch.setenv(key, value)
    again = Settings().llm
    assert [(r.name, r.base_url, r.api_key.get_secret_value()) for r in again.replicas] == [
        ("replica-1", "http://r1/v1", "sk-r1"), ("east", "http://r2/v1", "not-needed")]
    assert not again.prompt_cache_key


@pytest.mark.parametrize("value", [
    '[{"api_key": "k"}]',  # no URL
    '[{"base_url": "http://r/v1", "model": "other"}]',  # a replica serves the primary's model
    '[{"base_url": "http://a/v1", "name": "primary"}]',
    '[{"base_url": "http://a/v1", "name": "x"}, {"base_url": "http://b/v1", "name": "x"}]',
])
def test_a_malformed_replica_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AGENT_LLM__REPLICAS", value)
    with pytest.raises(ValidationError):
        Settings()


def test_a_replica_and_a_fallback_may_not_share_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_LLM__FALLBACKS", json.dumps([{"base_url": "http://f/v1", "model": "m", "name": "b"}]))
    monkeypatch.setenv("AGENT_LLM__REPLICAS", json.dumps([{"base_url": "http://r/v1", "name": "b"}]))
    with pytest.raises(ValidationError):
        Settings()
