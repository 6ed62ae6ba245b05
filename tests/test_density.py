"""DensityEstimator: exact densities in the data's units, types in and out, errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

import pyroflows
from pyroflows import DensityEstimator, list_flows
from pyroflows.density.estimator import density_families

FAST = {"epochs": 15, "progress": False, "seed": 0}
FAST_ONE = {"progress": False, "seed": 0}
ONE_PASS = density_families()  # analytic one-pass inverses, and cnf's ODE solve
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


def banana(n: int, seed: int = 0) -> pd.DataFrame:
    """A curved 2-D table that a flow fits far better than a Gaussian."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    return pd.DataFrame({"a": a, "b": a**2 + 0.3 * rng.normal(size=n)})


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


# A tiny table, so that a flow overfits it at once and its split can be found by brute force.
TINY = mixed_frame(n=12)[["real", "positive"]]
TINY_SUPPORT = {"positive": "positive"}


def tiny_real_line() -> tuple[np.ndarray, np.ndarray]:
    """TINY on the real line (the positive column through log), and each row's log-Jacobian."""
    positive = TINY["positive"].to_numpy()
    return np.column_stack([TINY["real"], np.log(positive)]), -np.log(positive)


def gaussian_log_density(x: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """log N(x_i; mean, cov) at every row i of ``x`` for the Gaussian fitted (mean, unbiased
    covariance) to the rows of each boolean mask: an array (masks, rows)."""
    weights = masks.astype(np.float64)
    count = weights.sum(1)
    mean = weights @ x / count[:, None]
    centred = x[None] - mean[:, None]
    cov = np.einsum("kn,kni,knj->kij", weights, centred, centred) / (count - 1)[:, None, None]
    mahalanobis = np.einsum("kni,kij,knj->kn", centred, np.linalg.inv(cov), centred)
    log_det = np.linalg.slogdet(cov)[1][:, None]
    return -0.5 * (mahalanobis + log_det + x.shape[1] * math.log(2 * math.pi))


def tiny_training_rows(**options) -> np.ndarray:
    """The rows of TINY that an estimator with these options fits its Gaussian start to.

    Found from the start's scores alone: among all subsets of rows, exactly one must have a
    fitted Gaussian whose density (with the log's Jacobian) is the start's log_prob at
    every row. A start that is not the Gaussian of its training rows fails here.
    """
    start = DensityEstimator(
        epochs=1,
        lr=1e-12,
        dtype=torch.float64,
        progress=False,
        support=TINY_SUPPORT,
        select=False,
        **options,
    )
    start.fit(TINY)
    gaussian = start.model.with_density(start.model.density.base)  # the flow's start
    x, log_jacobian = tiny_real_line()
    n, d = x.shape
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1 == 1
    masks = masks[masks.sum(1) > d]  # a Gaussian in d dimensions needs d + 1 rows
    closed_form = gaussian_log_density(x, masks) + log_jacobian
    rows = torch.tensor(TINY.to_numpy(dtype=np.float64))
    error = np.abs(closed_form - gaussian.log_prob(rows).numpy()).max(1)
    matches = np.flatnonzero(error < 1e-3)  # the start's ridge moves it by < 1e-4
    assert len(matches) == 1, f"{len(matches)} subsets give the start; best error {error.min()}"
    return masks[matches[0]]


def tiny_gaussian_valid_loss(valid: np.ndarray) -> float:
    """The mean negative log-density of TINY's ``valid`` rows under the Gaussian start: the
    Gaussian fitted to the other rows, on the real line, with the log's Jacobian."""
    x, log_jacobian = tiny_real_line()
    return -(gaussian_log_density(x, ~valid[None])[0] + log_jacobian)[valid].mean()


@pytest.mark.parametrize("validation", [0.25, 0.5])
def test_the_start_is_the_gaussian_of_the_training_rows_and_validation_sizes_the_split(
    validation,
):
    train = tiny_training_rows(seed=0, validation=validation)
    assert train.sum() == round((1 - validation) * len(TINY))


@pytest.mark.parametrize("lr", [0.1, 0.3], ids=["improves-then-diverges", "never-improves"])
def test_training_never_ends_worse_than_the_gaussian_start_on_the_validation_rows(lr):
    # A big learning rate on 9 training rows: the flow overfits and diverges, so the last
    # weights score the validation rows far worse than the start; the fit must still end
    # on the best of the start and every epoch. (The seed and rows are the start's, so the
    # split is too; a different split would fail the last assertion.)
    options = {"seed": 0, "validation": 0.25}
    valid = ~tiny_training_rows(**options)
    gaussian = tiny_gaussian_valid_loss(valid)
    model = DensityEstimator(
        lr=lr,
        epochs=100,
        patience=100,
        dtype=torch.float64,
        progress=False,
        support=TINY_SUPPORT,
        **options,
    )
    history = model.fit(TINY)
    assert history["valid_loss"].iloc[-1] > gaussian + 1
    restored = -model.log_prob(TINY).to_numpy()[valid].mean()
    scores = model.report["valid_nats"]
    assert scores["gaussian"] == pytest.approx(-gaussian, abs=1e-4)  # the ridge: < 1e-4
    assert scores["flow"] >= -history["valid_loss"].min() - 1e-9  # the best weights, or the start
    assert restored == pytest.approx(-scores.max(), abs=1e-9)  # the best candidate
    assert restored <= gaussian + 1e-9


@pytest.mark.parametrize("name", ONE_PASS)
def test_every_family_a_density_estimator_takes_fits(name):
    frame = mixed_frame()
    model = DensityEstimator(name, **FAST)
    history = model.fit(frame)
    assert len(history) >= 1 and np.isfinite(model.score(frame))
    assert list(model.sample(5).columns) == list(frame.columns)


@pytest.mark.parametrize("name", NOT_ONE_PASS)
def test_families_without_a_one_pass_inverse_are_refused(name):
    with pytest.raises(ValueError, match=r"needs an analytic one-pass inverse .*: .*realnvp"):
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
    scores, histories = [], []
    for seed in [0, 0, 1]:
        model = DensityEstimator(**{**FAST, "seed": seed})
        histories.append(model.fit(frame))
        scores.append(model.log_prob(frame))
    pd.testing.assert_series_equal(scores[0], scores[1])
    pd.testing.assert_frame_equal(histories[0], histories[1])
    assert (scores[0] - scores[2]).abs().max() > 1e-2  # another seed: another split and fit


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
        ({"tolerance": -1e-3}, ValueError, "tolerance must be a finite number >= 0"),
        ({"tolerance": "small"}, TypeError, "tolerance must be a number >= 0"),
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
    with pytest.raises(ValueError, match=r"is not a pyroflows\.DensityEstimator/4 file"):
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


@pytest.mark.slow  # tens of seconds to compile
@pytest.mark.filterwarnings(
    "ignore::FutureWarning:torch",
    "ignore::DeprecationWarning:torch",  # torch.compile internals
)
def test_a_compiled_fit_takes_the_same_steps_as_an_eager_one():
    # 320 training rows in batches of 64: the compiled fit drops no partial batch, so it
    # must take the eager fit's steps (a real table: no dequantisation noise to differ in).
    frame = banana(400)
    options = {"epochs": 3, "batch_size": 64, "dtype": torch.float64, "progress": False}
    eager = DensityEstimator(seed=0, **options)
    compiled = DensityEstimator(seed=0, compile=True, **options)
    pd.testing.assert_frame_equal(compiled.fit(frame), eager.fit(frame), rtol=1e-9)
    np.testing.assert_allclose(compiled.log_prob(frame), eager.log_prob(frame), rtol=1e-9)


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
    draws = model.sample(400, context=pd.DataFrame({"x": [0.5]}))["y"]
    # robust location and scale: the density's tail guard draws about 1 row in 1000 broadly
    scale = (draws.quantile(0.75) - draws.quantile(0.25)) / 1.349
    assert abs(draws.median() - 1.0) < 0.05 and abs(scale - 0.1) < 0.03
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


def test_patience_stops_training_that_many_epochs_after_the_best():
    options = {
        "lr": 0.1,
        "epochs": 60,
        "seed": 0,
        "validation": 0.25,
        "dtype": torch.float64,
        "progress": False,
        "support": TINY_SUPPORT,
    }
    assert len(DensityEstimator(patience=60, **options).fit(TINY)) == 60  # every epoch
    history = DensityEstimator(patience=5, tolerance=0.0, **options).fit(TINY)
    gaussian = tiny_gaussian_valid_loss(~tiny_training_rows(seed=0, validation=0.25))
    losses = history["valid_loss"]
    best = int(history["epoch"][losses.idxmin()]) if losses.min() < gaussian else 0
    assert len(history) == best + 5


def test_only_gains_above_the_tolerance_reset_the_patience():
    frame = banana(1000)
    options = {"flow": "realnvp", "seed": 0, "progress": False, "dtype": torch.float64}
    options |= {"batch_size": 100, "patience": 4, "epochs": 400}
    # the start's validation loss: one epoch at a learning rate too small to move anything
    start = DensityEstimator(lr=1e-12, **options).fit(frame)["valid_loss"].iloc[0]
    lengths = []
    for tolerance in (0.002, 0.05):
        model = DensityEstimator(tolerance=tolerance, **options)
        history = model.fit(frame)
        mark, last = start, 0  # the last epoch that gained more than the tolerance
        for epoch, loss in zip(history["epoch"], history["valid_loss"]):
            if loss < mark - tolerance:
                mark, last = loss, epoch
        assert len(history) == last + 4 < 400
        # the best weights by any margin are kept: the flow scores the least loss seen
        best = min(start, history["valid_loss"].min())
        assert model.report.loc["flow", "valid_nats"] == pytest.approx(-best, abs=1e-9)
        lengths.append(len(history))
    assert lengths[1] < lengths[0]


def test_batch_size_sets_the_steps_per_epoch():
    frame = banana(1000)  # 800 training rows

    def valid_loss(batch_size):
        model = DensityEstimator(epochs=2, batch_size=batch_size, seed=0, progress=False)
        return model.fit(frame)["valid_loss"]

    whole = valid_loss(1000)
    pd.testing.assert_series_equal(valid_loss(5000), whole)  # both one step on all rows
    assert valid_loss(25).iloc[-1] < whole.iloc[-1] - 0.3  # 32 steps per epoch


def test_lr_sets_the_step_size():
    frame = banana(1000)
    options = {"epochs": 3, "batch_size": 50, "seed": 0, "progress": False}
    frozen = DensityEstimator(lr=1e-12, **options).fit(frame)
    moving = DensityEstimator(lr=3e-3, **options).fit(frame)
    assert (frozen["lr"] == 1e-12).all() and moving["lr"].iloc[0] == 3e-3
    assert frozen["valid_loss"].max() - frozen["valid_loss"].min() < 1e-5
    assert moving["valid_loss"].iloc[-1] < frozen["valid_loss"].iloc[-1] - 0.3


def test_clip_bounds_the_gradient_norm():
    # Adam divides each step by the gradient's running size plus 1e-8: a gradient clipped
    # to norm 1e-12 makes every step 1e-4 of its usual size, so training stalls.
    frame = banana(1000)
    options = {"epochs": 3, "batch_size": 50, "lr": 3e-3, "seed": 0, "progress": False}
    clipped = DensityEstimator(clip=1e-12, **options).fit(frame)["valid_loss"]
    free = DensityEstimator(**options).fit(frame)["valid_loss"]
    assert clipped.max() - clipped.min() < 1e-3
    assert free.iloc[-1] < clipped.iloc[-1] - 0.3


def test_declared_supports_bound_the_density():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {"share": 10 * rng.beta(2.0, 5.0, 500), "size": rng.lognormal(1.0, 0.5, 500)}
    )
    model = DensityEstimator(support={"share": (0.0, 10.0), "size": "real"}, **FAST)
    model.fit(frame)
    outside = pd.DataFrame({"share": [-1.0, 0.0, 10.0, 12.0], "size": 3.0})
    assert (model.log_prob(outside) == -math.inf).all()
    inside = pd.DataFrame({"share": [0.01, 9.99, 3.0], "size": [3.0, 3.0, -2.0]})
    assert np.isfinite(model.log_prob(inside)).all()  # "real": negative sizes too


