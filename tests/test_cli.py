"""The console script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyroflows.cli import main


def test_demo_prints_flow_and_gaussian_logliks(capsys):
    assert main(["demo", "--epochs", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "113 held-out rows" in out
    assert "realnvp" in out and "gaussian" in out


def test_demo_refuses_an_unknown_flow(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--flow", "nvp"])
    assert "invalid choice: 'nvp'" in capsys.readouterr().err


def test_python_dash_m_runs_the_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "pyroflows", "demo", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--flow" in result.stdout
