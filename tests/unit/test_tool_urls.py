"""Tool URLs are cut down before they are stored, logged or shown; approvals are parsed or refused
with a reason from a closed set."""

from __future__ import annotations

import json

import pytest

from service.agents.tools import safe_url, scrub_urls
from service.runtime.parked import SKIP_REASONS, BadApproval, parse_approval


@pytest.mark.parametrize(("url", "safe"), [
    ("https://user:pw@hooks.example.com:8443/a/b?token=s3#frag", "https://hooks.example.com:8443/a/b"),
    ("http://127.0.0.1:9/tickets?sig=x", "http://127.0.0.1:9/tickets"),
    ("http://[::1]:8080/p?q=1", "http://[::1]:8080/p"),
    ("http://u@h", "http://h"),
    ("not a url", "[url]"),
])
def test_safe_url_keeps_scheme_host_port_and_path_only(url: str, safe: str) -> None:
    assert safe_url(url) == safe


@pytest.mark.parametrize(("url", "safe"), [
    # webhooks that keep their secret in the path: the secret-looking segments go, the shape stays
    ("https://hooks.slack.com/services/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",
     "https://hooks.slack.com/services/T0A1B2C3D/B0A1B2C3D/…"),
    ("https://discord.com/api/webhooks/112233445566778899/aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5zA7bC9dE1fG3hI5jK7lM9nO1pQ3r",
     "https://discord.com/api/webhooks/112233445566778899/…"),
    ("http://h/tickets/7d0f6a3c-1b2e-4c5d-8e9f-0a1b2c3d4e5f/status", "http://h/tickets/…/status"),
    ("http://h/v1/tickets/ABC-123/status", "http://h/v1/tickets/ABC-123/status"),  # an id, kept
])
def test_secret_looking_path_segments_are_cut(url: str, safe: str) -> None:
    assert safe_url(url) == safe


def test_every_url_in_a_message_is_cut_down() -> None:
    text = "GET http://ops:pw@h:1/s?sig=abc: failed; then https://x.io/y?k=v#z"
    assert scrub_urls(text) == "GET http://h:1/s: failed; then https://x.io/y"


@pytest.mark.parametrize(("value", "reason"), [
    (None, "tombstone"),
    (b"x" * 70_000, "oversize"),
    (b"\xff", "encoding"),
    (b'{"task_id": "\\ud800", "approve": true}', "encoding"),
    (b"{", "json"),
    (b"[" * 40_000, "json"),
    (b'{"task_id": 1, "approve": true}', "schema"),
    (b'{"task_id": "t", "approve": 1}', "schema"),
    (b'{"task_id": "t", "approve": true, "by": 3}', "schema"),
    (b'{"task_id": "a b", "approve": true}', "task_key"),
    (b'{"task_id": "", "approve": true}', "task_key"),
])
def test_a_record_that_is_no_decision_is_refused_with_its_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(BadApproval) as refused:
        parse_approval(value)
    assert refused.value.reason == reason and reason in SKIP_REASONS


def test_a_decision_is_parsed() -> None:
    value = json.dumps({"task_id": "t-1", "approve": False, "by": "ada", "reason": "no"}).encode()
    assert parse_approval(value) == ("t-1", "rejected", "ada", "no")
