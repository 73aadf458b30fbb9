"""The batch lane's choices: which tasks it takes, how its calls are named and grouped, how long a
call may wait for its batch, and which decisions give the step an answer."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from service.agents.registry import default_agents
from service.agents.tasks import decode_task
from service.core.batch_settings import BatchSettings
from service.core.settings import Settings
from service.llm.batch_api import request_line
from service.pipeline.batch_lane import answer_of, custom_id, group_name, wait_until, wants_batch

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def task(**fields: Any) -> Any:
    value = {"task_id": "t-1", "kind": "classify", "input": {"text": "x", "labels": ["a", "b"]}, **fields}
    return decode_task(json.dumps(value).encode(), [], 1 << 20)


def test_a_batch_kind_goes_through_the_lane_unless_the_task_is_interactive() -> None:
    plain = default_agents().get("classify")
    batch_kind = dataclasses.replace(plain, batch=True)
    on = BatchSettings()
    assert wants_batch(on, batch_kind, task())
    assert wants_batch(on, batch_kind, task(priority="batch"))
    assert not wants_batch(on, batch_kind, task(priority="interactive"))
    assert not wants_batch(on, plain, task()), "a kind that did not ask for the lane stays online"
    assert not wants_batch(BatchSettings(enabled=False), batch_kind, task())


def test_a_task_saying_priority_batch_goes_through_the_lane_only_where_the_deployment_allows_it() -> None:
    plain = default_agents().get("classify")
    assert not wants_batch(BatchSettings(), plain, task(priority="batch"))
    allowed = BatchSettings(priority=True)
    assert wants_batch(allowed, plain, task(priority="batch"))
    assert not wants_batch(allowed, plain, task()), "the default priority is not a request for the lane"


def test_a_call_waits_its_share_of_the_deadline_or_the_longest_wait() -> None:
    settings = BatchSettings(deadline_share=0.5, max_wait_s=3600)
    assert wait_until(settings, NOW, NOW + timedelta(minutes=40)) == NOW + timedelta(minutes=20)
    assert wait_until(settings, NOW, NOW + timedelta(days=2)) == NOW + timedelta(hours=1)
    assert wait_until(settings, NOW, None) == NOW + timedelta(hours=1)
    assert wait_until(settings, NOW, NOW - timedelta(seconds=1)) == NOW, "past its deadline: no time to wait"


def test_names_are_the_work_not_the_attempt() -> None:
    assert custom_id("t-1", "answer") == custom_id("t-1", "answer")
    assert custom_id("t-1", "answer") != custom_id("t-2", "answer") != custom_id("t-1", "check")
    assert custom_id("p/gather/0", "answer") != custom_id("p/gather", "0/answer")
    assert len(custom_id("t" * 200, "s" * 200)) <= 64
    assert group_name("primary", "gpt-x") != group_name("primary", "gpt-y")
    line = json.loads(request_line("call-1", "/v1/chat/completions", {"model": "m"}))
    assert line == {"custom_id": "call-1", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m"}}


def test_only_a_completed_line_answered_200_gives_the_step_an_answer() -> None:
    body = {"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}]}
    assert answer_of({"decision": "batch_done", "result": {"status": 200, "body": body}}) == body
    assert answer_of({"decision": "batch_done", "result": {"status": 500, "body": body}}) is None
    assert answer_of({"decision": "batch_done", "result": None}) is None
    assert answer_of({"decision": "batch_failed"}) is None
    assert answer_of({"decision": "expired"}) is None


def test_the_lane_is_configured_from_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("AGENT_BATCH__PRIORITY", "true")
    monkeypatch.setenv("AGENT_BATCH__MAX_SIZE", "7")
    settings = Settings().batch
    assert settings.priority and settings.max_size == 7 and settings.enabled


def test_a_batch_kind_tried_in_process_answers_online() -> None:
    from service.sdk.testing import ScriptedModel, run

    kind = dataclasses.replace(default_agents().get("classify"), batch=True)
    outcome = run(kind, {"text": "x", "labels": ["a", "b"]}, model=ScriptedModel([{"label": "a", "confidence": 0.9}]))
    assert outcome.ok, outcome.error
    assert outcome.result == {"label": "a", "confidence": 0.9}
