"""DensityEstimator: exact densities in the data's units, types in and out, errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import pyroflows
from pyroflows import DensityEstimator, build, list_flows

FAST = {"epochs": 15, "progress": False, "seed": 0}
ONE_PASS = [
    n
    for n in list_flows()
    if build(n, 2).inverse_method == "analytic" and build(n, 2).fast_inverse
]
NOT_ONE_PASS = [n for n in list_flows() if n not in ONE_PASS]


def mixed_frame(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame(
        {
            "real": x,
            "positive": np.exp(0.5 * x + rng.normal(scale=0.3, size=n)),
            "count": rng.poisson(2.0, size=n),
            "flag": rng.random(n) < 0.3,
        }
    )


def test_density_integrates_to_one_in_the_datas_units():
    # A positive and a bounded column: p(y) must integrate to 1 over (0, inf) x (0, 10) in
    # y's own units, which checks every log-det (log, logit, whitening, flow) at once.
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {"size": rng.lognormal(1.0, 0.5, 600), "share": 10 * rng.beta(2.0, 5.0, 600)}
    )
    model = DensityEstimator(support={"share": (0.0, 10.0)}, dtype=torch.float64, **FAST)
    model.fit(frame)
    size = np.linspace(1e-4, 40.0, 1500)
    share = np.linspace(1e-4, 10 - 1e-4, 700)
    grid = pd.DataFrame({"size": np.repeat(size, len(share)), "share": np.tile(share, len(size))})
    density = np.exp(model.log_prob(grid).to_numpy()).reshape(len(size), len(share))
    mass = np.trapezoid(np.trapezoid(density, share, axis=1), size)
    assert abs(mass - 1) < 5e-3


def test_probabilities_of_a_count_column_sum_to_one():
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"count": rng.poisson(4.0, 800)})
    model = DensityEstimator(dtype=torch.float64, **FAST)
    model.fit(frame)
    values = pd.DataFrame({"count": np.arange(0, 60)})
    probabilities = np.exp(model.log_prob(values).to_numpy())
    assert abs(probabilities.sum() - 1) < 0.02  # midpoint rule on unit-width bins


def test_the_start_is_the_fitted_gaussian_and_training_never_ends_worse():
    frame = mixed_frame()[["real", "positive"]]
    start = DensityEstimator(epochs=1, lr=1e-12, dtype=torch.float64, progress=False, seed=0)
    start.fit(frame)
    # At the start: log p(y) = N(log y_pos, y_real; mean, cov of the transformed rows) - log y_pos
    x = np.column_stack([frame["real"], np.log(frame["positive"])])
    model_rows = start.model
    mean, chol = model_rows.mean.numpy(), model_rows.chol.numpy()
    solved = np.linalg.solve(chol, (x - mean).T)
    expected = (
        -0.5 * (solved**2).sum(0)
        - np.log(np.diag(chol)).sum()
        - math.log(2 * math.pi)
        - np.log(frame["positive"].to_numpy())
    )
    np.testing.assert_allclose(start.log_prob(frame).to_numpy(), expected, rtol=1e-6, atol=1e-6)
    trained = DensityEstimator(dtype=torch.float64, progress=False, seed=0)
    history = trained.fit(frame)
    assert (history["valid_loss"] >= -1e9).all()
    assert trained.history["valid_loss"].min() <= history["valid_loss"].iloc[0] + 1e-9


@pytest.mark.parametrize("name", ONE_PASS)
def test_every_family_with_a_one_pass_inverse_fits(name):
    frame = mixed_frame()
    model = DensityEstimator(name, **FAST)
    history = model.fit(frame)
    assert len(history) >= 1 and np.isfinite(model.score(frame))
    assert list(model.sample(5).columns) == list(frame.columns)


@pytest.mark.parametrize("name", NOT_ONE_PASS)
def test_families_without_a_one_pass_inverse_are_refused(name):
    with pytest.raises(ValueError, match=r"needs an analytic one-pass inverse: .*realnvp"):
        DensityEstimator(name, **FAST).fit(mixed_frame())


def test_a_dataframe_in_gives_dataframes_and_series_out():
    frame = mixed_frame()
    frame.index = [f"row{i}" for i in range(len(frame))]
    model = DensityEstimator(**FAST)
    model.fit(frame)
    scores = model.log_prob(frame.iloc[:7])
    assert isinstance(scores, pd.Series) and list(scores.index) == list(frame.index[:7])
    samples = model.sample(300)
    assert list(samples.columns) == list(frame.columns)
    assert samples.dtypes.to_dict() == frame.dtypes.to_dict()
    assert (samples["count"] >= 0).all() and (samples["positive"] > 0).all()
    assert set(samples["flag"].unique()) <= {True, False}
    assert isinstance(model.score(frame), float)


def test_an_array_in_gives_arrays_out():
    array = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    model = DensityEstimator(**FAST)
    model.fit(array)
    assert isinstance(model.log_prob(array[:4]), np.ndarray) and model.log_prob(
        array[:4]
    ).shape == (4,)
    samples = model.sample(10)
    assert (
        isinstance(samples, np.ndarray)
        and samples.shape == (10, 3)
        and samples.dtype == np.float32
    )


def test_a_tensor_in_gives_tensors_out_on_its_device(device):
    data = torch.randn(300, 3, device=device, dtype=torch.float64) * 2 + 1
    model = DensityEstimator(**FAST)
    model.fit(data)
    scores = model.log_prob(data[:5])
    assert isinstance(scores, torch.Tensor) and scores.device.type == device.type
    assert scores.dtype == torch.float64
    samples = model.sample(7)
    assert samples.shape == (7, 3) and samples.device.type == device.type


def test_rows_outside_a_fitted_support_have_zero_density():
    frame = mixed_frame()[["real", "positive"]]
    model = DensityEstimator(**FAST)
    model.fit(frame)
    outside = pd.DataFrame({"real": [0.0, 0.0], "positive": [-1.0, 1.0]})
    scores = model.log_prob(outside)
    assert scores.iloc[0] == -math.inf and np.isfinite(scores.iloc[1])


def test_save_and_load_give_identical_log_probs(tmp_path):
    frame = mixed_frame()
    model = DensityEstimator("glow", layers=2, hidden=(16, 16), **FAST)
    model.fit(frame)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = DensityEstimator.load(path)
    pd.testing.assert_series_equal(loaded.log_prob(frame), model.log_prob(frame))
    assert loaded.columns == model.columns
    assert loaded.sample(5).dtypes.to_dict() == frame.dtypes.to_dict()
    torch.load(path, weights_only=True)  # the file holds no pickled code


def test_seed_makes_fits_reproducible():
    frame = mixed_frame()
    scores = []
    for _ in range(2):
        model = DensityEstimator(**FAST)
        model.fit(frame)
        scores.append(model.log_prob(frame))
    pd.testing.assert_series_equal(scores[0], scores[1])


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (
            lambda f: f.assign(real=f["real"].where(f.index != 3)),
            ValueError,
            r"column 'real' has 1 missing or non-finite values \(NaN or inf\), e.g. at rows \[3\]",
        ),
        (lambda f: f.assign(positive=np.inf), ValueError, "column 'positive' has 400 missing"),
        (lambda f: f.iloc[:0], ValueError, "the table is empty"),
        (lambda f: f.iloc[:1], ValueError, "at least 4 rows"),
        (lambda f: f.assign(const=3.0), ValueError, "column 'const' is constant"),
        (lambda f: f.assign(name="a"), TypeError, "column 'name' is not numeric"),
        (
            lambda f: f.assign(kind=pd.Categorical(["x", "y"] * 200)),
            TypeError,
            "column 'kind' is not numeric",
        ),
    ],
)
def test_bad_tables_are_refused_naming_the_column(edit, error, message):
    with pytest.raises(error, match=message):
        DensityEstimator(**FAST).fit(edit(mixed_frame()))


def test_columns_must_match_at_scoring_time():
    frame = mixed_frame()
    model = DensityEstimator(**FAST)
    model.fit(frame)
    with pytest.raises(ValueError, match=r"missing \['flag'\]"):
        model.log_prob(frame.drop(columns=["flag"]))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        model.log_prob(frame.assign(extra=1.0))
    with pytest.raises(ValueError, match="another order than at fit"):
        model.log_prob(frame[frame.columns[::-1]])
    with pytest.raises(ValueError, match="column 'real' has 1 missing"):
        model.log_prob(frame.assign(real=[np.nan] + [0.0] * (len(frame) - 1)))
    array_model = DensityEstimator(**FAST)
    array_model.fit(np.random.default_rng(0).normal(size=(100, 3)))
    with pytest.raises(ValueError, match="the data has 2 columns, the model 3"):
        array_model.log_prob(np.zeros((4, 2)))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"flow": "nvp"}, ValueError, "unknown flow family 'nvp'"),
        ({"bins": 8, "flow": "linear"}, ValueError, "'linear' has no option 'bins'"),
        ({"validation": 1.5}, ValueError, r"validation must be a fraction in \(0, 1\)"),
        ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
    ],
)
def test_bad_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        DensityEstimator(**kwargs)


@pytest.mark.parametrize(
    ("support", "message"),
    [
        ({"nope": "real"}, r"support names columns that are not in the data: \['nope'\]"),
        ({"real": "positive"}, "column 'real' is declared positive but has values <= 0"),
        ({"real": (0.0, 1.0)}, r"column 'real' is declared in \(0.0, 1.0\)"),
        ({"real": "weird"}, "must be 'real', 'positive' or a \\(low, high\\) pair"),
    ],
)
def test_bad_support_declarations_are_refused(support, message):
    with pytest.raises(ValueError, match=message):
        DensityEstimator(support=support, **FAST).fit(mixed_frame())


def test_unfitted_and_unreadable_models_say_so(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted yet"):
        DensityEstimator().sample(3)
    with pytest.raises(FileNotFoundError, match="no model file"):
        DensityEstimator.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(ValueError, match="is not a pyroflows model file"):
        DensityEstimator.load(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"is not a pyroflows\.DensityEstimator/1 file"):
        DensityEstimator.load(tmp_path / "other.pt")


def test_non_table_input_is_refused():
    with pytest.raises(TypeError, match="data must be a pandas DataFrame, a numpy array"):
        DensityEstimator(**FAST).fit([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"must be 2-D \(rows x columns\)"):
        DensityEstimator(**FAST).fit(np.zeros(10))


def test_the_flow_beats_both_baselines_on_a_skewed_real_table():
    from pyroflows.demo import load_table
    from pyroflows.density.baselines import gaussian_loglik, mixture_loglik

    frame = load_table().iloc[:, :6]
    order = np.random.default_rng(0).permutation(len(frame))
    test, fit = frame.iloc[order[:110]], frame.iloc[order[110:]]
    model = DensityEstimator(progress=False, seed=0)
    model.fit(fit)
    flow = model.score(test)
    gaussian = gaussian_loglik(fit.to_numpy(), test.to_numpy()).mean()
    mixture = mixture_loglik(fit.to_numpy(), test.to_numpy())[0].mean()
    assert flow > max(gaussian, mixture)


def test_public_name():
    assert pyroflows.DensityEstimator is DensityEstimator


@pytest.mark.filterwarnings(
    "ignore::FutureWarning:torch",
    "ignore::DeprecationWarning:torch",  # torch.compile internals
)
def test_a_compiled_fit_trains_and_scores():
    frame = mixed_frame(n=300)
    model = DensityEstimator(epochs=3, batch_size=64, compile=True, progress=False, seed=0)
    history = model.fit(frame)
    assert len(history) == 3 and np.isfinite(model.score(frame))


def conditional_tables(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=n)
    y = 2 * x + 0.1 * rng.normal(size=n)
    return pd.DataFrame({"y": y}), pd.DataFrame({"x": x})


@pytest.mark.parametrize("name", ["realnvp", "maf", "nsf"])
def test_a_conditional_density_learns_p_y_given_x(name, tmp_path):
    data, context = conditional_tables()
    model = DensityEstimator(name, seed=0, progress=False, epochs=200, lr=3e-3)
    model.fit(data, context=context)
    test_data, test_context = conditional_tables(seed=1)
    exact = -0.5 * math.log(2 * math.pi * 0.01) - 0.5  # E log N(y; 2x, 0.1^2)
    conditional = model.score(test_data, context=test_context)
    marginal = DensityEstimator(name, seed=0, progress=False, epochs=50).fit(data)
    assert conditional > exact - 0.15
    assert conditional > marginal["valid_loss"].min() * -1 + 2.0  # far better than p(y)
    draws = model.sample(400, context=pd.DataFrame({"x": [0.5]}))
    assert abs(draws["y"].mean() - 1.0) < 0.05 and abs(draws["y"].std() - 0.1) < 0.03
    model.save(tmp_path / "conditional.pt")
    loaded = DensityEstimator.load(tmp_path / "conditional.pt")
    pd.testing.assert_series_equal(
        loaded.log_prob(test_data, test_context), model.log_prob(test_data, test_context)
    )


def test_conditional_misuse_is_refused():
    data, context = conditional_tables(n=200)
    model = DensityEstimator("realnvp", **FAST)
    model.fit(data, context=context)
    with pytest.raises(ValueError, match="conditional on"):
        model.log_prob(data)
    with pytest.raises(ValueError, match="context has 5 rows, the data 200"):
        model.log_prob(data, context.head(5))
    with pytest.raises(ValueError, match="columns"):
        model.log_prob(data, context.rename(columns={"x": "z"}))
    with pytest.raises(ValueError, match="non-finite"):
        model.log_prob(data, context.assign(x=np.nan))
    with pytest.raises(ValueError, match="give 1 or n = 3"):
        model.sample(3, context=context.head(2))
    plain = DensityEstimator("realnvp", **FAST)
    plain.fit(data)
    with pytest.raises(ValueError, match="fitted without context"):
        plain.log_prob(data, context)
