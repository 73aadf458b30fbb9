"""Task kinds: each kind is an agent made of steps.

A step is a versioned prompt template with an output model. The model's JSON schema travels
with the request as ``response_format``; the answer is validated against the model and the step's
own checks (exact field names, a label from the list, a word limit) before anything is written.
New kinds register in an :class:`AgentRegistry`; the consumer never changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.agents.tasks import describe_validation
from service.core.errors import InvalidOutput, PoisonError

Messages = list[dict[str, str]]
JSON_ONLY = "Answer with one JSON object that matches the given schema and nothing else."


class Step:
    """One model call. Subclasses set ``name``, ``prompt_version`` and ``output_model``."""

    name: str = "answer"
    prompt_version: str = "v1"
    output_model: type[BaseModel]

    def schema(self, task_input: BaseModel, previous: Mapping[str, Any]) -> dict[str, Any]:
        return self.output_model.model_json_schema()

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        raise NotImplementedError

    def check(self, task_input: BaseModel, output: BaseModel) -> None:
        """Checks the schema cannot express. Raise :class:`InvalidOutput` to refuse."""

    def parse(self, task_input: BaseModel, content: str) -> dict[str, Any]:
        """Validate a model answer and return it as plain JSON data."""
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise InvalidOutput("not_json", f"{self.name}: answer is not JSON: {str(exc)[:120]}") from exc
        try:
            output = self.output_model.model_validate(data)
        except ValidationError as exc:
            raise InvalidOutput("schema", f"{self.name}: {describe_validation(exc)}") from exc
        self.check(task_input, output)
        return output.model_dump(mode="json")


@dataclass(frozen=True)
class Agent:
    kind: str
    input_model: type[BaseModel]
    steps: tuple[Step, ...]

    def parse_input(self, raw: dict[str, Any]) -> BaseModel:
        try:
            return self.input_model.model_validate(raw)
        except ValidationError as exc:
            raise PoisonError("schema", f"input of {self.kind}: {describe_validation(exc)}") from exc

    def result(self, outputs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """The task's result: the last step's output."""
        return outputs[self.steps[-1].name]

    @property
    def prompt_version(self) -> str:
        return "+".join(f"{s.name}@{s.prompt_version}" for s in self.steps)


class AgentRegistry:
    def __init__(self, agents: Iterable[Agent] = ()) -> None:
        self._agents: dict[str, Agent] = {}
        for agent in agents:
            self.register(agent)

    def register(self, agent: Agent) -> None:
        if agent.kind in self._agents:
            raise ValueError(f"kind {agent.kind!r} is registered twice")
        self._agents[agent.kind] = agent

    def get(self, kind: str) -> Agent:
        try:
            return self._agents[kind]
        except KeyError:
            raise PoisonError("schema", f"unknown kind {kind!r}") from None

    def kinds(self) -> list[str]:
        return sorted(self._agents)


# ----------------------------------------------------------------------------- inputs

def _unique(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError("values must be unique")
    return values


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtractInput(_Input):
    document: str = Field(min_length=1)
    fields: list[str] = Field(min_length=1, max_length=64)

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: list[str]) -> list[str]:
        if any(not name.strip() or len(name) > 128 for name in v):
            raise ValueError("field names must be 1..128 characters")
        return _unique(v)


class ClassifyInput(_Input):
    text: str = Field(min_length=1)
    labels: list[str] = Field(min_length=2, max_length=256)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if any(not label or len(label) > 128 for label in v):
            raise ValueError("labels must be 1..128 characters")
        return _unique(v)


class SummarizeInput(_Input):
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

def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _system(text: str) -> dict[str, str]:
    return {"role": "system", "content": f"{text} {JSON_ONLY}"}


class ExtractStep(Step):
    name = "extract"
    prompt_version = "extract-v1"
    output_model = ExtractOutput

    def schema(self, task_input: BaseModel, previous: Mapping[str, Any]) -> dict[str, Any]:
        assert isinstance(task_input, ExtractInput)
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

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        assert isinstance(task_input, ExtractInput)
        return [
            _system("Extract the named fields from the document. Use null when a field is absent."),
            _user(f"Fields: {json.dumps(task_input.fields)}\n\nDocument:\n{task_input.document}"),
        ]

    def check(self, task_input: BaseModel, output: BaseModel) -> None:
        assert isinstance(task_input, ExtractInput) and isinstance(output, ExtractOutput)
        if set(output.fields) != set(task_input.fields):
            missing = sorted(set(task_input.fields) - set(output.fields))
            extra = sorted(set(output.fields) - set(task_input.fields))
            raise InvalidOutput("schema", f"extract: fields differ (missing {missing}, extra {extra})")


class ClassifyStep(Step):
    name = "classify"
    prompt_version = "classify-v1"
    output_model = ClassifyOutput

    def schema(self, task_input: BaseModel, previous: Mapping[str, Any]) -> dict[str, Any]:
        assert isinstance(task_input, ClassifyInput)
        return {
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": list(task_input.labels)},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["label", "confidence"],
            "additionalProperties": False,
        }

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        assert isinstance(task_input, ClassifyInput)
        return [
            _system("Classify the text with exactly one of the labels and a confidence from 0 to 1."),
            _user(f"Labels: {json.dumps(task_input.labels)}\n\nText:\n{task_input.text}"),
        ]

    def check(self, task_input: BaseModel, output: BaseModel) -> None:
        assert isinstance(task_input, ClassifyInput) and isinstance(output, ClassifyOutput)
        if output.label not in task_input.labels:
            raise InvalidOutput("schema", f"classify: label {output.label[:64]!r} is not one of the labels")


class SummarizeStep(Step):
    name = "summarize"
    prompt_version = "summarize-v1"
    output_model = SummarizeOutput

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> Messages:
        assert isinstance(task_input, SummarizeInput)
        return [
            _system(f"Summarize the text in at most {task_input.max_words} words."),
            _user(task_input.text),
        ]

    def check(self, task_input: BaseModel, output: BaseModel) -> None:
        assert isinstance(task_input, SummarizeInput) and isinstance(output, SummarizeOutput)
        words = len(output.summary.split())
        if words == 0 or words > task_input.max_words:
            raise InvalidOutput("schema", f"summarize: {words} words, limit {task_input.max_words}")


def default_agents() -> AgentRegistry:
    from service.agents.prior_auth import prior_auth_agent

    return AgentRegistry([
        Agent("extract", ExtractInput, (ExtractStep(),)),
        Agent("classify", ClassifyInput, (ClassifyStep(),)),
        Agent("summarize", SummarizeInput, (SummarizeStep(),)),
        prior_auth_agent(),
    ])
