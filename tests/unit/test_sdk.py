"""``service.sdk`` is the public surface: exactly the names in ``__all__``, each one there and documented."""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import service.sdk as sdk

SOURCE = Path(sdk.__file__).read_text()


def test_all_is_exactly_the_public_names() -> None:
    # its submodules (service.sdk.testing, once imported) are modules of their own, with their own __all__
    public = sorted(name for name, value in vars(sdk).items()
                    if not name.startswith("_") and not isinstance(value, types.ModuleType))
    assert sorted(sdk.__all__) == public


def test_every_name_in_all_exists() -> None:
    missing = [name for name in sdk.__all__ if not hasattr(sdk, name)]
    assert not missing


def test_every_name_is_documented_in_the_module_docstring() -> None:
    documented = set(re.findall(r"^- ``(\w+)``: \S", sdk.__doc__ or "", flags=re.M))
    assert documented == set(sdk.__all__)


def test_all_is_a_sorted_literal() -> None:
    tree = ast.parse(SOURCE)
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and
                any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    names = ast.literal_eval(value)
    assert names == sorted(names, key=lambda n: (n[0].islower(), n))


def test_the_docstring_example_runs() -> None:
    from pydantic import BaseModel

    class TriageOutput(BaseModel):
        queue: str

    class TicketInput(sdk.StrictInput):
        text: str

    class Triage(sdk.Step):
        name, prompt_version, output_model = "triage", "triage-v1", TriageOutput

        def messages(self, task_input: BaseModel, previous: object) -> sdk.Messages:
            assert isinstance(task_input, TicketInput)
            return [sdk.system_message("Triage the ticket."), sdk.user_message(task_input.text)]

    agents = sdk.default_agents()
    agents.register(sdk.Agent("triage", TicketInput, (Triage(),)))
    agent = agents.get("triage")
    parsed = agent.parse_input({"text": "printer on fire"})
    assert agent.steps[0].messages(parsed, {})[1] == {"role": "user", "content": "printer on fire"}
    assert agent.steps[0].parse(parsed, '{"queue": "facilities"}') == {"queue": "facilities"}
