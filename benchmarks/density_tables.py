"""Held-out log-likelihood and fit time of tabular density estimators, table by table.

What is measured: for each table, seed and method, the mean log-density of the test rows
(nats per row, higher is better) and the seconds the fit took, model selection included.
For the four synthetic tables, whose density p is known exactly, the gap
KL(p || q) = mean over test rows of log p(x) - log q(x) is reported too (lower is better,
0 is the limit); both terms are in the same standardised units.

Tables (all float64):

- ``cancer``: scikit-learn's breast cancer table, 569 x 30, ``log1p`` of every column
  (all values are >= 0, several are 0);
- ``wine``: 178 x 13, raw values;
- ``diabetes``: 442 x 10, the scaled version scikit-learn ships, raw but for ``sex``,
  which holds two values only: it gets U(-g/2, g/2) noise (g the gap between the two
  values, fixed seed 0). Raw, a continuous density is rewarded without bound for a spike
  on each value: a GaussianMixture with reg_covar 1e-6 gains ~5 nats/row so, and wins;
- ``digits``: 1797 x 64 integer pixels, dequantised with U(0, 1) noise (fixed seed 0), and
  the 10 columns where >= 99% of the 1797 rows hold one value dropped (decided on the whole
  table, before splitting): 1797 x 54;
- ``iris``: 150 x 4, raw (measured to 0.1 cm, one duplicated row);
- ``mixture``: 8-D mixture of 6 Gaussians, 20,000 rows; means N(0, s^2 I) with s chosen
  so that two means lie ~3 apart on average, covariances with a random rotation and
  variances log-uniform in [0.05, 1], weights Dirichlet(5, ..., 5);
- ``banana``: 8-D, 10,000 rows, the density of ``density_peers.banana`` (pairs
  x ~ N(0, 1.5^2), y = x^2 / 2 + e / 2 with e ~ N(0, 1));
- ``student``: 10-D multivariate Student-t, 3 degrees of freedom, random scale matrix
  (random rotation, variances log-uniform in [0.2, 2]), 10,000 rows;
- ``funnel``: Neal's funnel in 5-D, v ~ N(0, 1.5^2) (Neal's 3 is not learnable from
  10,000 rows), x_1..4 | v ~ N(0, e^v), 10,000 rows.

The synthetic tables are drawn once (fixed seed); only the split changes with the seed.
``--check`` compares their exact log-densities with scipy / torch implementations.

Splits and units: per seed, a random 64% train / 16% validation / 20% test split of the
rows, the same for every method. Every column is standardised with the training rows'
mean and std, and every method is fitted and scored in these units; the known densities get
the log of the standardisation's Jacobian (sum of log std) added so that they are in the
same units.

Methods, each fitted on the training rows and tuned on the validation rows only (the
selected model, fitted on the training rows, is scored on the test rows; no refit):

- ``pyroflows``: ``pyroflows.DensityEstimator(seed=seed, progress=False)`` with its
  defaults, as a user calls it on the standardised frame: ``fit(train, valid=valid)`` if
  ``fit`` takes ``valid``, else ``fit(train + valid)``, which lets it draw its own
  validation rows (then its validation score is not held out and is left empty);
- ``gaussian``: full-covariance Gaussian, maximum likelihood on the training rows;
- ``gmm``: scikit-learn ``GaussianMixture`` (``n_init=3``, other settings default), over
  ``covariance_type`` in {full, diag, tied, spherical} x ``reg_covar`` in
  {1e-6, 1e-4, 1e-2} x 1..10 components (per type and reg, the components grow until two
  successive counts fail to beat the best validation score), best validation score wins;
- ``kde``: scikit-learn ``KernelDensity``, Gaussian kernel, bandwidth chosen on the
  validation rows over 20 log-spaced values from 0.05 to 2;
- ``zuko_realnvp``, ``zuko_maf``, ``zuko_nsf``: zuko's ``RealNVP``, ``MAF`` and ``NSF``
  (8 bins) with 5 transforms and hidden_features=(128, 128), other settings zuko's
  defaults; trained by AdamW (lr 1e-3, weight decay 1e-4), gradient norm clipped at 5,
  batches of min(256, max(16, n_train // 4)) rows in shuffled epochs, early stopping on the
  validation score (patience 30 epochs, at most 1000), best weights restored; float32.

Fit seconds are the wall time of the whole method: model selection (every GMM and KDE
candidate, every validation pass) and scoring the test rows included. Torch and the BLAS
pools use ``--threads`` threads (default 2); other work on the machine slows the fits a
lot (several times with 2 threads on 2 busy cores), so the CSV records the load average.
A method that raises is recorded with its error and the run goes on.

    python benchmarks/density_tables.py                      # all, 3 seeds
    python benchmarks/density_tables.py --quick              # smoke run: 1 seed, 2,000
                                                             # synthetic rows, 100 epochs
    python benchmarks/density_tables.py --tables iris wine --methods gmm kde --seeds 0 1
    python benchmarks/density_tables.py --check              # exact densities vs scipy/torch

Output: one CSV row per (table, seed, method) in ``--out`` (default
``benchmarks/results/density_tables.csv``, rewritten atomically after every table), and
markdown tables of mean +- std across seeds: the best mean in bold, and marked † the
others within one seed-std of the best (with 2 seeds or more). Run time: all methods but
pyroflows, 3 seeds, ``--threads 1``, took 27 minutes (4 for the five scikit-learn tables,
23 for the synthetic ones) with another job on the machine's second core; pyroflows adds
its own fits (1-20 s each in the quick run). ``--quick`` takes a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zuko
from common import timed
from scipy.special import gammaln, logsumexp
from scipy.stats import ortho_group
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity
from threadpoolctl import threadpool_limits

CPU = torch.device("cpu")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """Rows of one table, their column names, and the exact log-density if it is known."""

    rows: np.ndarray
    columns: list[str]
    log_p: Callable[[np.ndarray], np.ndarray] | None = None
    parameters: dict = field(default_factory=dict)  # of the known density, for --check


def gaussian_log_p(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """log N(x; mean, cov) row by row, through the Cholesky factor of ``cov``."""
    chol = np.linalg.cholesky(cov)
    white = np.linalg.solve(chol, (x - mean).T)
    half_log_det = np.log(np.diag(chol)).sum()
    return -0.5 * (white**2).sum(0) - half_log_det - x.shape[1] * HALF_LOG_2PI


def random_cov(dim: int, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """A randomly rotated covariance whose variances are log-uniform in [low, high]."""
    rotation = ortho_group.rvs(dim, random_state=rng)
    variances = np.exp(rng.uniform(np.log(low), np.log(high), size=dim))
    return (rotation * variances) @ rotation.T


def mixture(n: int, rng: np.random.Generator, dim: int = 8, k: int = 6) -> Table:
    """8-D mixture of 6 Gaussians with random means (~3 apart) and covariances."""
    means = rng.normal(scale=3 / math.sqrt(2 * dim), size=(k, dim))
    covs = np.stack([random_cov(dim, 0.05, 1.0, rng) for _ in range(k)])
    weights = rng.dirichlet(np.full(k, 5.0))
    component = rng.choice(k, size=n, p=weights)
    chols = np.linalg.cholesky(covs)
    rows = means[component] + np.einsum("nij,nj->ni", chols[component], rng.normal(size=(n, dim)))

    def log_p(x: np.ndarray) -> np.ndarray:
        parts = [np.log(w) + gaussian_log_p(x, m, c) for w, m, c in zip(weights, means, covs)]
        return logsumexp(np.stack(parts), axis=0)

    parameters = {"weights": weights, "means": means, "covs": covs}
    return Table(rows, [f"x{i}" for i in range(dim)], log_p, parameters)


def banana(n: int, rng: np.random.Generator, dim: int = 8) -> Table:
    """The density of ``density_peers.banana``: pairs x ~ N(0, 1.5^2), y = x^2 / 2 + e / 2.

    (x, e) -> (x, y) has Jacobian 1/2 in y, so log p = log N(x; 0, 1.5^2) + log N(e) + log 2.
    """
    x = rng.normal(0, 1.5, size=(n, dim // 2))
    e = rng.normal(size=(n, dim // 2))
    rows = np.empty((n, dim))
    rows[:, 0::2], rows[:, 1::2] = x, 0.5 * x**2 + 0.5 * e

    def log_p(rows: np.ndarray) -> np.ndarray:
        x, y = rows[:, 0::2], rows[:, 1::2]
        e = (y - 0.5 * x**2) / 0.5
        log_x = -HALF_LOG_2PI - math.log(1.5) - 0.5 * (x / 1.5) ** 2
        return (log_x - HALF_LOG_2PI - 0.5 * e**2 + math.log(2.0)).sum(1)

    return Table(rows, [f"{name}{i}" for i in range(dim // 2) for name in "xy"], log_p)


def student(n: int, rng: np.random.Generator, dim: int = 10, df: float = 3.0) -> Table:
    """Multivariate Student-t with ``df`` degrees of freedom and a random scale matrix.

    x = L z / sqrt(u / df), z ~ N(0, I), u ~ chi2(df), L L^T = S; with m = x^T S^-1 x,
    log p = lgamma((df + d)/2) - lgamma(df/2) - d/2 log(df pi) - 1/2 log|S|
    - (df + d)/2 log(1 + m / df).
    """
    scale = random_cov(dim, 0.2, 2.0, rng)
    chol = np.linalg.cholesky(scale)
    rows = (rng.normal(size=(n, dim)) @ chol.T) / np.sqrt(rng.chisquare(df, size=(n, 1)) / df)

    def log_p(x: np.ndarray) -> np.ndarray:
        m = (np.linalg.solve(chol, x.T) ** 2).sum(0)
        return (
            gammaln((df + dim) / 2)
            - gammaln(df / 2)
            - dim / 2 * math.log(df * math.pi)
            - np.log(np.diag(chol)).sum()
            - (df + dim) / 2 * np.log1p(m / df)
        )

    return Table(rows, [f"x{i}" for i in range(dim)], log_p, {"scale": scale, "df": df})


def funnel(n: int, rng: np.random.Generator, dim: int = 5, scale: float = 1.5) -> Table:
    """Neal's funnel: v ~ N(0, scale^2), x_i | v ~ N(0, e^v) for the other dim - 1 columns."""
    v = rng.normal(0, scale, size=(n, 1))
    x = rng.normal(size=(n, dim - 1)) * np.exp(v / 2)

    def log_p(rows: np.ndarray) -> np.ndarray:
        v, x = rows[:, :1], rows[:, 1:]
        log_v = -HALF_LOG_2PI - math.log(scale) - 0.5 * (v / scale) ** 2
        log_x = -HALF_LOG_2PI - v / 2 - 0.5 * x**2 * np.exp(-v)
        return (log_v.sum(1) + log_x.sum(1)).ravel()

    columns = ["v"] + [f"x{i}" for i in range(1, dim)]
    return Table(np.hstack([v, x]), columns, log_p, {"scale": scale})


