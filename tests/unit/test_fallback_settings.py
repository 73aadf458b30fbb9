"""Fallback endpoints and the service-wide unavailable policy, as AGENT_LLM__* variables."""

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


def test_no_fallback_and_wait_by_default() -> None:
    s = Settings()
    assert s.llm.fallbacks == [] and s.llm.unavailable == "wait"


def test_fallbacks_are_a_json_list_named_by_position(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_LLM__FALLBACKS", json.dumps([
        {"base_url": "https://backup.example/v1", "api_key": "sk-backup", "model": "small", "rpm": 60},
        {"base_url": "http://10.0.0.9:8080/v1", "model": "tiny", "timeout_s": 5, "name": "onprem"},
        {"base_url": "http://10.0.0.10/v1", "model": "tiny2", "tpm": 1000},
    ]))
    monkeypatch.setenv("AGENT_LLM__UNAVAILABLE", "fallback")
    s = Settings()
    first, second, third = s.llm.fallbacks
    assert (first.name, first.base_url, first.model, first.rpm, first.tpm, first.timeout_s) == (
        "fallback-1", "https://backup.example/v1", "small", 60, 0, None)
    assert first.api_key.get_secret_value() == "sk-backup" and "sk-backup" not in repr(s)
    assert (second.name, second.timeout_s, second.api_key.get_secret_value()) == ("onprem", 5.0, "not-needed")
    assert (third.name, third.tpm) == ("fallback-3", 1000)
    assert s.llm.unavailable == "fallback"


def test_a_spawned_worker_gets_the_same_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_LLM__FALLBACKS", json.dumps([{"base_url": "http://b/v1", "api_key": "k2", "model": "m"}]))
    env = to_env(Settings())
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    [again] = Settings().llm.fallbacks
    assert (again.name, again.base_url, again.model, again.api_key.get_secret_value()) == (
        "fallback-1", "http://b/v1", "m", "k2")


@pytest.mark.parametrize("value", [
    '[{"base_url": "http://b/v1"}]',  # no model
    '[{"model": "m"}]',  # no URL
    '[{"base_url": "http://b/v1", "model": "m", "modle": "x"}]',  # a typo is not ignored
    '[{"base_url": "http://b/v1", "model": "m", "rpm": -1}]',
    '[{"base_url": "http://b/v1", "model": "m", "name": "Has Space"}]',
    '[{"base_url": "http://a/v1", "model": "m", "name": "x"}, {"base_url": "http://b/v1", "model": "m", "name": "x"}]',
    '[{"base_url": "http://a/v1", "model": "m", "name": "primary"}]',
])
def test_a_malformed_fallback_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AGENT_LLM__FALLBACKS", value)
    with pytest.raises(ValidationError):
        Settings()


def test_an_unknown_policy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_LLM__UNAVAILABLE", "retry")
    with pytest.raises(ValidationError):
        Settings()
