"""Prompt caching: the key a step's requests share, and the endpoint a key's prefix goes to.

A provider caches the longest prefix of a prompt it has seen (OpenAI from 1,024 tokens, routed by
the ``prompt_cache_key`` field when one is sent). The requests of one step of one kind at one
prompt version share their stable part (the system prompt, the tool definitions, the schema, the
kind's fixed instructions): :func:`prompt_cache_key` names that prefix, and :func:`rendezvous`
orders the endpoints serving one model for it, so a fleet sends a prefix to one endpoint (whose
cache holds it) and, when that one cannot take the call, to the next in the key's own order:
removing an endpoint moves only the keys it had.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

MAX_KEY_CHARS = 64  # what OpenAI accepts of a prompt_cache_key


def prompt_cache_key(kind: str, step: str, prompt_version: str) -> str:
    """``<kind>:<step>@<version>``; over 64 characters, its start and a digest of the whole."""
    key = f"{kind}:{step.lstrip('@')}@{prompt_version}"
    if len(key) <= MAX_KEY_CHARS:
        return key
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return f"{key[:MAX_KEY_CHARS - len(digest) - 1]}~{digest}"


def _weight(name: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest(), "big")


def rendezvous(names: Iterable[str], key: str) -> list[str]:
    """``names`` in the order ``key`` prefers them (highest random weight first): the same on
    every worker, whatever order the names come in."""
    return sorted(names, key=lambda name: (_weight(name, key), name), reverse=True)
