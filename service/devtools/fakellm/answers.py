"""The bodies of the fake model's answers: a valid completion, or one broken by a fault."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from typing import Any

from service.devtools.fakellm.chat import ChatRequest
from service.devtools.fakellm.faults import REFUSAL, TOOL_FAULTS
from service.devtools.fakellm.http import dumps, parses
from service.devtools.fakellm.instances import random_instance, violation
from service.devtools.fakellm.scalars import words


def content(schema: Mapping[str, Any] | None, rng: random.Random) -> str:
    """A valid answer: an instance of the schema, or ``{"text": "<a few words>"}`` without one."""
    value = {"text": words(rng)} if schema is None else random_instance(schema, rng)
    return json.dumps(value, separators=(",", ":"))


def faulty_content(fault: str, request: ChatRequest, rng: random.Random) -> tuple[str, str, str | None]:
    """The content, finish reason and refusal of an answer broken by ``fault``."""
    refusal: str | None = None
    if fault == "truncate":
        full = content(request.schema, rng)
        text = full[: len(full) // 2]
        if parses(text):  # a prefix of a bare number can still be JSON
            text += ","
        reason = "length"
    elif fault == "refuse":
        text = refusal = REFUSAL
        reason = "content_filter"
    elif fault == "invalid_json":
        text = f"Sure! Here is the answer: {words(rng)}."
        reason = "stop"
    elif fault == "schema_violation" or fault in TOOL_FAULTS:  # a tool fault on a request without tools
        text = violation(request.schema)
        reason = "stop"
    elif fault == "empty":
        text = ""
        reason = "stop"
    else:  # pragma: no cover - FaultRule validates the names
        raise AssertionError(f"no answer for fault {fault!r}")
    return text, reason, refusal


def completion(request: ChatRequest, text: str, finish_reason: str, rng: random.Random,
               refusal: str | None = None) -> bytes:
    """An OpenAI chat-completion body carrying ``text``."""
    message = {"role": "assistant", "content": text, "refusal": refusal}
    return _body(request, message, finish_reason, len(text), rng)


def tool_completion(request: ChatRequest, calls: list[dict[str, Any]], rng: random.Random) -> bytes:
    """An OpenAI chat-completion body whose assistant message asks for ``calls``."""
    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}
    generated = sum(len(call["function"]["name"]) + len(call["function"]["arguments"]) for call in calls)
    return _body(request, message, "tool_calls", generated, rng)


def _body(request: ChatRequest, message: dict[str, Any], finish_reason: str, generated_chars: int,
          rng: random.Random) -> bytes:
    prompt_tokens = request.prompt_chars // 4 + 1
    completion_tokens = generated_chars // 4 + 1
    return dumps({
        "id": f"chatcmpl-{rng.getrandbits(96):024x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            # as OpenAI reports a prompt cache hit: the longest prefix this server saw before
            "prompt_tokens_details": {"cached_tokens": min(prompt_tokens, request.cached_chars // 4)},
        },
    })
