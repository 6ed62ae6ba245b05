"""GaussianMixture (a flow's base density) and its EM fit: exact densities, samples,
recovery of a known mixture, parity with scikit-learn, save/load, dtypes, errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from pyroflows.density.mixture import COVARIANCES, GaussianMixture, fit_gaussian_mixture


def random_mixture(components, dim, covariance, device, seed=0):
    """A GaussianMixture (float64) with random weights, means and factors."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(components, generator=generator, dtype=torch.float64)
    loc = 2 * torch.randn(components, dim, generator=generator, dtype=torch.float64)
    raw = torch.randn(components, dim, dim, generator=generator, dtype=torch.float64)
    diagonal = 0.5 + torch.rand(components, dim, generator=generator, dtype=torch.float64)
    scale_tril = torch.diag_embed(diagonal)
    if covariance == "full":
        scale_tril = scale_tril + 0.5 * raw.tril(-1)
    mixture = GaussianMixture(components, dim, covariance).to(device, torch.float64)
    mixture.set(logits.to(device), loc.to(device), scale_tril.to(device))
    return mixture


def reference(mixture):
    """The same mixture as a torch.distributions object."""
    return MixtureSameFamily(
        Categorical(logits=mixture.logits),
        MultivariateNormal(mixture.loc, scale_tril=mixture.scale_tril),
    )


def draw(n, weights, means, factors, seed, device="cpu"):
    """``n`` float64 rows from the mixture with these weights, means and Cholesky factors."""
    generator = torch.Generator().manual_seed(seed)
    weights, means, factors = (
        torch.as_tensor(t, dtype=torch.float64) for t in (weights, means, factors)
    )
    labels = torch.multinomial(weights, n, replacement=True, generator=generator)
    noise = torch.randn(n, means.shape[1], 1, generator=generator, dtype=torch.float64)
    return (means[labels] + (factors[labels] @ noise).squeeze(-1)).to(device)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_log_prob_matches_torch_distributions(covariance, device):
    mixture = random_mixture(4, 3, covariance, device)
    x = 3 * torch.randn(5, 7, 3, dtype=torch.float64, device=device)
    expected = reference(mixture).log_prob(x)
    assert mixture.log_prob(x).shape == (5, 7)
    torch.testing.assert_close(mixture.log_prob(x), expected, rtol=1e-12, atol=1e-12)
    components = MultivariateNormal(mixture.loc, scale_tril=mixture.scale_tril)
    per_component = components.log_prob(x.unsqueeze(-2)) + mixture.logits.log_softmax(-1)
    torch.testing.assert_close(mixture.component_log_prob(x), per_component)


def test_a_fresh_mixture_is_a_standard_normal_whatever_its_components(device):
    x = torch.randn(10, 4, dtype=torch.float64, device=device)
    standard = MultivariateNormal(
        torch.zeros(4, dtype=torch.float64, device=device),
        torch.eye(4, dtype=torch.float64, device=device),
    )
    for covariance in COVARIANCES:
        mixture = GaussianMixture(6, 4, covariance).to(device, torch.float64)
        torch.testing.assert_close(mixture.log_prob(x), standard.log_prob(x))


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_sample_moments_match_the_mixtures(covariance, device):
    mixture = random_mixture(3, 2, covariance, device, seed=1)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.manual_seed(0)
    samples = mixture.sample(200_000)
    assert samples.shape == (200_000, 2) and samples.dtype == torch.float64
    weights = mixture.logits.softmax(-1)
    mean = weights @ mixture.loc
    second = mixture.scale_tril @ mixture.scale_tril.mT + mixture.loc.unsqueeze(
        -1
    ) * mixture.loc.unsqueeze(-2)
    cov = (weights.view(-1, 1, 1) * second).sum(0) - mean.outer(mean)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), cov, atol=0.05, rtol=0.02)
    assert mixture.sample(0).shape == (0, 2)


def test_fit_recovers_a_well_separated_mixture(device):
    weights = torch.tensor([0.5, 0.3, 0.2])
    means = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 6.0]])
    factors = torch.tensor(
        [[[1.0, 0.0], [0.3, 0.8]], [[0.7, 0.0], [0.0, 1.2]], [[0.5, 0.0], [-0.2, 0.5]]]
    )
    x = draw(3000, weights, means, factors, seed=0, device=device)
    mixture = fit_gaussian_mixture(x, 3, generator=torch.Generator().manual_seed(0))
    # Match each true component to the fitted mean nearest it.
    order = torch.cdist(means.double(), mixture.loc.cpu()).argmin(-1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(mixture.loc.cpu()[order], means.double(), atol=0.15, rtol=0)
    fitted_weights = mixture.logits.softmax(-1).cpu()[order]
    torch.testing.assert_close(fitted_weights, weights.double(), atol=0.03, rtol=0)
    covariances = (factors @ factors.mT).double()
    fitted = mixture.scale_tril.cpu()[order]
    torch.testing.assert_close(fitted @ fitted.mT, covariances, atol=0.15, rtol=0)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_one_component_is_the_gaussian_mle_plus_the_ridge(covariance, device):
    x = torch.randn(500, 3, dtype=torch.float64, device=device) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 2.0]], dtype=torch.float64, device=device
    )
    mixture = fit_gaussian_mixture(x, 1, covariance, ridge=0.1)
    cov = torch.cov(x.T, correction=0)
    if covariance == "diag":
        cov = cov.diag().diag()
    cov = cov + 0.1 * torch.eye(3, dtype=torch.float64, device=device)
    torch.testing.assert_close(mixture.loc[0], x.mean(0))
    torch.testing.assert_close(mixture.scale_tril[0] @ mixture.scale_tril[0].T, cov)
    torch.testing.assert_close(mixture.logits.softmax(-1), x.new_ones(1))