def bundled(name: str) -> Table:
    """One of scikit-learn's bundled tables, preprocessed as the module doc says."""
    loader = {
        "cancer": load_breast_cancer,
        "wine": load_wine,
        "diabetes": load_diabetes,
        "digits": load_digits,
        "iris": load_iris,
    }[name]
    bunch = loader()
    rows, columns = bunch.data.astype(np.float64), [str(c) for c in bunch.feature_names]
    if name == "cancer":
        rows = np.log1p(rows)
    if name == "diabetes":
        sex = columns.index("sex")
        low, high = np.unique(rows[:, sex])
        rows[:, sex] += (high - low) * np.random.default_rng(0).uniform(-0.5, 0.5, len(rows))
    if name == "digits":
        share = np.array([np.unique(c, return_counts=True)[1].max() / len(c) for c in rows.T])
        keep = share < 0.99
        rows = rows[:, keep] + np.random.default_rng(0).uniform(size=(len(rows), keep.sum()))
        columns = [c for c, k in zip(columns, keep) if k]
    return Table(rows, columns)


SYNTHETIC = {
    "mixture": (mixture, 20_000),
    "banana": (banana, 10_000),
    "student": (student, 10_000),
    "funnel": (funnel, 10_000),
}
TABLES = ["cancer", "wine", "diabetes", "digits", "iris", *SYNTHETIC]


