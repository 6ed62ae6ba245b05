"""The README, the docs and CI agree with the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyroflows

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = pyroflows.list_flows()  # at collection, before any docstring example registers one


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.endswith("pyroflows demo")
    assert tests.endswith("pytest")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_registered_family_is_documented():
    readme = (ROOT / "README.md").read_text()
    docs = (ROOT / "docs" / "flows.md").read_text()
    for name in FAMILIES:
        assert f"`{name}`" in readme and f"`{name}`" in docs, name


def python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            blocks.append((f"{path.name}:{i}", code))
    return blocks


BLOCKS = python_blocks()


# Examples that train a model (5 to 15 s each) run in CI's slow set (pytest -m slow), to
# keep the default run within its ten minutes; the others run in both.
TRAINS = re.compile(r"svi\.step|\.fit\(|fit_reverse_kl\(|MCMC\(")


@pytest.mark.parametrize(
    "code",
    [pytest.param(c, marks=pytest.mark.slow) if TRAINS.search(c) else c for _, c in BLOCKS],
    ids=[n for n, _ in BLOCKS],
)
def test_documentation_examples_run(code, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