@pytest.mark.parametrize(("auto_support", "finite"), [(True, False), (False, True)])
def test_auto_support_makes_positive_columns_positive_unless_turned_off(auto_support, finite):
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"size": rng.lognormal(1.0, 0.5, 500), "count": rng.poisson(3.0, 500)})
    model = DensityEstimator(auto_support=auto_support, **FAST)
    model.fit(frame)
    below_zero = pd.DataFrame({"size": [-1.0, 3.0], "count": [2, -1]})  # one column each
    assert np.isfinite(model.log_prob(below_zero)).tolist() == [finite, finite]


@pytest.mark.parametrize(("dtype", "expected"), [(None, torch.float32), (torch.float64,) * 2])
def test_dtype_sets_the_precision_of_the_fit(dtype, expected):
    data = torch.randn(300, 2, dtype=torch.float32)
    model = DensityEstimator(dtype=dtype, **FAST)
    model.fit(data)
    assert model.log_prob(data).dtype == expected
    assert all(p.dtype == expected for p in model.model.parameters())


def test_device_cpu_fits_on_the_cpu_whatever_the_datas_device(device):
    data = torch.randn(300, 2, device=device, dtype=torch.float64)
    model = DensityEstimator(device="cpu", **FAST)
    model.fit(data)
    assert model.log_prob(data).device.type == "cpu"
    assert model.sample(5).device.type == "cpu"
    assert all(p.device.type == "cpu" for p in model.model.parameters())


