"""How an endpoint is named where it is shared: a tag in its Redis keys, a label in its metrics.

The tag is a digest of the whole URL, so every replica that calls one endpoint shares its keys (the
breaker's Retry-After, the rate limits, the fleet's window) and no key shows a path or a secret. The
label is the endpoint's ``host:port``, a bounded metric label.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit


def endpoint_tag(endpoint: str) -> str:
    """The endpoint's part of its Redis keys (``<prefix>:endpoint:{<tag>}:...``)."""
    return hashlib.sha256(endpoint.encode()).hexdigest()[:16]


def endpoint_label(endpoint: str) -> str:
    """host:port of the endpoint, a bounded label (never a path with secrets)."""
    parts = urlsplit(endpoint)
    return parts.netloc.rsplit("@", 1)[-1] or "default"
