"""The built-in kinds' prompts suit a small model: a worked example of the answer's shape, never a
template whose placeholders the model would copy into its answer."""

from __future__ import annotations

import json
import re

from service.agents.base import Previous
from service.agents.kinds import (
    ExtractInput,
    ExtractOutput,
    ExtractStep,
    SummarizeInput,
    SummarizeLongStep,
    SummarizeOutput,
    SummarizeStep,
)


def _system_prompt() -> str:
    task = ExtractInput(document="Invoice 7 from Acme, due 2026-12-01.", fields=["invoice_number", "due_date"])
    messages = ExtractStep().messages(task, Previous({}))
    return str(messages[0]["content"])


def test_extract_prompt_shows_an_example_answer_not_a_template() -> None:
    prompt = _system_prompt()
    assert re.search(r"\{\{|<[a-z_ ]+>|\[[a-z_ ]+\]", prompt) is None, prompt  # no placeholders
    answer = re.search(r"^Answer: (\{.*\})$", prompt, re.MULTILINE)
    assert answer is not None, prompt
    example = ExtractOutput.model_validate_json(answer.group(1))
    fields = json.loads(re.search(r"^Example\. Fields: (\[.*\])$", prompt, re.MULTILINE).group(1))  # type: ignore[union-attr]
    document = re.search(r"^Document: (.*)$", prompt, re.MULTILINE).group(1)  # type: ignore[union-attr]
    assert sorted(example.fields) == sorted(fields)
    # every value is copied from the example's document, and an absent field is null
    assert all(value is None or value in document for value in example.fields.values())
    assert None in example.fields.values()


def test_a_changed_prompt_has_a_new_version() -> None:
    assert ExtractStep.prompt_version == "extract-v2"


def test_summarize_prompt_shows_an_example_summary_within_the_limit() -> None:
    task = SummarizeInput(text="A long text about the weather.", max_words=12)
    prompt = str(SummarizeStep().messages(task, Previous({}))[0]["content"])
    assert "at most 12 words" in prompt
    answer = re.search(r"^Answer: (\{.*\})$", prompt, re.MULTILINE)
    assert answer is not None, prompt
    example = SummarizeOutput.model_validate_json(answer.group(1))
    assert 0 < len(example.summary.split()) <= 12
    # the map step of summarize_long shares the prompt: both versions change with it
    assert (SummarizeStep.prompt_version, SummarizeLongStep.prompt_version) == ("summarize-v2", "summarize-long-v2")