def five_dimensional_data():
    """Train and test rows (2000 and 1000) of a 3-component 5-D mixture, whitened by the
    training rows' mean and covariance."""
    generator = torch.Generator().manual_seed(3)
    means = 2.5 * torch.randn(3, 5, generator=generator)
    factors = torch.randn(3, 5, 5, generator=generator).tril(-1) * 0.4
    factors = factors + torch.diag_embed(0.4 + torch.rand(3, 5, generator=generator))
    x = draw(3000, torch.tensor([0.5, 0.3, 0.2]), means, factors, seed=4)
    train, test = x[:2000], x[2000:]
    mean, chol = train.mean(0), torch.linalg.cholesky(torch.cov(train.T))
    whiten = torch.linalg.inv(chol).T
    return (train - mean) @ whiten, (test - mean) @ whiten


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("components", [1, 3, 5])
def test_held_out_log_likelihood_is_as_good_as_scikit_learns(components, covariance, device):
    mixture_module = pytest.importorskip("sklearn.mixture")
    train, test = five_dimensional_data()
    ridge = 1e-3
    ours = fit_gaussian_mixture(
        train.to(device),
        components,
        covariance,
        ridge=ridge,
        restarts=3,
        generator=torch.Generator().manual_seed(0),
    )
    ours_score = ours.log_prob(test.to(device)).mean().item()
    theirs = mixture_module.GaussianMixture(
        components, covariance_type=covariance, reg_covar=ridge, n_init=3, random_state=0
    ).fit(train.numpy())
    theirs_score = theirs.score(test.numpy())
    assert ours_score >= theirs_score - 0.02, (ours_score, theirs_score)


