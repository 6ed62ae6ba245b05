"""scikit-learn, matplotlib and pyarrow are extras: ``import pyroflows`` loads none of them,
the core works without them, and what needs one says which extra installs it."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pyroflows.cli import main
from pyroflows.density.baselines import gaussian_loglik, mixture_loglik
from pyroflows.density.estimator import DensityEstimator

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("sklearn", "matplotlib", "pyarrow")  # imported names of the optional packages


def _loaded_after(code: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after running ``code`` in a new Python."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


def _block(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``import package`` (and its submodules) fail, as when it is not installed."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


@pytest.mark.parametrize(
    "module", ["pyroflows", "pyroflows.cli", "pyroflows.density.baselines", "pyroflows.demo"]
)
def test_importing_loads_no_optional_package(module):
    loaded = _loaded_after(f"import {module}")
    for package in ("sklearn", "matplotlib"):
        assert not [m for m in loaded if m.split(".")[0] == package], package
    # pandas imports pyarrow by itself when it is installed; pyroflows must add nothing
    with_pandas = _loaded_after("import pandas")
    assert {m for m in loaded if m.split(".")[0] == "pyarrow"} <= with_pandas
    if module != "pyroflows.demo":
        assert "pyroflows.demo" not in loaded


def test_only_the_demo_command_imports_the_demo_module():
    importers = []
    for path in sorted((ROOT / "pyroflows").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            if "pyroflows.demo" in names:
                importers.append(path.relative_to(ROOT).as_posix())
    assert importers == ["pyroflows/cli.py"]


def test_the_core_and_the_csv_command_line_work_without_any_extra(tmp_path):
    rng = np.random.default_rng(0)
    pd.DataFrame({"x": rng.normal(size=100), "y": rng.normal(size=100)}).to_csv(
        tmp_path / "data.csv", index=False
    )
    script = textwrap.dedent(
        f"""
        import sys
        for name in {EXTRAS!r}:
            sys.modules[name] = None  # as if not installed
        from pyroflows.cli import main
        steps = [
            ["fit", "data.csv", "--out", "model.pt", "--epochs", "2", "--quiet"],
            ["score", "model.pt", "data.csv", "--out", "scores.csv"],
            ["sample", "model.pt", "-n", "5", "--out", "samples.csv"],
        ]
        for step in steps:
            assert main(step) == 0, step
        assert not [m for m in sys.modules if m.split(".")[0] in {EXTRAS!r} and sys.modules[m]]
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "scores.csv")) == 100
    assert len(pd.read_csv(tmp_path / "samples.csv")) == 5


@pytest.fixture
def tables(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=60), "y": rng.normal(size=60)})
    frame.to_parquet(tmp_path / "data.parquet")
    frame.to_csv(tmp_path / "data.csv", index=False)
    fit = ["fit", str(tmp_path / "data.csv"), "--out", str(tmp_path / "m.pt"), "--epochs", "1"]
    assert main([*fit, "--quiet"]) == 0
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "data.parquet", "--out", "new.pt"], "reading Parquet needs pyarrow"),
        (["score", "m.pt", "data.parquet"], "reading Parquet needs pyarrow"),
        (["score", "m.pt", "data.csv", "--out", "s.parquet"], "writing Parquet needs pyarrow"),
        (["sample", "m.pt", "-n", "3", "--out", "s.pq"], "writing Parquet needs pyarrow"),
    ],
    ids=["fit from parquet", "score parquet", "score to parquet", "sample to parquet"],
)
def test_parquet_without_pyarrow_names_the_extra(tables, monkeypatch, capsys, args, message):
    capsys.readouterr()
    _block(monkeypatch, "pyarrow")
    args = [str(tables / a) if i and "." in a else a for i, a in enumerate(args)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == f"pyroflows {args[0]}: error: {message}: pip install 'pyroflows[parquet]'\n"
    assert not [p for p in tables.iterdir() if p.name.startswith(("new", "s."))]


@pytest.mark.parametrize(
    "args",
    [["score", "m.pt", "data.csv"], ["sample", "m.pt", "-n", "3"]],
    ids=["score", "sample"],
)
def test_a_parquet_out_without_pyarrow_is_refused_before_loading(
    tables, monkeypatch, capsys, args
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(DensityEstimator, "load", no_loading)
    _block(monkeypatch, "pyarrow")
    args = [str(tables / a) if "." in a else a for a in args]
    assert main([*args, "--out", str(tables / "out.parquet")]) == 1
    assert "writing Parquet needs pyarrow" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("blocked", "package"), [("sklearn", "scikit-learn"), ("matplotlib",) * 2]
)
def test_the_demo_without_its_extra_names_it_before_any_work(
    tmp_path, monkeypatch, capsys, blocked, package
):
    _block(monkeypatch, blocked)
    figures = tmp_path / "figures"
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(figures)]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"pyroflows demo: error: the demo needs {package}: pip install 'pyroflows[demo]'\n"
    )
    assert not figures.exists()  # it failed before fitting


def test_the_mixture_baseline_without_scikit_learn_names_the_extra(monkeypatch):
    _block(monkeypatch, "sklearn")
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 2))
    assert gaussian_loglik(train, train[:3]).shape == (3,)  # numpy only
    message = (
        "the Gaussian mixture baseline needs scikit-learn: pip install 'pyroflows[baselines]'"
    )
    with pytest.raises(ImportError, match=re.escape(message)) as error:
        mixture_loglik(train, train[:3])
    assert isinstance(error.value.__cause__, ImportError)  # the original error is kept


def _project() -> dict:
    """The ``[project]`` table of pyproject.toml (tomllib: the standard library from 3.11)."""
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_pyproject_declares_the_extras():
    project = _project()
    core = _names(project["dependencies"])
    # scipy: arviz requires it anyway, and the guides' start runs its L-BFGS-B
    assert core == {"torch", "pyro-ppl", "numpy", "pandas", "arviz", "tqdm", "scipy"}
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert extras["plot"] == {"matplotlib"}
    assert extras["parquet"] == {"pyarrow"}
    assert extras["baselines"] == {"scikit-learn"}
    assert extras["demo"] == {"scikit-learn", "matplotlib"}
    assert extras["cnf"] == {"torchdiffeq"}
    parts = ("plot", "parquet", "baselines", "demo", "cnf")
    assert extras["all"] == set().union(*(extras[name] for name in parts))
    assert extras["test"] >= extras["all"] | {"pytest", "hypothesis", "ruff"}


def test_every_extra_named_in_an_error_exists_and_has_the_package():
    project = _project()
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    calls = []
    for path in sorted((ROOT / "pyroflows").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "import_extra":
                keywords = {k.arg: k.value for k in node.keywords}
                package, extra = keywords.get("package"), keywords.get("extra")
                if isinstance(package, ast.Constant) and isinstance(extra, ast.Constant):
                    calls.append((package.value, extra.value))
                    assert package.value.lower() in extras[extra.value], (path, package.value)
    assert {("pyarrow", "parquet"), ("scikit-learn", "baselines")} <= set(calls)


def test_the_readme_main_job_installs_what_the_demo_needs():
    project = _project()
    readme = (ROOT / "README.md").read_text()
    main_job = next(line for line in readme.splitlines() if line.endswith("pyroflows demo"))
    installed = re.search(r"pip install -e '?\.\[([\w,]+)\]'?", main_job)
    assert installed, main_job
    extras = project["optional-dependencies"]
    packages = set().union(*(_names(extras[name]) for name in installed.group(1).split(",")))
    assert {"scikit-learn", "matplotlib"} <= packages
