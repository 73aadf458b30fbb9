"""The built-in kinds: ``extract``, ``classify`` and ``summarize``, one step each, in the typed form."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.agents.base import Messages, Previous, Step
from service.agents.helpers import StrictInput, system_message, user_message
from service.core.errors import InvalidOutput

# ----------------------------------------------------------------------------- inputs

def _unique(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError("values must be unique")
    return values


class ExtractInput(StrictInput):
    document: str = Field(min_length=1)
    fields: list[str] = Field(min_length=1, max_length=64)

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: list[str]) -> list[str]:
        if any(not name.strip() or len(name) > 128 for name in v):
            raise ValueError("field names must be 1..128 characters")
        return _unique(v)


class ClassifyInput(StrictInput):
    text: str = Field(min_length=1)
    labels: list[str] = Field(min_length=2, max_length=256)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if any(not label or len(label) > 128 for label in v):
            raise ValueError("labels must be 1..128 characters")
        return _unique(v)


class SummarizeInput(StrictInput):
    text: str = Field(min_length=1)
    max_words: int = Field(ge=1, le=2000)


# ----------------------------------------------------------------------------- outputs

class ExtractOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fields: dict[str, str | None]


class ClassifyOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    confidence: float = Field(ge=0, le=1)


class SummarizeOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    summary: str = Field(min_length=1)


# ----------------------------------------------------------------------------- steps

# A worked example rather than a template: a small model copies placeholders such as "{{ date }}"
# into its answer, but follows an example's shape with the document's own values.
EXTRACT_PROMPT = (
    "Extract the named fields from the document. Copy each value as it is written in the document; "
    "use null when a field is absent.\n\n"
    'Example. Fields: ["city", "date", "phone"]\n'
    "Document: Meet me in Oslo on 2025-03-04.\n"
    'Answer: {"fields": {"city": "Oslo", "date": "2025-03-04", "phone": null}}\n\n'
    "Now the fields and the document below."
)
SUMMARIZE_EXAMPLE = (
    "Example. Text: The train to Bergen is cancelled today because of snow; buses replace it from the "
    "station at noon.\n"
    'Answer: {"summary": "Snow cancelled the Bergen train; buses leave the station at noon."}\n\n'
    "Now the text below."
)

class ExtractStep(Step[ExtractInput, ExtractOutput]):
    name = "extract"
    prompt_version = "extract-v2"
    output_model = ExtractOutput

    def schema(self, task_input: ExtractInput, previous: Previous) -> dict[str, Any]:
        props = {name: {"type": ["string", "null"]} for name in task_input.fields}
        return {
            "type": "object",
            "properties": {
                "fields": {
                    "type": "object", "properties": props,
                    "required": list(task_input.fields), "additionalProperties": False,
                }
            },
            "required": ["fields"],
            "additionalProperties": False,
        }

    def messages(self, task_input: ExtractInput, previous: Previous) -> Messages:
        return [system_message(EXTRACT_PROMPT),
                user_message(f"Fields: {json.dumps(task_input.fields)}\n\nDocument:\n{task_input.document}")]

    def check(self, task_input: ExtractInput, output: ExtractOutput) -> None:
        if set(output.fields) != set(task_input.fields):
            missing = sorted(set(task_input.fields) - set(output.fields))
            extra = sorted(set(output.fields) - set(task_input.fields))
            raise InvalidOutput("schema", f"extract: fields differ (missing {missing}, extra {extra})")


class ClassifyStep(Step[ClassifyInput, ClassifyOutput]):
    name = "classify"
    prompt_version = "classify-v1"
    output_model = ClassifyOutput

    def schema(self, task_input: ClassifyInput, previous: Previous) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": list(task_input.labels)},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["label", "confidence"],
            "additionalProperties": False,
        }

    def messages(self, task_input: ClassifyInput, previous: Previous) -> Messages:
        return [
            system_message("Classify the text with exactly one of the labels and a confidence from 0 to 1."),
            user_message(f"Labels: {json.dumps(task_input.labels)}\n\nText:\n{task_input.text}"),
        ]

    def check(self, task_input: ClassifyInput, output: ClassifyOutput) -> None:
        if output.label not in task_input.labels:
            raise InvalidOutput("schema", f"classify: label {output.label[:64]!r} is not one of the labels")


class SummarizeStep(Step[SummarizeInput, SummarizeOutput]):
    name = "summarize"
    prompt_version = "summarize-v2"
    output_model = SummarizeOutput

    def messages(self, task_input: SummarizeInput, previous: Previous) -> Messages:
        return [system_message(f"Summarize the text in at most {task_input.max_words} words, in your own "
                               f"sentence.\n\n{SUMMARIZE_EXAMPLE}"),
                user_message(task_input.text)]

    def check(self, task_input: SummarizeInput, output: SummarizeOutput) -> None:
        words = len(output.summary.split())
        if words == 0 or words > task_input.max_words:
            raise InvalidOutput("schema", f"summarize: {words} words, limit {task_input.max_words}")


class SummarizeLongStep(SummarizeStep):
    """``summarize_long``: a text of any length, summarised in pieces that fit the model's window
    (split on paragraph boundaries, each piece journaled), then the partial summaries combined."""

    prompt_version = "summarize-long-v2"  # its pieces are summarised with SummarizeStep's prompt
    fit = "map_reduce"
    chunk_field = "text"

    def reduce_messages(self, task_input: SummarizeInput, partials: list[dict[str, Any]]) -> Messages:
        parts = "\n\n".join(f"Part {i}: {p['summary']}" for i, p in enumerate(partials, 1))
        return [
            system_message(f"These are summaries of consecutive parts of one text. Combine them into one "
                           f"summary of the whole text in at most {task_input.max_words} words."),
            user_message(parts),
        ]
