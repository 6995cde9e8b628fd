"""The README's first commands: a venv made inside them, and CI running the test one verbatim."""

from __future__ import annotations

import re

from conftest import REPO


def _first_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)[1]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_readme_opens_with_a_run_and_a_test_command_in_a_fresh_venv():
    run, test = _first_commands()
    for command in (run, test):  # PEP 668: Debian's python3 refuses a bare `pip install`
        assert command.startswith('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"')
    assert run.endswith(".venv/bin/python runner.py")
    assert test.endswith(".venv/bin/python -m pytest")
    readme = (REPO / "README.md").read_text()
    first_screen = readme[: readme.index("## What you get")]
    assert (
        "open `save/report.html`" in first_screen and "--data-dir ../shared/mnist" in first_screen
    )


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = _first_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci
    assert ci[-1] == test  # last: its exit code is the script's
