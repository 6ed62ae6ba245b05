"""The console script: fit, sample, score and the demo, with errors that name the file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pyroflows.cli import main


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"x": rng.normal(size=300), "size": rng.lognormal(size=300), "n": rng.poisson(3, 300)}
    )
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    return frame, path


def test_fit_sample_score_round_trip(table, tmp_path, capsys):
    frame, data = table
    model = tmp_path / "model.pt"
    assert (
        main(
            [
                "fit",
                str(data),
                "--out",
                str(model),
                "--epochs",
                "5",
                "--quiet",
                "--seed",
                "0",
                "-o",
                "layers=2",
                "-o",
                "hidden=(16, 16)",
                "--support",
                "size=positive",
            ]
        )
        == 0
    )
    assert "fitted realnvp to 300 rows x 3 columns" in capsys.readouterr().err
    samples_path = tmp_path / "samples.parquet"
    assert main(["sample", str(model), "-n", "50", "--out", str(samples_path), "--seed", "1"]) == 0
    samples = pd.read_parquet(samples_path)
    assert list(samples.columns) == ["x", "size", "n"] and len(samples) == 50
    assert samples["n"].dtype == frame["n"].dtype
    scores_path = tmp_path / "scores.csv"
    assert main(["score", str(model), str(data), "--out", str(scores_path)]) == 0
    scores = pd.read_csv(scores_path)
    assert list(scores.columns) == ["log_prob"] and len(scores) == 300
    assert np.isfinite(scores["log_prob"]).all()
    assert "mean log-likelihood" in capsys.readouterr().err


def test_sample_to_stdout(table, tmp_path, capsys):
    _, data = table
    model = tmp_path / "model.pt"
    main(["fit", str(data), "--out", str(model), "--epochs", "2", "--quiet"])
    capsys.readouterr()
    assert main(["sample", str(model), "-n", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "x,size,n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "missing.csv", "--out", "m.pt"], "no such file: 'missing.csv'"),
        (["score", "missing.pt", "data.csv"], "no model file at 'missing.pt'"),
    ],
)
def test_missing_files_are_named(args, message, capsys):
    assert main(args) == 1
    assert message in capsys.readouterr().err


def test_unreadable_and_unknown_files_are_named(tmp_path, capsys):
    broken = tmp_path / "broken.parquet"
    broken.write_text("this is not parquet")
    assert main(["fit", str(broken), "--out", str(tmp_path / "m.pt")]) == 1
    assert f"could not read '{broken}' as parquet" in capsys.readouterr().err
    other = tmp_path / "data.txt"
    other.write_text("x\n1\n")
    assert main(["fit", str(other), "--out", str(tmp_path / "m.pt")]) == 1
    assert "unknown file type '.txt'" in capsys.readouterr().err


def test_bad_table_content_is_named(tmp_path, capsys):
    path = tmp_path / "data.csv"
    pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0, 5.0], "name": list("abcde")}).to_csv(path, index=False)
    assert main(["fit", str(path), "--out", str(tmp_path / "m.pt"), "--quiet"]) == 1
    assert "column 'name' is not numeric" in capsys.readouterr().err


def test_demo_prints_the_flow_and_both_baselines(tmp_path, capsys):
    assert main(["demo", "--epochs", "3", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "113 held-out rows" in out
    assert "pyroflows realnvp" in out and "Gaussian (full covariance)" in out
    assert "Gaussian mixture" in out
    assert (tmp_path / "samples_vs_data.png").is_file() and (tmp_path / "loss.png").is_file()


def test_unknown_flow_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--flow", "nvp"])
    assert "invalid choice: 'nvp'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fit", "sample", "score", "demo"])
def test_python_dash_m_has_help_for_each_command(command):
    result = subprocess.run(
        [sys.executable, "-m", "pyroflows", command, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "usage: pyroflows " + command in result.stdout
