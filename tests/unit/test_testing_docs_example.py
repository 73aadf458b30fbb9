"""docs/AGENTS.md's "Testing your agent" example runs as written: its pytest module, extracted from
the page, passes under pytest (every test in it), and fails when the harness disagrees with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def example() -> str:
    text = (REPO / "docs" / "AGENTS.md").read_text()
    start = text.index("\n## Testing your agent\n")
    section = text[start:text.index("\n## ", start + 1)]
    (code,) = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert code.startswith("# test_triage.py\n")
    return code


def pytest_on(code: str, folder: Path) -> subprocess.CompletedProcess[str]:
    (folder / "test_triage.py").write_text(code)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_triage.py"],
                          cwd=folder, capture_output=True, text=True, timeout=300, check=False)


def test_the_example_passes_as_written(tmp_path: Path) -> None:
    done = pytest_on(example(), tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^4 passed", done.stdout.splitlines()[-1]), done.stdout


def test_the_example_fails_when_its_claim_is_wrong(tmp_path: Path) -> None:
    wrong = example().replace('assert outcome.step("route").attempts == 2', 'assert outcome.step("route").attempts == 1')

    done = pytest_on(wrong, tmp_path)

    assert done.returncode == 1
    assert re.search(r"^1 failed, 3 passed", done.stdout.splitlines()[-1]), done.stdout
