"""The model endpoints beside the primary (``AGENT_LLM__*``): the fallbacks, tried while it is
unavailable, and the replicas, serving the primary's model beside it."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

ENDPOINT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class OtherEndpoint(BaseModel):
    """What every endpoint beside the primary has: its URL, key, own rate limits and whether it takes
    OpenAI's ``prompt_cache_key`` field (a server that refuses unknown fields does not)."""

    model_config = ConfigDict(extra="forbid")

    # a metric label, and what a degraded result names (unset: "fallback-<position>" or
    # "replica-<position>", from 1)
    name: str | None = Field(None, pattern=ENDPOINT_NAME.pattern)
    base_url: str = Field(min_length=1)
    api_key: SecretStr = SecretStr("not-needed")
    rpm: int = Field(0, ge=0)  # requests per minute across replicas (0: no limit)
    tpm: int = Field(0, ge=0)  # tokens per minute across replicas (0: no limit)
    prompt_cache_key: bool = True  # send the step's prompt cache key (service.llm.affinity)

    def to_json(self) -> dict[str, Any]:
        """As the environment spells it, the key included (for a spawned worker)."""
        data = self.model_dump(exclude_none=True)
        data["api_key"] = self.api_key.get_secret_value()
        return data


class FallbackEndpoint(OtherEndpoint):
    """An OpenAI-compatible endpoint tried, in order, by kinds whose policy is ``fallback`` while the
    primary (``AGENT_LLM__BASE_URL``) is unavailable. It has its own client, breaker, Retry-After
    and rate limits; the other model settings (format, temperature, retries) are the primary's."""

    model: str = Field(min_length=1)
    timeout_s: float | None = Field(None, gt=0)  # unset: AGENT_LLM__TIMEOUT_S


class ReplicaEndpoint(OtherEndpoint):
    """Another endpoint serving the primary's model, with the primary's settings and its own breaker,
    rate limits and window: a step's calls go to the one its prompt cache key prefers
    (:func:`service.llm.affinity.rendezvous`), or the next while that one is unavailable or full.
    Its answers are not degraded."""
