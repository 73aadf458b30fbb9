"""docs/ARCHITECTURE.md draws the lifecycle tables the code moves states by, and cannot drift from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from dedup.lifecycles import Lifecycle, Transition
from service.devtools.lifecycles import lifecycles, main, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


def test_the_document_shows_the_tables_as_they_are() -> None:
    assert main(["--check", str(DOC)]) == 0, "run: python -m service.devtools.lifecycles docs/ARCHITECTURE.md"


def test_every_transition_appears_in_the_document() -> None:
    text = DOC.read_text()
    for machine in lifecycles().values():
        for t in machine.transitions:
            assert f"| {t.source} | `{t.event}` |" in text


def test_a_changed_table_makes_the_document_out_of_date(tmp_path: Path) -> None:
    machine = Lifecycle("door", "new", {"open": "open", "shut": "shut"},
                        (Transition("new", "build", "open"), Transition("open", "close", "shut")))
    doc = "# d\n<!-- lifecycle:door -->\nold\n<!-- /lifecycle:door -->\n"
    drawn = render(doc, {"door": machine})
    assert "open --> shut: close" in drawn and "old" not in drawn
    assert render(drawn, {"door": machine}) == drawn
    wider = Lifecycle("door", "new", {"open": "open", "shut": "shut"},
                      (*machine.transitions, Transition("shut", "open", "open")))
    assert render(drawn, {"door": wider}) != drawn


def test_a_document_without_markers_is_refused() -> None:
    machine = Lifecycle("door", "new", {"open": "open"}, (Transition("new", "build", "open"),))
    with pytest.raises(ValueError, match="lifecycle:door"):
        render("# nothing here\n", {"door": machine})