def load(name: str, quick: bool) -> Table:
    """A table by name; the synthetic ones have 2,000 rows with ``quick``."""
    if name in SYNTHETIC:
        make, n = SYNTHETIC[name]
        return make(2_000 if quick else n, np.random.default_rng(1234))
    return bundled(name)


@dataclass
class Split:
    """Standardised train / validation / test rows of one seed, and the log-Jacobian."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    log_jacobian: float  # log |d standardised / d raw| = -sum(log std)
    raw_test: np.ndarray


def split(rows: np.ndarray, seed: int) -> Split:
    """A random 64/16/20 split, standardised with the training rows' mean and std."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_train, n_valid = round(0.64 * len(rows)), round(0.16 * len(rows))
    train, valid, test = np.split(rows[order], [n_train, n_train + n_valid])
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return Split(
        (train - mean) / std,
        (valid - mean) / std,
        (test - mean) / std,
        float(-np.log(std).sum()),
        test,
    )


# -------------------------------------------------------------------------- methods


@dataclass
class Fit:
    """One method's result on one split: held-out scores (nats/row) and its settings."""

    test: float
    valid: float | None
    settings: dict = field(default_factory=dict)


def fit_gaussian(data: Split, seed: int, table: Table, quick: bool) -> Fit:
    """Full-covariance Gaussian, maximum likelihood on the training rows."""
    mean, cov = data.train.mean(0), np.cov(data.train, rowvar=False, bias=True)
    return Fit(
        gaussian_log_p(data.test, mean, cov).mean(),
        gaussian_log_p(data.valid, mean, cov).mean(),
    )


