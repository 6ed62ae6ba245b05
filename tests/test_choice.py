"""What DensityEstimator.fit chooses: never worse than its baselines on the validation rows,
and the flow where the data are not a mixture of Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyroflows import DensityEstimator
from pyroflows.density.baselines import gaussian_loglik

FAST = {"epochs": 3, "progress": False, "layers": 2, "hidden": (8, 8)}


@st.composite
def tables(draw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A random table of real, positive, bounded, count and boolean columns, split into
    training and validation rows."""
    rows = draw(st.integers(24, 80))
    seed = draw(st.integers(0, 2**31 - 1))
    kinds = draw(
        st.lists(
            st.sampled_from(["real", "lognormal", "beta", "count", "flag"]), min_size=1, max_size=4
        )
    )
    rng = np.random.default_rng(seed)
    columns = {}
    for i, kind in enumerate(kinds):
        if kind == "real":
            values = rng.standard_t(3, rows) * rng.uniform(0.1, 10) + rng.normal(0, 5)
        elif kind == "lognormal":
            values = rng.lognormal(rng.normal(), rng.uniform(0.2, 2), rows)
        elif kind == "beta":
            values = rng.beta(rng.uniform(0.5, 5), rng.uniform(0.5, 5), rows)
        elif kind == "count":
            values = rng.poisson(rng.uniform(0.5, 20), rows)
        else:
            values = rng.random(rows) < rng.uniform(0.2, 0.8)
        columns[f"{kind}{i}"] = values
    frame = pd.DataFrame(columns)
    cut = (3 * rows) // 4
    assume((frame.iloc[:cut].nunique() > 1).all())  # a constant column is refused by design
    return frame.iloc[:cut], frame.iloc[cut:]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.sampled_from(["realnvp", "maf"]))
def test_on_the_validation_rows_the_fit_is_never_worse_than_its_baselines(split, family):
    train, valid = split
    model = DensityEstimator(family, seed=0, **FAST)
    model.fit(train, valid=valid)
    report = model.summary()
    score = model.score(valid)
    assert score == pytest.approx(report["valid_nats"].max(), abs=1e-4)
    assert score >= report.loc["gaussian", "valid_nats"] - 1e-4
    assert score >= report.loc["mixture", "valid_nats"] - 1e-4
    assert report["chosen"].sum() == 1
    assert report.loc["blend", "valid_nats"] >= max(report.loc[["flow", "mixture"], "valid_nats"])
    assert report.loc[report["chosen"], "valid_nats"].iloc[0] == report["valid_nats"].max()


def test_the_gaussian_baseline_is_the_gaussian_of_the_training_rows():
    # all-real columns: the column maps are the identity, so the baseline is checkable
    rng = np.random.default_rng(0)
    data = rng.normal(size=(400, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 2.0, 0.3], [0, 0, 0.2]])
    train, valid = pd.DataFrame(data[:300]), pd.DataFrame(data[300:])
    model = DensityEstimator(seed=0, dtype=torch.float64, **FAST)
    model.fit(train, valid=valid)
    closed_form = gaussian_loglik(data[:300], data[300:]).mean()  # MLE covariance
    # the estimator's Gaussian uses the unbiased covariance: a (D + 1) / (2n)-sized gap
    assert model.report.loc["gaussian", "valid_nats"] == pytest.approx(closed_form, abs=0.02)


def bananas(n: int, seed: int, pairs: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """``pairs`` independent pairs x ~ N(0, 1.5^2), y = x^2 / 2 + e / 2, e ~ N(0, 1): a
    curved density, and its exact log-density (the map (x, e) -> (x, y) has Jacobian 1/2)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1.5, size=(n, pairs))
    e = rng.normal(size=(n, pairs))
    y = x**2 / 2 + e / 2
    normal = -0.5 * math.log(2 * math.pi)
    log_p = normal - 0.5 * (x / 1.5) ** 2 - math.log(1.5) + normal - 0.5 * e**2 + math.log(2)
    columns = {
        **{f"x{i}": x[:, i] for i in range(pairs)},
        **{f"y{i}": y[:, i] for i in range(pairs)},
    }
    return pd.DataFrame(columns), log_p.sum(1)


def test_where_the_data_are_no_mixture_of_gaussians_the_flow_is_chosen_and_beats_both():
    train, _ = bananas(3000, seed=0)
    valid, _ = bananas(750, seed=1)
    test, log_p = bananas(4000, seed=2)
    model = DensityEstimator("realnvp", seed=0, progress=False)
    model.fit(train, valid=valid)
    report = model.report["valid_nats"]
    assert model.report["chosen"].idxmax() in ("flow", "blend")
    assert report["flow"] > max(report["gaussian"], report["mixture"]) + 0.1
    kl = (log_p - model.log_prob(test).to_numpy()).mean()  # KL(p || q) on held-out rows
    assert kl < 0.2  # measured: 0.10 to 0.14; the validated mixture's is 0.31


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.booleans())
def test_samples_never_leave_the_inferred_supports(split, select):
    train, valid = split
    model = DensityEstimator(seed=0, select=select, **FAST)
    model.fit(train, valid=valid)
    draws = model.sample(2000)
    assert (draws.dtypes == train.dtypes).all()
    for column in model.schema.columns:
        values = draws[column.name].to_numpy(dtype=np.float64)
        assert np.isfinite(values).all()
        top = values + 1 if column.discrete else values  # a count k stands for [k, k + 1)
        if column.kind == "positive":
            assert (values >= 0).all() if column.discrete else (values > 0).all()
        elif column.kind == "interval":
            assert (values >= column.low).all() and (top <= column.high).all(), column
            if not column.discrete:
                assert (values > column.low).all() and (values < column.high).all(), column


def test_on_many_rows_the_mixture_search_runs_on_a_subset_and_refits_the_winner(monkeypatch):
    from pyroflows.density import selection
    from pyroflows.density.mixture import GaussianMixture
    from pyroflows.density.schema import Column
    from pyroflows.density.tabular import TabularDensity

    monkeypatch.setattr(selection, "SEARCH_ROWS", 300)
    torch.manual_seed(0)
    rows = torch.cat([torch.randn(600, 1) - 4, torch.randn(600, 1) + 4])[torch.randperm(1200)]
    maps = TabularDensity([Column("x", "float64")], GaussianMixture(1, 1))
    maps.initialize(rows[:1000])
    search = selection.choose_mixture(maps, maps.latent(rows[:1000]), rows[1000:])
    *searched, refit = search.tried
    winner = max(searched, key=lambda entry: entry[-1])
    assert refit[:3] == winner[:3]  # the winner's components, covariance and ridge, refitted
    assert search.best_score == max(entry[-1] for entry in search.tried)
    assert search.best.components >= 2
