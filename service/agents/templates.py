"""The templates of kinds declared in a file (:mod:`service.agents.declared`): a prompt's, and a
delegating step's child inputs (:mod:`service.agents.declared_delegate`).

A placeholder is ``{name}``: an input field is its value, a string as it is and anything else as
JSON (an absent optional field is empty); a needed step is its output as JSON. ``{{`` and ``}}``
are literal braces. Nothing else goes between braces.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

STEP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")

Template = tuple[tuple[str, str | None], ...]  # (literal text, then a placeholder or None)


class DeclaredInput(BaseModel):
    """A declared kind's task input, validated against its input JSON Schema."""

    model_config = ConfigDict(frozen=True)
    data: dict[str, Any]


def parse_template(text: str) -> Template:
    """The pieces of a template. Raises ``ValueError`` for unbalanced braces, an empty placeholder,
    or anything but a bare name between braces (no ``!r``, ``:spec``, ``.attr`` or ``[index]``)."""
    pieces: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:  # a lone brace
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append((literal, None))
            continue
        if not name or spec or conversion or not STEP_NAME.fullmatch(name):
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"placeholder {{{shown}}} is not a name (write {{{{ and }}}} for literal braces)")
        pieces.append((literal, name))
    return tuple(pieces)


def placeholders(template: Template) -> list[str]:
    return [name for _, name in template if name is not None]


def unknown_placeholder(template: Template, fields: Collection[str], readable: Collection[str],
                        steps: Collection[str], here: str) -> str | None:
    """Why a placeholder of ``template`` names neither an input field nor a needed step (None: all do)."""
    for name in placeholders(template):
        if name not in fields and name not in readable:
            hint = f" (add it to {here}.needs)" if name in steps else ""
            return f"placeholder {{{name}}} is neither an input field nor a needed step{hint}"
    return None


def render(template: Template, fields: Collection[str], data: Mapping[str, Any], previous: Mapping[str, Any]) -> str:
    """The template filled: an input field's value (a string as it is, else JSON), a needed step's output
    as JSON (the loader made sure every other placeholder is one)."""
    out: list[str] = []
    for literal, name in template:
        out.append(literal)
        if name is None:
            continue
        if name in fields:
            value = data.get(name, "")
            out.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        else:
            out.append(json.dumps(previous[name], ensure_ascii=False))
    return "".join(out)