def test_restarts_keep_the_best_start():
    train, _ = five_dimensional_data()
    generator = torch.Generator().manual_seed(1)
    singles = [fit_gaussian_mixture(train, 5, generator=generator) for _ in range(4)]
    best = fit_gaussian_mixture(train, 5, restarts=4, generator=torch.Generator().manual_seed(1))
    scores = [m.log_prob(train).mean().item() for m in singles]
    assert best.log_prob(train).mean().item() == pytest.approx(max(scores), abs=1e-12)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_em_from_a_start_climbs_from_it_and_stops_at_its_fixed_point(covariance):
    train, _ = five_dimensional_data()
    subset = fit_gaussian_mixture(train[:300], 3, covariance, generator=torch.Generator())
    refit = fit_gaussian_mixture(train, 3, covariance, start=subset)
    # EM never lowers the training likelihood of its start
    assert refit.log_prob(train).mean() >= subset.log_prob(train).mean()
    # and the start is a fixed point of a converged fit: one more run hardly moves it
    again = fit_gaussian_mixture(train, 3, covariance, start=refit)
    torch.testing.assert_close(again.loc, refit.loc, atol=5e-3, rtol=0)
    stopped = fit_gaussian_mixture(train, 3, covariance, start=subset, iterations=1)
    assert subset.log_prob(train).mean() <= stopped.log_prob(train).mean()  # one EM step
    assert stopped.log_prob(train).mean() < refit.log_prob(train).mean()


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (GaussianMixture(2, 2), "start has 2 components"),
        (GaussianMixture(3, 4), "of dim 4"),
        (GaussianMixture(3, 2, "diag"), "'diag' covariance"),
        (torch.zeros(3), "start must be a GaussianMixture"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_start_that_does_not_fit_the_fit_is_refused(start, message):
    with pytest.raises(ValueError, match=message):
        fit_gaussian_mixture(X, 3, "full", start=start)


def test_the_same_generator_state_gives_the_same_fit():
    train, _ = five_dimensional_data()
    first, second = (
        fit_gaussian_mixture(train, 4, "diag", generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    )
    for name, buffer in first.state_dict().items():
        assert torch.equal(buffer, second.state_dict()[name]), name


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_a_singular_covariance_without_ridge_says_to_increase_it(covariance):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64).repeat(5, 1)
    with pytest.raises(ValueError, match="increase ridge"):
        fit_gaussian_mixture(x, 1, covariance, ridge=0.0)


def test_empty_components_are_re_seeded_at_data_rows():
    # Three distinct rows, five components: k-means++ must repeat centres, so two clusters
    # start empty; they must be re-seeded onto rows (not left at weight ~0 away from the
    # data), and nothing may be NaN.
    rows = torch.tensor([[1.0, 1.0], [4.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    x = rows.repeat(50, 1)
    mixture = fit_gaussian_mixture(x, 5, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(b).all() for b in mixture.buffers())
    assert torch.isfinite(mixture.log_prob(x)).all()
    weights = mixture.logits.softmax(-1)
    torch.testing.assert_close(weights.sum(), x.new_tensor(1.0))
    assert weights.min() >= 0.5 / len(x)
    assert torch.cdist(mixture.loc, rows).min(-1).values.max() < 1e-6


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_state_dict_round_trip_gives_identical_log_prob(covariance, device):
    x = torch.randn(400, 3, dtype=torch.float64, device=device)
    mixture = fit_gaussian_mixture(x, 4, covariance, generator=torch.Generator().manual_seed(0))
    assert list(mixture.parameters()) == []  # buffers: a flow's optimiser never moves them
    assert set(mixture.state_dict()) == {"logits", "loc", "scale_tril"}
    saved = io.BytesIO()
    torch.save(mixture.state_dict(), saved)
    saved.seek(0)
    fresh = GaussianMixture(4, 3, covariance).to(device, torch.float64)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    assert torch.equal(fresh.log_prob(x), mixture.log_prob(x))


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_float32_in_gives_float32_buffers_on_the_inputs_device(covariance, device):
    x = torch.randn(300, 2, device=device)
    mixture = fit_gaussian_mixture(x, 2, covariance, generator=torch.Generator().manual_seed(0))
    for buffer in mixture.buffers():
        assert buffer.dtype == torch.float32 and buffer.device.type == device.type
    assert mixture.log_prob(x).dtype == torch.float32
    assert mixture.sample(3).dtype == torch.float32
    scale_tril = mixture.scale_tril
    off = (
        scale_tril.triu(1)
        if covariance == "full"
        else scale_tril - scale_tril.diagonal(dim1=-2, dim2=-1).diag_embed()
    )
    assert (off == 0).all()


X = torch.randn(20, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"components": 0}, "components must be an integer >= 1"),
        ({"components": 2.0}, "components must be an integer"),
        ({"covariance": "spherical"}, "covariance must be one of"),
        ({"x": X[:, 0]}, "x must be 2-D"),
        ({"x": X[:2], "components": 3}, "at least components=3 rows"),
        ({"x": torch.cat([X, torch.tensor([[float("nan"), 0.0]])])}, "x must be finite"),
        ({"x": X.numpy()}, "x must be a torch.Tensor"),
        ({"x": torch.ones(20, 2, dtype=torch.long)}, "floating-point"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"restarts": 0}, "restarts must be an integer >= 1"),
        ({"ridge": -1.0}, "ridge must be"),
        ({"tolerance": float("nan")}, "tolerance must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_fit_argument_errors_name_the_argument(kwargs, message):
    arguments = {"x": X, "components": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit_gaussian_mixture(arguments.pop("x"), arguments.pop("components"), **arguments)


def test_module_errors_name_the_argument():
    with pytest.raises(ValueError, match="components must be"):
        GaussianMixture(0, 2)
    with pytest.raises(ValueError, match="dim must be"):
        GaussianMixture(2, 0)
    with pytest.raises(ValueError, match="covariance must be one of"):
        GaussianMixture(2, 2, "tied")
    mixture = GaussianMixture(2, 3)
    with pytest.raises(ValueError, match="context must be None"):
        mixture.log_prob(torch.zeros(3), context=torch.zeros(1))
    with pytest.raises(ValueError, match="context must be None"):
        mixture.sample(2, context=torch.zeros(1))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        mixture.log_prob(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        mixture.sample(-1)
    eye = torch.eye(3).repeat(2, 1, 1)
    with pytest.raises(ValueError, match=r"loc must have shape \(2, 3\)"):
        mixture.set(torch.zeros(2), torch.zeros(3, 2), eye)
    with pytest.raises(ValueError, match="scale_tril must be lower-triangular"):
        mixture.set(torch.zeros(2), torch.zeros(2, 3), eye + torch.ones(3, 3).triu(1))
    with pytest.raises(ValueError, match="positive diagonal"):
        mixture.set(torch.zeros(2), torch.zeros(2, 3), -eye)
    with pytest.raises(ValueError, match="logits must be finite"):
        mixture.set(torch.tensor([0.0, float("inf")]), torch.zeros(2, 3), eye)
    with pytest.raises(ValueError, match="scale_tril must be diagonal"):
        GaussianMixture(2, 3, "diag").set(
            torch.zeros(2), torch.zeros(2, 3), eye + torch.ones(3, 3).tril(-1)
        )
