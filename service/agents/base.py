"""The agent model: an agent is a kind of task made of steps, each step one model call.

A step is a versioned prompt template with an output model. The model's JSON schema travels
with the request as ``response_format``; the answer is validated against the model and the step's
own checks (exact field names, a label from the list, a word limit) before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from service.agents.tasks import describe_validation
from service.core.errors import InvalidOutput, PoisonError

Messages = list[dict[str, str]]


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
    """A kind of task: its input model and its steps; the result is the last step's output."""

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