def test_a_boolean_column_is_sampled_as_booleans_with_the_datas_frequencies():
    rng = np.random.default_rng(4)
    x = rng.normal(size=1000)
    frame = pd.DataFrame({"x": x, "flag": x + 0.5 * rng.normal(size=1000) > 0.5})
    model = DensityEstimator(**{**FAST, "epochs": 30})
    model.fit(frame)
    assert np.isfinite(model.log_prob(frame)).all()
    samples = model.sample(4000)
    assert samples["flag"].dtype == bool
    assert abs(samples["flag"].mean() - frame["flag"].mean()) < 0.05
    flagged = samples["flag"]  # the dependence on x survives: flagged rows have larger x
    assert samples["x"][flagged].mean() > samples["x"][~flagged].mean() + 0.8


def test_probabilities_of_a_boolean_column_sum_to_one():
    # log_prob of a discrete value is documented as the log-probability of the value.
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"flag": rng.random(1000) < 0.3})
    model = DensityEstimator(**FAST)
    model.fit(frame)
    probabilities = np.exp(model.log_prob(pd.DataFrame({"flag": [False, True]})).to_numpy())
    assert abs(probabilities.sum() - 1) < 0.05
    frequency = model.sample(4000)["flag"].mean()  # sampling and scoring agree
    assert abs(probabilities[1] - frequency) < 0.03


