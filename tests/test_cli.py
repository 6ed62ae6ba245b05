"""The console script: fit, sample, score and the demo, with errors that name the file,
and nothing lost: no input or existing file replaced unasked, no half-written file."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pyroflows.cli import main, parser
from pyroflows.density.estimator import DensityEstimator, density_families
from pyroflows.transforms.registry import list_flows


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
    assert re.search(r"fitted (nsf|realnvp) to 300 rows x 3 columns", capsys.readouterr().err)
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
def test_missing_files_are_named(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
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
    assert re.search(r"pyroflows (nsf|realnvp) \(", out) and "Gaussian (full covariance)" in out
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
    assert ("--force" in result.stdout) == (command != "demo")


# ------------------------------------------------------------------ nothing lost


@pytest.fixture
def model(table, tmp_path):
    """A model file fitted to ``table``."""
    _, data = table
    path = tmp_path / "model.pt"
    assert main(["fit", str(data), "--out", str(path), "--epochs", "2", "--quiet"]) == 0
    return path


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"pyroflows {command}: error: ") and err.count("\n") == 1, err
    return err


def _full_disk(*args, **kwargs):
    """A writer that gets half a file out and then finds the disk full."""
    destination = next(a for a in args if isinstance(a, str))
    with open(destination, "w") as handle:
        handle.write("x,si")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_fit_refuses_to_write_over_its_data_even_with_force(table, tmp_path, capsys):
    _, data = table
    before = data.read_bytes()
    for spelling in [str(data), str(tmp_path / "." / "data.csv")]:
        assert main(["fit", str(data), "--out", spelling, "--force", "--quiet"]) == 1
        err = _one_line_error(capsys, "fit")
        assert f"--out '{spelling}' is the input file '{data}'" in err
        assert "even with --force" in err
    assert data.read_bytes() == before


def test_score_refuses_to_write_over_its_input_even_with_force(table, model, tmp_path, capsys):
    _, data = table
    before = data.read_bytes()
    link = tmp_path / "link.csv"
    link.symlink_to(data)
    for out in [data, link]:
        assert main(["score", str(model), str(data), "--out", str(out), "--force"]) == 1
        assert f"is the input file '{data}'" in _one_line_error(capsys, "score")
    assert data.read_bytes() == before


@pytest.mark.parametrize("command", ["fit", "sample", "score"])
def test_an_existing_out_is_replaced_only_with_force(table, model, tmp_path, capsys, command):
    _, data = table
    out = tmp_path / ("new.pt" if command == "fit" else "out.csv")
    out.write_text("keep me")
    args = {
        "fit": ["fit", str(data), "--epochs", "2", "--quiet"],
        "sample": ["sample", str(model), "-n", "4"],
        "score": ["score", str(model), str(data)],
    }[command] + ["--out", str(out)]
    assert main(args) == 1
    err = _one_line_error(capsys, command)
    assert f"'{out}' already exists; pass --force to replace it" in err
    assert out.read_text() == "keep me"
    assert main([*args, "--force"]) == 0
    assert out.read_bytes() != b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"data.csv", "model.pt", out.name})


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("missing/model.pt", "there is no folder '{tmp}/missing'; create it first"),
        ("model.csv", "--out '{tmp}/model.csv': unknown model file type '.csv'; use .pt or .pth"),
        ("folder.pt", "cannot write '{tmp}/folder.pt': it is a folder"),
        ("locked/model.pt", "the folder '{tmp}/locked' is read-only"),
    ],
    ids=["missing folder", "unknown suffix", "a folder", "read-only folder"],
)
def test_fit_checks_its_out_before_fitting(table, tmp_path, monkeypatch, capsys, out, message):
    _, data = table
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: Path(p).name != "locked" and real_access(p, mode)
    )

    def no_fitting(*args, **kwargs):
        raise AssertionError("the fit ran before --out was checked")

    monkeypatch.setattr(DensityEstimator, "fit", no_fitting)
    assert main(["fit", str(data), "--out", str(tmp_path / out), "--quiet"]) == 1
    assert message.format(tmp=tmp_path) in _one_line_error(capsys, "fit")


@pytest.mark.parametrize("command", ["sample", "score"])
def test_sample_and_score_check_their_out_before_loading(
    table, model, tmp_path, monkeypatch, capsys, command
):
    _, data = table

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(DensityEstimator, "load", no_loading)
    inputs = [str(model), "-n", "3"] if command == "sample" else [str(model), str(data)]
    for out, message in [
        (tmp_path / "missing" / "out.csv", "there is no folder"),
        (tmp_path / "out.txt", "unknown file type '.txt'; use .csv or .parquet"),
        (tmp_path / "out.pt", "unknown file type '.pt'"),
        (model, f"is the input file '{model}'"),
    ]:
        assert main([command, *inputs, "--out", str(out), "--force"]) == 1
        assert message in _one_line_error(capsys, command)


def test_a_model_file_created_during_the_fit_is_not_replaced(table, tmp_path, monkeypatch, capsys):
    _, data = table
    out = tmp_path / "model.pt"
    fit = DensityEstimator.fit

    def fit_while_someone_writes(self, *args, **kwargs):
        history = fit(self, *args, **kwargs)
        out.write_text("another model")
        return history

    monkeypatch.setattr(DensityEstimator, "fit", fit_while_someone_writes)
    assert main(["fit", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 1
    assert "was created while fitting; pass --force to replace it" in _one_line_error(
        capsys, "fit"
    )
    assert out.read_text() == "another model"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_write_that_fails_partway_keeps_the_old_file(
    table, model, tmp_path, monkeypatch, capsys, suffix
):
    out = tmp_path / f"samples{suffix}"
    assert main(["sample", str(model), "-n", "5", "--out", str(out)]) == 0
    good = out.read_bytes()
    monkeypatch.setattr(pd.DataFrame, "to_csv" if suffix == ".csv" else "to_parquet", _full_disk)
    assert main(["sample", str(model), "-n", "5", "--out", str(out), "--force"]) == 1
    assert "No space left on device" in _one_line_error(capsys, "sample")
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "model.pt", out.name]


def test_a_model_write_that_fails_partway_keeps_the_old_model(
    table, model, tmp_path, monkeypatch, capsys
):
    _, data = table
    good = model.read_bytes()
    monkeypatch.setattr(torch, "save", _full_disk)
    args = ["fit", str(data), "--out", str(model), "--force", "--epochs", "1", "--quiet"]
    assert main(args) == 1
    assert "No space left on device" in _one_line_error(capsys, "fit")
    assert model.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "model.pt"]


def test_parquet_in_and_out(table, tmp_path):
    frame, _ = table
    data = tmp_path / "data.parquet"
    frame.to_parquet(data, index=False)
    model = tmp_path / "model.pt"
    fit = ["fit", str(data), "--out", str(model), "--epochs", "2", "--quiet", "--seed", "0"]
    assert main(fit) == 0
    scores = tmp_path / "scores.parquet"
    assert main(["score", str(model), str(data), "--out", str(scores)]) == 0
    expected = DensityEstimator.load(model).log_prob(frame).to_numpy()
    np.testing.assert_allclose(pd.read_parquet(scores)["log_prob"].to_numpy(), expected)
    samples = tmp_path / "samples.pq"
    assert main(["sample", str(model), "-n", "7", "--out", str(samples)]) == 0
    drawn = pd.read_parquet(samples)
    assert drawn.dtypes.to_dict() == frame.dtypes.to_dict() and len(drawn) == 7


def test_model_file_problems_are_one_line_errors(table, model, tmp_path, capsys):
    _, data = table
    saved = torch.load(model, weights_only=True)
    del saved["schema"]
    torch.save(saved, tmp_path / "incomplete.pt")
    saved = torch.load(model, weights_only=True)
    key = next(k for k, v in saved["state"].items() if v.is_floating_point() and v.numel())
    saved["state"][key].view(-1)[0] = float("nan")
    torch.save(saved, tmp_path / "nan.pt")
    for name, message in [
        ("incomplete.pt", "it has no 'schema' entry"),
        ("nan.pt", f"its parameter '{key}' has NaN or inf values"),
    ]:
        assert main(["score", str(tmp_path / name), str(data)]) == 1
        err = _one_line_error(capsys, "score")
        assert f"'{tmp_path / name}'" in err and message in err


def test_values_that_overflow_float32_are_refused_naming_the_column(
    table, model, tmp_path, capsys
):
    frame, _ = table
    big = frame.copy()
    big.loc[3, "x"] = 1e39
    big.to_csv(tmp_path / "big.csv", index=False)
    assert main(["score", str(model), str(tmp_path / "big.csv")]) == 1
    err = _one_line_error(capsys, "score")
    assert "column 'x' has values too large for float32" in err and "1e+39 at row 3" in err


def test_flow_choices_are_the_families_the_estimator_takes(capsys):
    accepted = density_families()
    refused = sorted(set(list_flows()) - set(accepted))
    assert {"iaf", "planar", "sylvester"} <= set(refused) and "realnvp" in accepted
    for name in accepted:
        assert parser().parse_args(["fit", "d.csv", "--out", "m.pt", "--flow", name]).flow == name
        assert parser().parse_args(["demo", "--flow", name]).flow == name
    for name in refused:
        for args in (["fit", "d.csv", "--out", "m.pt"], ["demo"]):
            with pytest.raises(SystemExit):
                parser().parse_args([*args, "--flow", name])
            assert re.search(f"invalid choice: '?{name}'?", capsys.readouterr().err)
