"""The fake model's prompt cache: as a provider's, it remembers the prefixes of the prompts it saw
and reports, of a new prompt, the longest one seen before as cached tokens.

A prompt is its blocks in order (the tools offered, the response schema, then each message); a
prefix is a run of whole blocks from the start, known by a digest of the run. Its size is the
characters of its messages' content, counted as the prompt's tokens are (``chars // 4``)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

Marks = tuple[tuple[bytes, int], ...]  # each prefix of the prompt: its digest and its content characters
MAX_PREFIXES = 100_000  # the least recently seen beyond this are forgotten


def prefix_marks(tools: Any, schema: Mapping[str, Any] | None, messages: list[Any],
                 chars: list[int]) -> Marks:
    """The digests of the prompt's prefixes, block by block; ``chars``: each message's content characters."""
    digest = hashlib.blake2b(digest_size=16)
    marks: list[tuple[bytes, int]] = []
    size = 0
    for block in (tools, schema):
        digest.update(json.dumps(block, sort_keys=True).encode())
        marks.append((digest.copy().digest(), size))
    for message, count in zip(messages, chars, strict=True):
        digest.update(json.dumps(message, sort_keys=True).encode())
        size += count
        marks.append((digest.copy().digest(), size))
    return tuple(marks)


class PrefixCache:
    """The prefixes one server saw; thread-safe."""

    def __init__(self, capacity: int = MAX_PREFIXES) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, marks: Marks) -> int:
        """The content characters of the longest prefix of ``marks`` seen before (0: none); every
        prefix of ``marks`` is remembered from now on."""
        cached = 0
        with self._lock:
            for digest, size in marks:
                if digest in self._seen:
                    cached = size
                    self._seen.move_to_end(digest)
                else:
                    self._seen[digest] = None
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
        return cached

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
