"""The client's side of prompt caching: the body's stable parts first, the prompt cache key sent
where the endpoint takes it, and the cached prompt tokens read from the usage and counted."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from service.core.metrics import Metrics
from tests.unit.test_llm_client import call, capture, completion, make_request

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def sent_body(**settings: Any) -> tuple[str, dict[str, Any]]:
    seen, handler = capture()
    call(handler, make_request(cache_key="classify:label@v1", tools=(TOOL,), tool_choice="auto"), **settings)
    (request,) = seen
    return request.body.decode(), request.json()


def test_the_body_puts_tools_and_schema_before_the_messages_and_per_call_values_last() -> None:
    text, body = sent_body(response_format="json_schema")
    order = [text.index(f'"{field}"') for field in
             ("model", "tools", "response_format", "messages", "temperature", "max_tokens", "prompt_cache_key")]
    assert order == sorted(order), text
    assert list(body) == ["model", "tools", "tool_choice", "response_format", "messages", "temperature",
                          "max_tokens", "prompt_cache_key"]
    assert body["prompt_cache_key"] == "classify:label@v1"
    assert body["messages"][-1]["role"] == "user"  # the task's own text last, as the step wrote it


def test_no_prompt_cache_key_where_the_endpoint_refuses_unknown_fields_or_none_is_given() -> None:
    _, body = sent_body(prompt_cache_key=False)
    assert "prompt_cache_key" not in body
    seen, handler = capture()
    call(handler, make_request())
    assert "prompt_cache_key" not in seen[0].json()


def cached_handler(usage: dict[str, Any]) -> Any:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response(completion(usage=usage))
    return handler


def test_cached_prompt_tokens_are_read_from_the_usage_and_counted_by_kind_and_endpoint() -> None:
    metrics = Metrics()
    metrics.name_models(kinds=["classify"], endpoints=["primary"])
    usage = {"prompt_tokens": 2000, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1536}}
    result = call(cached_handler(usage), make_request(kind="classify"), metrics)
    assert (result.prompt_tokens, result.cached_tokens) == (2000, 1536)
    labels = {"kind": "classify", "endpoint": "primary"}
    get = metrics.registry.get_sample_value
    assert get("agent_llm_prompt_tokens_total", labels) == 2000
    assert get("agent_llm_cached_prompt_tokens_total", labels) == 1536


def test_missing_or_odd_cached_counts_are_zero_and_never_over_the_prompt() -> None:
    for details, expected in ((None, 0), ({}, 0), ({"cached_tokens": "many"}, 0), ({"cached_tokens": -3}, 0),
                              ({"cached_tokens": 9999}, 100)):
        usage: dict[str, Any] = {"prompt_tokens": 100, "completion_tokens": 5}
        if details is not None:
            usage["prompt_tokens_details"] = details
        result = call(cached_handler(usage), make_request(kind="classify"), Metrics())
        assert result.cached_tokens == expected, json.dumps(details)


def test_the_console_overview_shows_the_cache_hit_ratio_per_kind_and_endpoint() -> None:
    from service.api import console_views as views

    metrics = Metrics()
    metrics.name_models(kinds=["classify", "review"], endpoints=["primary", "replica-1"])
    for kind, endpoint, prompt, cached in (("classify", "replica-1", 1000, 750), ("review", "primary", 400, 0)):
        p, c = metrics.prompt_tokens(kind, endpoint)
        p.inc(prompt)
        c.inc(cached)
    rows = views.overview_figures(views.samples(metrics.registry))["prompt_cache"]
    assert rows == [("classify", "replica-1", 1000.0, 750.0), ("review", "primary", 400.0, 0.0)]
