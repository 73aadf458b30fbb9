"""The fake model's schema-instance generator, checked against maintained tools.

- ``jsonschema`` validates what the generator gives for the nested schemas Hypothesis draws, apart
  from the small checker ``test_fakellm.violations``.
- ``hypothesis-jsonschema`` answers whether a schema has an instance at all: the generator refuses
  a scalar schema (:class:`SchemaError`) only when hypothesis-jsonschema finds no instance either.
  Scalar schemas only: hypothesis-jsonschema 0.23.1 cannot draw a JSON object with the Hypothesis
  this project installs (``'many' object has no attribute 'more'``), and the generator refuses an
  array whose item schema has no instance even when ``minItems`` is 0 (``[]`` would do): a gap
  this check found, left as it is because the service never sends such a schema.

The generator itself stays hand-written: the fake server needs an instance per request, fast and
reproducible from a ``random.Random`` seed, in a process that has no test dependencies;
hypothesis-jsonschema is a Hypothesis strategy, made for tests.
"""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis_jsonschema import from_schema

from service.devtools.fakellm import SchemaError, random_instance

_LENGTHS = st.integers(0, 24)
_INTS = st.integers(-50, 50)
_FLOATS = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
_FORMATS = st.sampled_from(["date", "date-time", "time", "email", "uri", "hostname", "ipv4", "uuid"])


def _optional(**members: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=members)


_SCALARS: st.SearchStrategy[dict[str, Any]] = st.one_of(
    _optional(minLength=_LENGTHS, maxLength=_LENGTHS, format=_FORMATS).map(lambda s: {"type": "string", **s}),
    _optional(minimum=_INTS, maximum=_INTS, exclusiveMinimum=_INTS, exclusiveMaximum=_INTS,
              multipleOf=st.integers(1, 7)).map(lambda s: {"type": "integer", **s}),
    _optional(minimum=_FLOATS, maximum=_FLOATS, exclusiveMinimum=_FLOATS,
              exclusiveMaximum=_FLOATS).map(lambda s: {"type": "number", **s}),
    st.lists(st.one_of(st.integers(-9, 9), st.text(max_size=4), st.booleans(), st.none()), min_size=1,
             max_size=4).map(lambda values: {"enum": values}),
)
_ARRAYS = st.builds(lambda items, low, extra: {"type": "array", "items": items, "minItems": low, "maxItems": low + extra},
                    _SCALARS, st.integers(0, 3), st.integers(-1, 3))
_NAMES = st.text(alphabet="abcde", min_size=1, max_size=3)


@st.composite
def _objects(draw: st.DrawFn) -> dict[str, Any]:
    properties = draw(st.dictionaries(_NAMES, st.one_of(_SCALARS, _ARRAYS), max_size=4))
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": [name for name in properties if draw(st.booleans())]}
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


def _errors(value: Any, schema: dict[str, Any]) -> list[str]:
    return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(value)]


@settings(max_examples=200, deadline=None)
@given(schema=_objects(), seed=st.integers(0, 2**32 - 1))
def test_jsonschema_accepts_every_instance_the_generator_gives(schema: dict[str, Any], seed: int) -> None:
    try:
        value = random_instance(schema, random.Random(seed))
    except SchemaError:
        return  # bounds with no value between them: see the test below
    assert _errors(value, schema) == []
    json.dumps(value, allow_nan=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(schema=_SCALARS, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_the_generator_refuses_only_schemas_hypothesis_jsonschema_finds_no_instance_of(
    schema: dict[str, Any], seed: int, data: st.DataObject,
) -> None:
    try:
        value = random_instance(schema, random.Random(seed))
    except SchemaError as exc:
        # with no instance, hypothesis-jsonschema's strategy is empty (the draw rejects the example)
        # or invalid (its bounds cross)
        try:
            found = data.draw(from_schema(schema), label="an instance of a schema the generator refused")
        except InvalidArgument:
            return
        pytest.fail(f"random_instance refused {schema} ({exc}), yet {found!r} is an instance")
    assert _errors(value, schema) == []


def test_hypothesis_jsonschema_still_cannot_draw_objects() -> None:
    """Why the check above stays with scalars and arrays; when this fails, extend it to objects."""

    @settings(max_examples=1, database=None)
    @given(from_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    def draw(value: Any) -> None:
        assert isinstance(value["a"], int)

    with pytest.raises(AttributeError, match="more"):
        draw()
