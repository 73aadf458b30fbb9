"""Decoding at the edge: every bad input becomes a PoisonError with a reason, never a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.agents.registry import default_agents
from service.agents.tasks import _parse, canonical_bytes, canonical_json, decode_task, fingerprint, loads, task_key
from service.core.errors import PoisonError

LIMIT = 262_144


def value(**body: object) -> bytes:
    return json.dumps(body).encode()


def test_task_key_is_the_task_id_or_a_digest_of_the_work() -> None:
    a = decode_task(value(kind="classify", input={"text": "x", "labels": ["a", "b"]}), [], LIMIT)
    b = decode_task(value(input={"labels": ["a", "b"], "text": "x"}, kind="classify"), [], LIMIT)
    assert a.key == b.key and a.key.startswith("auto-")  # key order of the JSON does not matter
    c = decode_task(value(task_id="t-1", kind="classify", input={"text": "x", "labels": ["a", "b"]}), [], LIMIT)
    assert c.key == "t-1" and c.fingerprint == a.fingerprint
    d = decode_task(value(kind="classify", input={"text": "y", "labels": ["a", "b"]}), [], LIMIT)
    assert d.key != a.key and d.fingerprint != a.fingerprint
    assert task_key(c.event) == "t-1"
    assert fingerprint("k", {"a": 1}) != fingerprint("j", {"a": 1})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "decode"),
        (b"\xff\xfe", "decode"),
        (b"{not json", "decode"),
        (b'{"kind": "x", "input": {"v": NaN}}', "decode"),
        (b"[" * 100_000 + b"]" * 100_000, "decode"),
        (b"[1, 2]", "schema"),
        (b'"a string"', "schema"),
        (value(kind="classify"), "schema"),
        (value(kind="Bad Kind", input={}), "schema"),
        (value(kind="classify", input={}, extra=1), "schema"),
        (value(kind="classify", input={}, task_id="a}b"), "schema"),
        (value(kind="classify", input={}, task_id="a{b"), "schema"),
        (value(kind="classify", input={}, task_id=""), "schema"),
        (value(kind="classify", input={}, deadline="tomorrow"), "schema"),
        (value(kind="classify", input={}, deadline="2030-01-01T00:00:00"), "schema"),  # no zone
        (value(kind="classify", input={}, priority="urgent"), "schema"),
        (b" " * (LIMIT + 1), "oversize"),
    ],
)
def test_bad_values_are_poison_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(PoisonError) as err:
        decode_task(raw, [], LIMIT)
    assert err.value.reason == reason
    assert str(err.value)


def test_size_limit_is_checked_before_parsing() -> None:
    huge = b"\xff" * (LIMIT + 1)  # would be a decode error if it were parsed
    with pytest.raises(PoisonError) as err:
        decode_task(huge, [], LIMIT)
    assert err.value.reason == "oversize"


def test_deadline_and_traceparent_come_from_headers() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    t = decode_task(value(kind="classify", input={}), [("deadline", b"2030-01-01T00:00:00Z"), ("traceparent", tp.encode())], LIMIT)
    assert t.deadline is not None and t.deadline.year == 2030
    assert t.traceparent == tp


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        decode_task(raw, [], LIMIT)
    except PoisonError as exc:
        assert exc.reason in {"decode", "schema", "oversize"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["task_id", "kind", "input", "deadline", "priority", "x"]), json_values))
def test_arbitrary_json_objects_never_crash(body: dict[str, object]) -> None:
    agents = default_agents()
    try:
        task = decode_task(json.dumps(body).encode(), [], LIMIT)
        agents.get(task.kind).parse_input(task.event.input)
    except PoisonError as exc:
        assert exc.reason in {"decode", "schema"}


# JSON data as decoded from a record or written by a model: every float (exponents, tiny and huge,
# negative zero), integers past 64 bits, any Unicode text in keys and values, nesting
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(_json_values)
@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
def test_canonical_json_is_the_standard_librarys_text_byte_for_byte(data: object) -> None:
    """Digests stored in the ledger depend on this text: the fast path must never change it."""
    expected = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert canonical_json(data) == expected
    assert canonical_bytes(data) == expected.encode()  # what fingerprints hash


@pytest.mark.parametrize("data", [1e16, 1e-05, -1.5e-07, 1.2345678901234568e17, 5e-324, 2**64, {"x": [0.00001]}])
def test_canonical_json_keeps_exponents_and_big_integers_as_the_standard_library_writes_them(data: object) -> None:
    assert canonical_json(data) == json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("data", [float("nan"), [float("inf")], {"a": float("-inf")}])
def test_canonical_json_refuses_non_finite_floats(data: object) -> None:
    with pytest.raises(ValueError):
        canonical_json(data)


def test_canonical_json_writes_a_lone_surrogate_as_the_standard_library_does() -> None:
    assert canonical_json("\ud800") == json.dumps("\ud800", ensure_ascii=False)  # text; encoding it fails later
    with pytest.raises(UnicodeEncodeError):
        canonical_bytes("\ud800")


def _same(a: object, b: object) -> bool:
    """Equal and of the same types all the way down (1 == 1.0 is not the same data)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b or (isinstance(a, float) and repr(a) == repr(b))


def _read(raw: bytes) -> tuple[str, object]:
    try:
        return "ok", _parse(raw)
    except (ValueError, RecursionError) as exc:
        return "refused", type(exc)


@given(_json_values, st.sampled_from([{}, {"ensure_ascii": True}, {"indent": 1}]))
@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
def test_a_record_is_read_as_the_standard_library_reads_it(data: object, how: dict[str, object]) -> None:
    """orjson reads a record only where it reads exactly what the contract's loads reads."""
    raw = json.dumps(data, **how).encode()  # type: ignore[arg-type]
    assert _same(_parse(raw), loads(raw.decode()))


@pytest.mark.parametrize("raw", [
    b'{"a": 1e400}', b'{"a": -1e400}', b'{"a": ' + b"1" * 400 + b'.0}', b'{"a": NaN}', b'{"a": Infinity}',
    b'{"a": "\\ud800"}', b'{"a": "\\udc00x"}', b'\xff{"a": 1}', b'\xef\xbb\xbf{"a": 1}', b'{"a": 1} x',
    b"[" * 150 + b"]" * 150, b"[" * 5000 + b"]" * 5000, b'{"a": 123456789012345678901234567890}',
    b'{"a": -18446744073709551617}', b'{"a": 0.1234567890123456789012}', b'{"a": 1, "a": 2}', b"",
])
def test_hostile_bytes_are_read_or_refused_as_the_standard_library_does(raw: bytes) -> None:
    try:
        expected: tuple[str, object] = "ok", loads(raw.decode())
    except (ValueError, RecursionError) as exc:
        expected = "refused", type(exc)
    got = _read(raw)
    assert got[0] == expected[0]
    if got[0] == "ok":
        assert _same(got[1], expected[1])
    else:
        assert got[1] is expected[1]  # the same exception, so the same dead-letter reason and words
