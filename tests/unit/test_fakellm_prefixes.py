"""The fake model reports cached prompt tokens as a provider does: the longest prefix of the prompt
(whole blocks: tools, schema, messages) that this server saw before."""

from __future__ import annotations

from typing import Any

import httpx

from service.devtools.fakellm import FakeLLM

SYSTEM = {"role": "system", "content": "You sort parcels. " * 50}  # 850 characters: about 212 tokens
SCHEMA = {"type": "json_object", "schema": {"type": "object", "properties": {"x": {"type": "string"}}}}


def usage(fake: FakeLLM, *messages: dict[str, str], response_format: dict[str, Any] = SCHEMA) -> dict[str, Any]:
    body = {"model": "fake", "messages": list(messages), "response_format": response_format}
    reply = httpx.post(f"{fake.base_url}/chat/completions", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()["usage"]
    return result


def test_a_repeated_prefix_is_reported_cached_and_a_new_one_is_not() -> None:
    with FakeLLM() as fake, FakeLLM() as other:
        first = usage(fake, SYSTEM, {"role": "user", "content": "parcel 1"})
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        second = usage(fake, SYSTEM, {"role": "user", "content": "parcel 2 is a different parcel"})
        assert second["prompt_tokens_details"]["cached_tokens"] == len(SYSTEM["content"]) // 4
        assert second["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens"]
        same = usage(fake, SYSTEM, {"role": "user", "content": "parcel 1"})  # the whole prompt seen
        assert same["prompt_tokens_details"]["cached_tokens"] == same["prompt_tokens"] - 1
        # another server has its own cache; another schema is another prefix
        assert usage(other, SYSTEM, {"role": "user", "content": "parcel 1"})["prompt_tokens_details"] == {
            "cached_tokens": 0}
        changed = {"type": "json_object", "schema": {"type": "object"}}
        assert usage(fake, SYSTEM, {"role": "user", "content": "parcel 1"},
                     response_format=changed)["prompt_tokens_details"]["cached_tokens"] == 0
        fake.reset()  # forgets what it saw
        assert usage(fake, SYSTEM, {"role": "user", "content": "parcel 1"})["prompt_tokens_details"][
            "cached_tokens"] == 0
