"""Each kind validates its input, and refuses answers that do not fit the task."""

from __future__ import annotations

import json

import pytest

from service.agents.registry import default_agents
from service.core.errors import InvalidOutput, PoisonError

agents = default_agents()


def parse(kind: str, task_input: dict[str, object], answer: object) -> dict[str, object]:
    agent = agents.get(kind)
    inp = agent.parse_input(task_input)
    return agent.steps[0].parse(inp, answer if isinstance(answer, str) else json.dumps(answer))


def test_extract_needs_exactly_the_asked_fields() -> None:
    inp = {"document": "Name: Ada", "fields": ["name", "date of birth"]}
    assert parse("extract", inp, {"fields": {"name": "Ada", "date of birth": None}}) == {
        "fields": {"name": "Ada", "date of birth": None}
    }
    with pytest.raises(InvalidOutput):
        parse("extract", inp, {"fields": {"name": "Ada"}})
    with pytest.raises(InvalidOutput):
        parse("extract", inp, {"fields": {"name": "Ada", "date of birth": None, "extra": "x"}})
    schema = agents.get("extract").steps[0].schema(agents.get("extract").parse_input(inp), {})
    assert schema["properties"]["fields"]["required"] == ["name", "date of birth"]


def test_classify_label_must_be_one_of_the_labels() -> None:
    inp = {"text": "great", "labels": ["pos", "neg"]}
    assert parse("classify", inp, {"label": "pos", "confidence": 0.9})["label"] == "pos"
    for bad in ({"label": "meh", "confidence": 0.5}, {"label": "pos", "confidence": 1.5}, {"label": "pos"}):
        with pytest.raises(InvalidOutput):
            parse("classify", inp, bad)
    schema = agents.get("classify").steps[0].schema(agents.get("classify").parse_input(inp), {})
    assert schema["properties"]["label"]["enum"] == ["pos", "neg"]


def test_summarize_respects_the_word_limit() -> None:
    inp = {"text": "long text", "max_words": 3}
    assert parse("summarize", inp, {"summary": "short and sweet"}) == {"summary": "short and sweet"}
    with pytest.raises(InvalidOutput):
        parse("summarize", inp, {"summary": "one two three four"})
    with pytest.raises(InvalidOutput):
        parse("summarize", inp, {"summary": "   "})


def test_not_json_is_invalid_output() -> None:
    with pytest.raises(InvalidOutput) as err:
        parse("summarize", {"text": "t", "max_words": 3}, "Sure! Here is your summary")
    assert err.value.kind == "not_json"


@pytest.mark.parametrize(
    ("kind", "task_input"),
    [
        ("extract", {"document": "", "fields": ["a"]}),
        ("extract", {"document": "d", "fields": []}),
        ("extract", {"document": "d", "fields": ["a", "a"]}),
        ("classify", {"text": "t", "labels": ["only"]}),
        ("classify", {"text": "t", "labels": ["a", "b"], "extra": 1}),
        ("summarize", {"text": "t", "max_words": 0}),
        ("summarize", {"text": "t", "max_words": "ten"}),
    ],
)
def test_bad_inputs_are_schema_poison(kind: str, task_input: dict[str, object]) -> None:
    with pytest.raises(PoisonError) as err:
        agents.get(kind).parse_input(task_input)
    assert err.value.reason == "schema"


def test_unknown_kind_is_schema_poison() -> None:
    with pytest.raises(PoisonError) as err:
        agents.get("nope")
    assert err.value.reason == "schema"
