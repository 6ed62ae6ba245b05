"""Every tutorial runs start to finish (in quick mode: few steps) and writes its figures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

HERE = Path(__file__).resolve().parents[1] / "tutorials"
TUTORIALS = sorted(HERE.glob("*.py"))
# The figures each tutorial writes; a new tutorial lists its own here.
FIGURES = {
    "01_flows_in_pyro": ["01_moons.png"],
    "02_variational_inference": ["02_eight_schools_tau.png", "02_energies.png"],
    "03_tabular_density": ["03_anomaly_scores.png", "03_samples.png"],
    "04_your_own_family": ["04_sinh_arcsinh.png"],
    "05_neutra": ["05_funnel.png"],
    "06_flow_matching": ["06_path.png"],
}


# All but the newest run in CI's slow set (pytest -m slow), to keep the default run within
# its ten minutes.
SLOW = {
    "01_flows_in_pyro",
    "02_variational_inference",
    "03_tabular_density",
    "04_your_own_family",
    "05_neutra",
}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in TUTORIALS],
    ids=[p.stem for p in TUTORIALS],
)
def test_tutorial_runs_and_writes_its_figures_where_it_is_told(path, tmp_path):
    assert path.stem in FIGURES, f"list the figures of {path.name} in FIGURES"
    out = tmp_path / "figures"  # not there yet: the tutorial makes it
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "PYROFLOWS_QUICK": "1",  # few steps
        "PYROFLOWS_OUTPUT": str(out),
    }
    start = time.time()
    result = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == FIGURES[path.stem]
    for name in FIGURES[path.stem]:
        figure = out / name
        assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
        image = matplotlib.image.imread(figure)
        assert min(image.shape[:2]) >= 100 and image.std() > 0.01, name  # drawn, not blank
        default = HERE / "output" / name  # and nothing written to the default folder
        assert not default.exists() or default.stat().st_mtime < start, name
