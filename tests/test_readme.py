"""README's commands are the ones CI runs and the CLI knows."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r'^TEST_COMMAND="(.+)"$', ci, re.MULTILINE)
    assert command is not None
    assert command.group(1) in readme


def test_readme_configuration_table_lists_every_setting() -> None:
    from pipeline.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [name for name, _, _ in Settings.describe() if f"| {name} |" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
