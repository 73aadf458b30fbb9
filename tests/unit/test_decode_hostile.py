"""The decode edge against the worst a producer can send: it raises nothing but PoisonError.

These go through :func:`service.pipeline.decode.decode_record`, the very function the consumer calls on
every record (bytes to task, agent and validated input), with JSON a generator writes by hand so
that it can hold what ``json.dumps`` refuses to: lone surrogate escapes, numbers out of range or
non-finite, dates that overflow once normalised to UTC, and nesting deeper than any parser allows.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.records import Record
from service.agents.registry import default_agents
from service.core.errors import PoisonError
from service.pipeline.decode import decode_record

LIMIT = 262_144
AGENTS = default_agents()


def record(value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> Record:
    return Record("t", 0, 0, b"k", value, headers or [])


def decode(value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> str:
    """``ok`` or the dead-letter reason; any other exception fails the test."""
    try:
        decode_record(record(value, headers), AGENTS, LIMIT)
    except PoisonError as exc:
        return exc.reason
    return "ok"


# ------------------------------------------------------------------------------ generators

def _escape(s: str) -> str:
    """A JSON string literal, lone surrogates written as \\uXXXX escapes (valid JSON, invalid text)."""
    out = []
    for ch in s:
        code = ord(ch)
        if ch in '"\\' or code < 0x20 or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


hostile_strings = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u2028", "classify", "extract", "summarize"]),
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["1e400", "-1e400", "1e-400", "1e308", "NaN", "Infinity", "-Infinity", "9" * 5000,
                     "0.1", "-0", "1E+2"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
dates = st.sampled_from([
    "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59+14:00",
    "2026-02-30T00:00:00Z", "2026-12-02T12:00:00Z", "2026-12-02T12:00:00", "not a date", "99999-01-01T00:00:00Z",
    "2026-12-02T25:61:61Z", "",
])


def json_text(depth: int = 3) -> st.SearchStrategy[str]:
    leaves = st.one_of(
        hostile_strings.map(_escape), numbers, dates.map(_escape), st.sampled_from(["true", "false", "null"]),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
            st.dictionaries(hostile_strings, inner, max_size=4).map(
                lambda d: "{" + ",".join(f"{_escape(k)}:{v}" for k, v in d.items()) + "}"),
        ),
        max_leaves=12,
    )


@st.composite
def task_text(draw: st.DrawFn) -> str:
    """Mostly task-shaped objects, so the generator gets past the parser into validation."""
    fields: dict[str, str] = {}
    if draw(st.booleans()):
        fields["kind"] = _escape(draw(st.one_of(st.sampled_from(["classify", "extract", "summarize",
                                                                  "prior_auth"]), hostile_strings)))
    if draw(st.booleans()):
        fields["task_id"] = _escape(draw(hostile_strings))
    if draw(st.booleans()):
        fields["deadline"] = draw(st.one_of(dates.map(_escape), numbers))
    fields["input"] = draw(st.one_of(
        json_text(),
        st.builds(lambda text, labels: "{" + f'"text":{text},"labels":{labels}' + "}",
                  hostile_strings.map(_escape) | numbers, json_text()),
        st.builds(lambda doc, fs: "{" + f'"document":{doc},"fields":{fs}' + "}", hostile_strings.map(_escape),
                  json_text()),
        st.builds(lambda text, n: "{" + f'"text":{text},"max_words":{n}' + "}", hostile_strings.map(_escape),
                  numbers),
    ))
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task_text())
def test_any_task_shaped_json_is_a_task_or_a_poison(text: str) -> None:
    assert decode(text.encode("utf-8", "surrogatepass")) in {"ok", "decode", "schema", "oversize"}


@settings(max_examples=200, deadline=None)
@given(json_text())
def test_any_json_value_is_a_task_or_a_poison(text: str) -> None:
    assert decode(text.encode("utf-8", "surrogatepass")) in {"ok", "decode", "schema"}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_task_or_a_poison(raw: bytes) -> None:
    assert decode(raw) in {"ok", "decode", "schema"}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=40))), max_size=5),
       dates)
def test_odd_headers_never_escape(headers: list[tuple[str, bytes]], deadline: str) -> None:
    body = json.dumps({"kind": "classify", "input": {"text": "x", "labels": ["a", "b"]}}).encode()
    assert decode(body, [*headers, ("deadline", deadline.encode())]) in {"ok", "schema"}


def test_the_generators_reach_the_hostile_cases() -> None:
    """The strategies above can produce what the old ones could not (else the properties prove little)."""
    assert "\\ud" in _escape("\ud800")
    assert json.loads(_escape("a\udfffb")) == "a\udfffb"


# ------------------------------------------------------------------------------ named cases

CLASSIFY = '"kind":"classify"'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{" + CLASSIFY + ',"input":{"text":"\\ud800","labels":["a","b"]}}', "decode"),  # lone surrogate
        ("{" + CLASSIFY + ',"input":{"\\udfff":"x"}}', "decode"),  # in a key
        ("{" + CLASSIFY + ',"task_id":"\\ud800","input":{}}', "schema"),
        ("{" + CLASSIFY + ',"input":{"text":"x","labels":["a","b"]},"deadline":"9999-12-31T23:59:59-01:00"}',
         "schema"),
        ("{" + CLASSIFY + ',"input":{"text":"x","labels":["a","b"]},"deadline":"0001-01-01T00:00:00+01:00"}',
         "schema"),
        ('{"kind":"summarize","input":{"text":"x","max_words":1e400}}', "decode"),
        ('{"kind":"summarize","input":{"text":"x","max_words":-1e400}}', "decode"),
        ('{"kind":"summarize","input":{"text":"x","max_words":' + "9" * 5000 + "}}", "decode"),
        ('{"kind":"summarize","input":{"text":"x","max_words":1e308}}', "schema"),
        ("{" + CLASSIFY + ',"input":' + "[" * 100_000 + "]" * 100_000 + "}", "decode"),
        ("{" + CLASSIFY + ',"input":{"a":' + "[" * 900 + "]" * 900 + "}}", "schema"),
        ("[" * 300_000, "oversize"),
    ],
)
def test_named_hostile_records(text: str, reason: str) -> None:
    assert decode(text.encode("utf-8", "surrogatepass")) == reason


def test_tombstone_and_invalid_utf8() -> None:
    assert decode(None) == "decode"
    assert decode(b'{"kind":"classify","input":{"text":"\xed\xa0\x80"}}') == "decode"  # surrogate as UTF-8
