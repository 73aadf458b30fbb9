"""The lifecycle tables drawn into a Markdown document, between markers it carries.

``python -m service.devtools.lifecycles docs/ARCHITECTURE.md`` rewrites, for each lifecycle, the text between
``<!-- lifecycle:<name> -->`` and ``<!-- /lifecycle:<name> -->``: a Mermaid state diagram and the
table of transitions. ``--check`` changes nothing and exits 1 when the document is out of date
(a unit test runs it), so the docs cannot drift from the tables the code moves states by.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from dedup.lifecycles.machine import Lifecycle


def lifecycles() -> Mapping[str, Lifecycle]:
    """Every lifecycle, by the name its markers use."""
    from dedup.lifecycles.parked import PARKED
    from dedup.lifecycles.task import TASK
    from dedup.lifecycles.tool_call import TOOL_CALL
    from service.llm.slots import SLOT

    return {"task": TASK, "tool-call": TOOL_CALL, "parked": PARKED, "window-slot": SLOT}


def section(machine: Lifecycle) -> str:
    """What stands between a lifecycle's markers: its states, its diagram and its table."""
    states = "\n".join(f"- `{name}`: {meaning}" for name, meaning in machine.states.items())
    return f"{states}\n\n```mermaid\n{machine.mermaid()}\n```\n\n{machine.table()}\n"


def render(document: str, machines: Mapping[str, Lifecycle] | None = None) -> str:
    """``document`` with every lifecycle's section rewritten; ``ValueError`` when a marker is missing."""
    machines = lifecycles() if machines is None else machines
    for name, machine in machines.items():
        pattern = re.compile(rf"(<!-- lifecycle:{re.escape(name)} -->\n).*?(<!-- /lifecycle:{re.escape(name)} -->)",
                             re.DOTALL)
        found = pattern.search(document)
        if found is None:
            raise ValueError(f"the document has no <!-- lifecycle:{name} --> ... <!-- /lifecycle:{name} --> markers")
        document = document[:found.end(1)] + section(machine) + document[found.start(2):]
    return document


def main(argv: list[str] | None = None) -> int:
    """``python -m service.devtools.lifecycles [--check] DOCUMENT``: draw the tables into DOCUMENT."""
    parser = argparse.ArgumentParser(prog="python -m service.devtools.lifecycles",
                                     description="Draw the lifecycle tables into a Markdown document.")
    parser.add_argument("document", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when out of date")
    args = parser.parse_args(argv)
    before = args.document.read_text()
    after = render(before)
    if after == before:
        return 0
    if args.check:
        print(f"{args.document} is out of date: run python -m service.devtools.lifecycles {args.document}",
              file=sys.stderr)
        return 1
    args.document.write_text(after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