GMM_COVARIANCES = ("full", "diag", "tied", "spherical")
GMM_REGS = (1e-6, 1e-4, 1e-2)
GMM_MAX_K = 10


def fit_gmm(data: Split, seed: int, table: Table, quick: bool) -> Fit:
    """GaussianMixture over type x reg x k (k grows until 2 in a row miss the best)."""
    best, best_score, tried = None, -math.inf, 0
    for covariance in GMM_COVARIANCES:
        for reg in GMM_REGS:
            best_k, run_best = 0, -math.inf
            for k in range(1, GMM_MAX_K + 1):
                model = GaussianMixture(
                    k, covariance_type=covariance, reg_covar=reg, n_init=3, random_state=seed
                )
                try:
                    model.fit(data.train)
                    score = model.score(data.valid)
                except ValueError:  # a component collapsed despite reg_covar
                    score = -math.inf
                tried += 1
                if score > run_best:
                    run_best, best_k = score, k
                if score > best_score:
                    best, best_score = model, score
                if k - best_k >= 2:
                    break
    settings = {
        "k": best.n_components,
        "covariance": best.covariance_type,
        "reg": best.reg_covar,
        "converged": bool(best.converged_),
        "candidates": tried,
    }
    return Fit(best.score(data.test), best_score, settings)


KDE_BANDWIDTHS = np.geomspace(0.05, 2.0, 20)


def fit_kde(data: Split, seed: int, table: Table, quick: bool) -> Fit:
    """Gaussian KernelDensity, bandwidth chosen on the validation rows."""
    scores = [
        KernelDensity(bandwidth=h).fit(data.train).score_samples(data.valid).mean()
        for h in KDE_BANDWIDTHS
    ]
    best = int(np.argmax(scores))
    model = KernelDensity(bandwidth=KDE_BANDWIDTHS[best]).fit(data.train)
    edge = best in (0, len(KDE_BANDWIDTHS) - 1)
    settings = {"bandwidth": round(float(KDE_BANDWIDTHS[best]), 4), "grid_edge": edge}
    return Fit(model.score_samples(data.test).mean(), scores[best], settings)


ZUKO_FLOWS = {
    "zuko_realnvp": zuko.flows.RealNVP,
    "zuko_maf": zuko.flows.MAF,
    "zuko_nsf": zuko.flows.NSF,
}


@torch.no_grad()
def mean_log_prob(flow: zuko.flows.Flow, rows: torch.Tensor) -> float:
    """Mean log-density of ``rows`` under ``flow`` (chunked, evaluation mode)."""
    flow.eval()
    values = torch.cat([flow().log_prob(chunk) for chunk in rows.split(4096)])
    return values.double().mean().item()