@pytest.mark.parametrize("frequency", [0.02, 0.3, 0.8])
def test_a_lone_boolean_column_samples_its_frequency(frequency):
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"flag": rng.random(1000) < frequency})
    model = DensityEstimator(**FAST)
    model.fit(frame)
    observed = frame["flag"].mean()
    # within the noise of the data's own frequency (two standard errors) and of the draws
    spread = np.sqrt(observed * (1 - observed))
    tolerance = 2 * spread / np.sqrt(len(frame)) + 3 * spread / np.sqrt(20_000)
    assert abs(model.sample(20_000)["flag"].mean() - observed) < tolerance
    true_probability = np.exp(model.log_prob(pd.DataFrame({"flag": [True]})).iloc[0])
    assert abs(true_probability - observed) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("false_share", [1e-4, 0.3, 0.999])
def test_a_booleans_split_is_a_bijection_with_the_autograd_log_derivative(false_share, dtype):
    from pyroflows.density.tabular import split_boolean, unsplit_boolean

    eps = 1e-6  # the dequantisation noise's margin: y lies in [eps, 1 - eps] + {0, 1}
    y = torch.tensor([eps, 0.3, 1 - eps, 1 + eps, 1.7, 2 - eps], dtype=dtype)
    share = torch.tensor(false_share, dtype=dtype)
    y.requires_grad_()
    x, log_det = split_boolean(y, share)
    (derivative,) = torch.autograd.grad(x.sum(), y)
    x, log_det, y = x.detach(), log_det.detach(), y.detach()
    assert torch.isfinite(x).all() and torch.isfinite(log_det).all()
    assert (x.diff() > 0).all()  # increasing
    torch.testing.assert_close(log_det, derivative.log(), rtol=1e-4, atol=1e-4)
    # standard normal marginal: the share of False rows lands below the split point
    torch.testing.assert_close(torch.special.ndtr(x[2]), share, rtol=1e-4, atol=1e-6)
    back = unsplit_boolean(x, share)
    tolerance = 5e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(back, y, rtol=0, atol=tolerance)
    assert (torch.ceil(back[[1, 4]]) - 1).tolist() == [0, 1]  # False, True


def test_on_many_rows_the_families_race_and_only_the_leader_trains_on(monkeypatch):
    from pyroflows.density import estimator

    monkeypatch.setattr(estimator, "RACE_ROWS", 500)
    monkeypatch.setattr(estimator, "RACE_EPOCHS", 3)
    model = DensityEstimator(epochs=20, patience=5, layers=2, hidden=(16, 16), **FAST_ONE)
    history = model.fit(banana(1000))  # 800 training rows: a race
    details = model.report.loc["flow", "details"]
    losers = [family for family in estimator.AUTO if family != model.flow_family]
    for family in losers:
        assert f"{family} " in details and "(3 epochs, raced)" in details.split(family)[1]
    assert len(history) > 3 and history["epoch"].tolist() == list(range(1, len(history) + 1))
    assert f"({len(history)} epochs)" in details.split(model.flow_family)[1]
    # the leader is the family that scored best after the race's epochs
    scores = dict(re.findall(r"(\w+) (-?[\d.]+) \(3 epochs, raced\)", details))
    assert set(scores) == set(losers)
    leader_after_race = -history["valid_loss"].iloc[:3].min()
    assert all(leader_after_race >= float(score) - 1e-3 for score in scores.values())


def test_below_the_race_rows_every_family_trains_to_the_end():
    model = DensityEstimator(epochs=4, patience=50, layers=2, hidden=(16, 16), **FAST_ONE)
    model.fit(banana(300))
    details = model.report.loc["flow", "details"]
    assert "raced" not in details
    assert details.count("(4 epochs)") == 3
