"""The main job on bundled data: a flow density of a real table against two baselines.

The table is the Wisconsin breast cancer data that scikit-learn ships (569 rows, 30
positive, skewed, strongly correlated columns; no download). A fifth of the rows is held
out; the flow (:class:`~pyroflows.DensityEstimator`), a full-covariance Gaussian and a
Gaussian mixture with a validated number of components are fitted to the rest, and each
scores the held-out rows in nats per row in the data's own units.

Only ``pyroflows demo`` imports this module. It needs scikit-learn and matplotlib, the
``demo`` extra (``pip install 'pyroflows[demo]'``), imported when the demo runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pyroflows._io import import_extra, write_atomically
from pyroflows.density.baselines import gaussian_loglik, mixture_loglik
from pyroflows.density.estimator import DensityEstimator

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PAIR_COLUMNS = ["mean radius", "mean texture", "worst concavity", "worst area"]


@dataclass(frozen=True)
class DemoResult:
    """Held-out mean log-likelihoods (nats per row, data units) and where the figures went."""

    flow: str  # the family trained, and the model chosen (the flow, the blend, ...)
    flow_loglik: float
    gaussian_loglik: float
    mixture_loglik: float
    mixture_components: int
    epochs: int
    test_rows: int
    figures: list[Path]


def load_table() -> pd.DataFrame:
    """The breast cancer table without its label column (needs scikit-learn).

    Example:
        >>> load_table().shape
        (569, 30)
    """
    datasets = _demo_extra("sklearn.datasets", "scikit-learn")
    return datasets.load_breast_cancer(as_frame=True).frame.drop(columns=["target"])


def run_demo(
    flow: str = "auto",
    *,
    out: str | Path = "pyroflows-demo",
    seed: int = 0,
    epochs: int = 1000,
    progress: bool = True,
) -> DemoResult:
    """Fit ``flow`` and the baselines on 80% of the rows, score the other 20%, draw figures.

    The figures (``samples_vs_data.png``, ``loss.png``) go to the folder ``out``, made if
    missing; figures of an earlier run there are replaced. scikit-learn and matplotlib are
    looked for first, so a missing one fails at once (naming ``pyroflows[demo]``), not
    after the fit.

    Example:
        >>> import tempfile
        >>> result = run_demo(out=tempfile.mkdtemp(), epochs=2, progress=False)
        >>> result.test_rows, len(result.figures)
        (113, 2)
    """
    _demo_extra("matplotlib.figure", "matplotlib")
    frame = load_table()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(frame))
    n_test = len(frame) // 5
    test, fit = frame.iloc[order[:n_test]], frame.iloc[order[n_test:]]

    estimator = DensityEstimator(flow, epochs=epochs, seed=seed, progress=progress)
    history = estimator.fit(fit)
    flow_loglik = estimator.score(test)
    gaussian = gaussian_loglik(fit.to_numpy(), test.to_numpy()).mean()
    mixture, components = mixture_loglik(fit.to_numpy(), test.to_numpy(), seed=seed)

    figures = [
        _pair_plot(test, estimator.sample(len(test)), out / "samples_vs_data.png"),
        _loss_curve(history, out / "loss.png"),
    ]
    chosen = estimator.report.index[estimator.report["chosen"]][0]
    return DemoResult(
        f"{estimator.flow_family} ({chosen})",
        flow_loglik,
        float(gaussian),
        float(mixture.mean()),
        components,
        len(history),
        n_test,
        figures,
    )


def _pair_plot(data: pd.DataFrame, samples: pd.DataFrame, path: Path) -> Path:
    k = len(PAIR_COLUMNS)
    fig = _figure(figsize=(2.6 * k, 2.6 * k))
    axes = fig.subplots(k, k)
    for i, row in enumerate(PAIR_COLUMNS):
        for j, col in enumerate(PAIR_COLUMNS):
            ax = axes[i, j]
            if i == j:
                bins = np.histogram_bin_edges(data[col], bins=20)
                ax.hist(data[col], bins=bins, alpha=0.5, density=True, label="held-out data")
                ax.hist(samples[col], bins=bins, alpha=0.5, density=True, label="flow samples")
            else:
                ax.scatter(data[col], data[row], s=4, alpha=0.6, label="held-out data")
                ax.scatter(samples[col], samples[row], s=4, alpha=0.6, label="flow samples")
            if i == k - 1:
                ax.set_xlabel(col)
            if j == 0:
                ax.set_ylabel(row)
    axes[0, 0].legend(fontsize=7)
    return _save_png(fig, path, dpi=70)


def _loss_curve(history: pd.DataFrame, path: Path) -> Path:
    fig = _figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(history["epoch"], history["train_loss"], label="train")
    ax.plot(history["epoch"], history["valid_loss"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative log-likelihood (nats per row)")
    ax.legend()
    return _save_png(fig, path, dpi=80)


def _demo_extra(module: str, package: str) -> ModuleType:
    return import_extra(module, purpose="the demo", package=package, extra="demo")


def _figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib ``Figure`` of its own (no pyplot: no global backend or figure state)."""
    return _demo_extra("matplotlib.figure", "matplotlib").Figure(figsize=figsize)


def _save_png(fig: Figure, path: Path, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``path``, replacing an older figure in one step."""
    fig.tight_layout()
    write_atomically(
        path, lambda temporary: fig.savefig(temporary, format="png", dpi=dpi), overwrite=True
    )
    return path
