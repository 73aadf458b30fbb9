"""``prior_auth``: a five-step prior-authorization intake.

extract -> benefit_check -> policy_match -> draft -> review. Each step's output is journaled in the
ledger with its digest and prompt version; a resumed task re-uses the finished steps and calls the
model only for the rest. A step sees the task input and only the recorded output of the step before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.agents.base import Agent, Messages, Previous, Step
from service.agents.helpers import StrictInput, system_message, user_message
from service.core.errors import InvalidOutput


class PriorAuthInput(StrictInput):
    document: str = Field(min_length=1)
    payer: str = Field(min_length=1, max_length=200)
    drug: str = Field(min_length=1, max_length=200)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Extracted(_Out):
    patient_name: str | None
    diagnosis: str | None
    prescriber: str | None
    drug: str | None
    dose: str | None


class BenefitCheck(_Out):
    covered: bool
    requires_prior_auth: bool
    notes: str


class Criterion(_Out):
    criterion: str
    met: bool
    evidence: str | None


class PolicyMatch(_Out):
    criteria: list[Criterion] = Field(min_length=1, max_length=10)


class Draft(_Out):
    letter: str = Field(min_length=1)


class Review(_Out):
    decision: Literal["submit", "needs_info", "deny_likely"]
    issues: list[str] = Field(max_length=10)


def _previous(previous: Mapping[str, Any], name: str) -> str:
    if name not in previous:  # the processor hands over the recorded output of the step before
        raise InvalidOutput("schema", f"step input {name!r} is missing")
    return json.dumps(previous[name], sort_keys=True)


def _case(task_input: PriorAuthInput) -> str:
    return f"Payer: {task_input.payer}\nRequested drug: {task_input.drug}"


class ExtractCase(Step[PriorAuthInput, Extracted]):
    name = "extract"
    prompt_version = "pa-extract-v1"
    output_model = Extracted

    def messages(self, task_input: PriorAuthInput, previous: Previous) -> Messages:
        return [
            system_message("From the clinical note, extract the patient, diagnosis, prescriber, drug and dose. "
                    "Use null for anything the note does not say."),
            user_message(f"{_case(task_input)}\n\nClinical note:\n{task_input.document}"),
        ]


class CheckBenefit(Step[PriorAuthInput, BenefitCheck]):
    name = "benefit_check"
    prompt_version = "pa-benefit-v1"
    output_model = BenefitCheck

    def messages(self, task_input: PriorAuthInput, previous: Previous) -> Messages:
        return [
            system_message("Decide whether the payer covers the drug and whether it needs prior authorization."),
            user_message(f"{_case(task_input)}\n\nExtracted case:\n{_previous(previous, 'extract')}"),
        ]


class MatchPolicy(Step[PriorAuthInput, PolicyMatch]):
    name = "policy_match"
    prompt_version = "pa-policy-v1"
    output_model = PolicyMatch

    def messages(self, task_input: PriorAuthInput, previous: Previous) -> Messages:
        return [
            system_message("List the payer's medical-necessity criteria for the drug and whether the case meets each."),
            user_message(f"{_case(task_input)}\n\nBenefit check:\n{_previous(previous, 'benefit_check')}"),
        ]


class DraftLetter(Step[PriorAuthInput, Draft]):
    name = "draft"
    prompt_version = "pa-draft-v1"
    output_model = Draft

    def messages(self, task_input: PriorAuthInput, previous: Previous) -> Messages:
        return [
            system_message("Draft a short prior-authorization request letter from the matched criteria."),
            user_message(f"{_case(task_input)}\n\nCriteria:\n{_previous(previous, 'policy_match')}"),
        ]


class ReviewLetter(Step[PriorAuthInput, Review]):
    name = "review"
    prompt_version = "pa-review-v1"
    output_model = Review

    def messages(self, task_input: PriorAuthInput, previous: Previous) -> Messages:
        return [
            system_message("Review the letter: submit it, ask for more information, or flag a likely denial."),
            user_message(f"{_case(task_input)}\n\nLetter:\n{_previous(previous, 'draft')}"),
        ]


class PriorAuthAgent(Agent):
    def result(self, outputs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """The review's decision, with the letter and the criteria it rests on."""
        return {
            "decision": outputs["review"]["decision"],
            "issues": outputs["review"]["issues"],
            "letter": outputs["draft"]["letter"],
            "criteria": outputs["policy_match"]["criteria"],
            "covered": outputs["benefit_check"]["covered"],
        }


def prior_auth_agent() -> Agent:
    return PriorAuthAgent(
        "prior_auth", PriorAuthInput,
        (ExtractCase(), CheckBenefit(), MatchPolicy(), DraftLetter(), ReviewLetter()),
    )
