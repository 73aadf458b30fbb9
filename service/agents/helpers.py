"""Helpers for writing a kind: a strict input model and the two message shapes every prompt uses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

JSON_ONLY = "Answer with one JSON object that matches the given schema and nothing else."


class StrictInput(BaseModel):
    """A task input that refuses unknown fields and cannot be changed once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def user_message(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def system_message(text: str) -> dict[str, str]:
    """A system prompt that ends by asking for the step's JSON object and nothing else."""
    return {"role": "system", "content": f"{text} {JSON_ONLY}"}
