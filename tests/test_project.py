"""Promises the repository makes about itself: README set-up commands and CI agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None
    return [
        line
        for line in block.group(1).splitlines()
        if line and not line.startswith("#")
    ]


def test_readme_opens_with_two_setup_commands() -> None:
    """The README's first code block holds the install-and-run and test commands."""
    install, test = _readme_commands()
    assert "pip install ." in install
    assert "batchrun run samples/prompts.jsonl" in install
    assert "--provider mock" in install
    assert "pytest" in test


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """.ci/run's command is the README's test command, character for character."""
    _, test = _readme_commands()
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [
        line
        for line in script.splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == [test]