def fit_zuko(
    data: Split,
    seed: int,
    table: Table,
    quick: bool,
    family: str,
    patience: int = 30,
) -> Fit:
    """A zuko flow trained by AdamW with early stopping; best validation weights restored."""
    torch.manual_seed(seed)
    train, valid, test = (
        torch.tensor(part, dtype=torch.float32) for part in (data.train, data.valid, data.test)
    )
    flow = ZUKO_FLOWS[family](train.shape[1], transforms=5, hidden_features=(128, 128))
    optimiser = torch.optim.AdamW(flow.parameters(), lr=1e-3, weight_decay=1e-4)
    batch = min(256, max(16, len(train) // 4))
    max_epochs = 100 if quick else 1000
    generator = torch.Generator().manual_seed(seed)
    best_score, best_epoch = mean_log_prob(flow, valid), 0
    best_state = copy.deepcopy(flow.state_dict())
    skipped, epoch = 0, 0
    for epoch in range(1, max_epochs + 1):
        flow.train()
        for index in torch.randperm(len(train), generator=generator).split(batch):
            loss = -flow().log_prob(train[index]).mean()
            if not torch.isfinite(loss):
                skipped += 1
                continue
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            optimiser.step()
        score = mean_log_prob(flow, valid)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(flow.state_dict())
        elif epoch - best_epoch >= patience:
            break
    flow.load_state_dict(best_state)
    settings = {"epochs": epoch, "best_epoch": best_epoch, "batch": batch}
    if skipped:
        settings["skipped_nonfinite_steps"] = skipped
    if epoch == max_epochs and best_epoch > max_epochs - patience:
        settings["hit_max_epochs"] = True
    return Fit(mean_log_prob(flow, test), best_score, settings)


def fit_pyroflows(data: Split, seed: int, table: Table, quick: bool) -> Fit:
    """``pyroflows.DensityEstimator`` with its defaults, on the standardised frames."""
    import pyroflows  # here, so that the other methods run whatever state pyroflows is in

    def frame(rows: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=table.columns)

    estimator = pyroflows.DensityEstimator(seed=seed, progress=False)
    train, valid = frame(data.train), frame(data.valid)
    if "valid" in inspect.signature(estimator.fit).parameters:
        history = estimator.fit(train, valid=valid)
        valid_score = estimator.score(valid)
        settings = {"validation": "given valid rows"}
    else:
        history = estimator.fit(pd.concat([train, valid], ignore_index=True))
        valid_score = None
        settings = {"validation": "own split of train + valid"}
    settings["epochs"] = len(history)
    report = estimator.summary()  # which candidate it chose, and each one's validation score
    settings["chosen"] = str(report.index[report["chosen"]][0])
    settings["valid"] = {k: round(float(v), 4) for k, v in report["valid_nats"].items()}
    return Fit(estimator.score(frame(data.test)), valid_score, settings)


METHODS: dict[str, Callable[[Split, int, Table, bool], Fit]] = {
    "pyroflows": fit_pyroflows,
    "gaussian": fit_gaussian,
    "gmm": fit_gmm,
    "kde": fit_kde,
    **{name: partial(fit_zuko, family=name) for name in ZUKO_FLOWS},
}

# --------------------------------------------------------------------------- checks


def check_densities() -> None:
    """Compare each exact synthetic log-density with an independent scipy / torch one."""
    from scipy.stats import multivariate_normal, multivariate_t

    rng = np.random.default_rng(7)
    dist = torch.distributions
    torch.set_default_dtype(torch.float64)  # for the scalar parameters below
    table = mixture(1000, rng)
    weights, means, covs = (table.parameters[k] for k in ("weights", "means", "covs"))
    reference = dist.MixtureSameFamily(
        dist.Categorical(torch.tensor(weights)),
        dist.MultivariateNormal(torch.tensor(means), torch.tensor(covs)),
    ).log_prob(torch.tensor(table.rows))
    report("mixture vs torch MixtureSameFamily", table.log_p(table.rows), reference.numpy())
    one = multivariate_normal(means[0], covs[0]).logpdf(table.rows)
    report("gaussian vs scipy", gaussian_log_p(table.rows, means[0], covs[0]), one)
    table = student(1000, rng)
    scale, df = table.parameters["scale"], table.parameters["df"]
    reference = multivariate_t(np.zeros(len(scale)), scale, df=df).logpdf(table.rows)
    report("student vs scipy multivariate_t", table.log_p(table.rows), reference)
    table = funnel(1000, rng)
    rows = torch.tensor(table.rows)
    v, x = rows[:, 0], rows[:, 1:]
    reference = dist.Normal(0.0, table.parameters["scale"]).log_prob(v) + dist.Normal(
        0.0, torch.exp(v / 2)[:, None]
    ).log_prob(x).sum(1)
    report("funnel vs torch Normal", table.log_p(table.rows), reference.numpy())
    table = banana(1000, rng)
    rows = torch.tensor(table.rows)
    x, y = rows[:, 0::2], rows[:, 1::2]
    reference = dist.Normal(0.0, 1.5).log_prob(x) + dist.Normal(0.5 * x**2, 0.5).log_prob(y)
    report("banana vs torch Normal(y | x)", table.log_p(table.rows), reference.sum(1).numpy())
    # Monte Carlo: the mixture's density integrates to 1 (importance sampling from a
    # Gaussian 1.5 times as wide as the rows).
    table = mixture(200_000, rng)
    mean, cov = table.rows.mean(0), 1.5 * np.cov(table.rows, rowvar=False)
    proposal = rng.multivariate_normal(mean, cov, size=400_000)
    ratio = np.exp(table.log_p(proposal) - gaussian_log_p(proposal, mean, cov))
    print(
        f"mixture integral by importance sampling: {ratio.mean():.4f} "
        f"+- {ratio.std() / math.sqrt(len(ratio)):.4f} (1 expected)"
    )


def report(label: str, ours: np.ndarray, reference: np.ndarray) -> None:
    gap = (np.abs(ours - reference) / np.maximum(1.0, np.abs(reference))).max()
    print(f"{label}: max relative difference {gap:.2e}")
    if gap > 1e-10:
        raise SystemExit(f"{label}: the exact log-density disagrees by {gap}")


# --------------------------------------------------------------------------- output


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            frame.to_csv(stream, index=False, float_format="%.6g")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def markdown(results: pd.DataFrame, value: str, higher: bool, digits: int = 3) -> str:
    """Tables x methods of 'mean ± std'; the best mean bold, † within one std of the best."""
    methods = [m for m in METHODS if m in set(results["method"])]
    lines = ["| table | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for table, group in results.groupby("table", sort=False):
        stats = group.groupby("method")[value].agg(["mean", "std"])
        means = stats["mean"].replace(np.nan, -np.inf if higher else np.inf)
        best = means.idxmax() if higher else means.idxmin()
        spread = stats.loc[best, "std"]
        cells = []
        for method in methods:
            if method not in stats.index:
                cells.append("")
                continue
            mean, std = stats.loc[method]
            cell = f"{mean:.{digits}f}" + ("" if np.isnan(std) else f" ± {std:.{digits}f}")
            tied = not np.isnan(spread) and abs(mean - stats.loc[best, "mean"]) <= spread
            cells.append(f"**{cell}**" if method == best else cell + (" †" if tied else ""))
        lines.append(f"| {table} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(results: pd.DataFrame) -> str:
    real = results[results["true_test_nats"].isna()]
    known = results[results["true_test_nats"].notna()]
    parts = []
    if len(real):
        parts += ["Test log-likelihood, nats/row in standardised units (higher is better):"]
        parts += [markdown(real, "test_nats", higher=True), ""]
    if len(known):
        parts += ["KL(p || q) on the test rows, nats/row (lower is better, 0 is the limit):"]
        parts += [markdown(known, "kl", higher=False), ""]
    parts += ["Fit seconds (model selection included; lower is better):"]
    parts += [markdown(results, "fit_seconds", higher=False, digits=1)]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", nargs="+", default=TABLES, choices=TABLES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2,000 rows, 100 epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/density_tables.csv"
    )
    parser.add_argument("--check", action="store_true", help="check the exact densities, exit")
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    if args.check:
        check_densities()
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; seeds {seeds}"
        f"{', quick' if args.quick else ''}; writing {args.out}",
        flush=True,
    )
    records = []
    for name in args.tables:
        table = load(name, args.quick)
        start = time.perf_counter()
        for seed in seeds:
            data = split(table.rows, seed)
            truth = None
            if table.log_p is not None:
                truth = float(table.log_p(data.raw_test).mean()) - data.log_jacobian
            for method in args.methods:
                run = partial(METHODS[method], data, seed, table, args.quick)
                try:
                    fit, seconds = timed(run, CPU)
                except Exception as error:  # recorded; one broken method spoils no run
                    print(f"{name} seed {seed} {method} FAILED: {error!r}", flush=True)
                    fit, seconds = Fit(math.nan, None, {"error": repr(error)}), math.nan
                records.append(
                    {
                        "table": name,
                        "seed": seed,
                        "method": method,
                        "rows": len(table.rows),
                        "dim": table.rows.shape[1],
                        "n_train": len(data.train),
                        "n_valid": len(data.valid),
                        "n_test": len(data.test),
                        "test_nats": fit.test,
                        "valid_nats": fit.valid,
                        "true_test_nats": truth,
                        "kl": None if truth is None else truth - fit.test,
                        "fit_seconds": seconds,
                        "load_1min": round(os.getloadavg()[0], 2),  # other work slows fits
                        "settings": json.dumps(fit.settings),
                    }
                )
                shown = {k: records[-1][k] for k in ("test_nats", "valid_nats", "kl")}
                print(
                    f"{name} seed {seed} {method}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if v is not None)
                    + f", {seconds:.1f} s {fit.settings or ''}",
                    flush=True,
                )
        print(f"{name}: {time.perf_counter() - start:.0f} s for all methods and seeds\n")
        write_csv(pd.DataFrame(records), args.out)
    print(summarise(pd.DataFrame(records)))


if __name__ == "__main__":
    main()
