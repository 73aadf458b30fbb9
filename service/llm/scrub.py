"""Credentials out of any text that leaves the process: exception messages, logs, dead letters."""

from __future__ import annotations

import re

_REDACTED = "[redacted]"
_SECRET_PATTERNS = (
    # Authorization values: "Bearer abc", "Basic abc"
    (re.compile(r"\b(Bearer|Basic)\s+[^\s,;\"']+", re.IGNORECASE), r"\1 " + _REDACTED),
    # key=value / key: value for names that hold secrets
    (
        re.compile(
            r"\b((?:api[_-]?key|access[_-]?token|token|secret|password|passwd|authorization)"
            r"[\"']?\s*[=:]\s*[\"']?)[^\s,;\"'&]+",
            re.IGNORECASE,
        ),
        r"\1" + _REDACTED,
    ),
    # OpenAI-style keys and the like: sk-..., sk-proj-..., pk_..., rk_...
    (re.compile(r"\b(?:sk|pk|rk)[-_][A-Za-z0-9_*.-]{6,}"), _REDACTED),
    # long hex or base64 runs (with a letter and a digit, so words and model names survive)
    (
        re.compile(r"(?=[A-Za-z0-9+/_]*[0-9])(?=[A-Za-z0-9+/_]*[A-Za-z])[A-Za-z0-9+/_]{32,}={0,2}"),
        _REDACTED,
    ),
)


def scrub(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``[redacted]``.

    Covers ``Bearer``/``Basic`` values, ``api_key=``/``token:``-style pairs, ``sk-...`` keys and
    long hex/base64 runs. For messages that leave the process (exceptions, logs, dead letters).
    """
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text
