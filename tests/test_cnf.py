"""The cnf family beyond the conformance suite: the trace estimators, the solvers, the
adjoint, and flow matching from DensityEstimator and the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import pyroflows
from pyroflows.cli import main
from pyroflows.density.matching import flow_matching_loss, matched_field, ot_pairing
from pyroflows.transforms.cnf import CNF, count_evaluations


def moved_cnf(dim: int, seed: int = 0, **options) -> CNF:
    """A CNF in float64 whose field is moved off zero."""
    torch.manual_seed(seed)
    flow = CNF(dim, hidden=(16, 16), **options).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinsons_log_det_is_unbiased_for_the_exact_one(probe):
    exact = moved_cnf(3, trace="exact", solver="rk4", steps=10)
    estimated = moved_cnf(3, trace="hutchinson", probe=probe, solver="rk4", steps=10)
    x = torch.randn(1, 3, dtype=torch.float64).expand(4000, 3)  # one point, 4000 probes
    truth = exact.forward_and_log_det(x[:1])[1]
    y, draws = estimated.forward_and_log_det(x)
    torch.testing.assert_close(y[0], exact.forward_and_log_det(x[:1])[0][0])  # same map
    error = draws.std() / len(draws) ** 0.5
    assert draws.std() > 0  # an estimate, not the exact trace
    assert abs(draws.mean() - truth) < 4 * error


def test_auto_trace_is_exact_when_scoring_and_hutchinson_when_training_a_wide_flow():
    flow = moved_cnf(20, solver="rk4", steps=4)
    x = torch.randn(5, 20, dtype=torch.float64)
    flow.train()
    assert not torch.equal(flow.forward_and_log_det(x)[1], flow.forward_and_log_det(x)[1])
    flow.eval()
    exact = moved_cnf(20, trace="exact", solver="rk4", steps=4)
    torch.testing.assert_close(flow.forward_and_log_det(x)[1], exact.forward_and_log_det(x)[1])


def test_fixed_steps_and_tolerances_set_the_number_of_evaluations():
    x = torch.randn(8, 2, dtype=torch.float64)
    with count_evaluations(moved_cnf(2, solver="rk4", steps=7)) as rk4:
        moved_cnf(2, solver="rk4", steps=7).forward_and_log_det(x)
    assert rk4 == [0]  # counted only for the flow given
    flow = moved_cnf(2, solver="rk4", steps=7)
    with count_evaluations(flow) as rk4:
        flow.forward_and_log_det(x)
    assert rk4[0] == 4 * 7
    loose, tight = moved_cnf(2, rtol=1e-3, atol=1e-3), moved_cnf(2, rtol=1e-9, atol=1e-9)
    with count_evaluations(loose) as few, count_evaluations(tight) as many:
        loose.forward_and_log_det(x)
        tight.forward_and_log_det(x)
    assert 0 < few[0] < many[0]


def test_the_adjoint_gives_the_gradients_of_back_propagation_through_the_solver():
    x = torch.randn(6, 3, dtype=torch.float64)
    gradients = []
    for adjoint in (False, True):
        flow = moved_cnf(3, adjoint=adjoint)
        y, ladj = flow.forward_and_log_det(x)
        (y.square().sum() + ladj.sum()).backward()
        gradients.append(flow.field.net.params.grad)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-6, atol=1e-7)


def test_flow_matching_loss_is_zero_for_the_true_field_of_a_shift():
    field = matched_field(pyroflows.build("cnf", 2, hidden=(8,)).double())
    shift = torch.tensor([1.5, -0.5], dtype=torch.float64)
    with torch.no_grad():  # v = shift: the last layer's weights 0, its bias 1, gain = shift
        (_, _), (weight, bias) = field.field.net.weights()
        weight.zero_()
        bias.fill_(1.0)
        field.field.net.gain.copy_(shift)
    x0 = torch.randn(64, 2, dtype=torch.float64)
    with torch.no_grad():
        assert float(flow_matching_loss(field, x0, x0 + shift)) == pytest.approx(0, abs=1e-20)
        assert float(flow_matching_loss(field, x0, x0 + 2 * shift)) > 0.1


def test_the_ot_coupling_undoes_a_shuffle():
    x0 = torch.randn(50, 3)
    order = torch.randperm(50)
    pairing = ot_pairing(x0, x0[order] + 0.01)  # x1[i] is x0[order[i]], nearly
    assert torch.equal(pairing, order)


def three_blobs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    return centres[rng.integers(0, 3, n)] + 0.4 * rng.normal(size=(n, 2))


def three_blobs_log_density(x: np.ndarray) -> np.ndarray:
    centres = [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]
    pdf = [stats.multivariate_normal(c, 0.16 * np.eye(2)).pdf(x) for c in centres]
    return np.log(np.mean(pdf, 0))


@pytest.mark.parametrize(
    "coupling",
    ["independent", pytest.param("ot", marks=pytest.mark.slow)],  # OT: 17 s
)
def test_flow_matching_reaches_the_exact_density_of_a_mixture(coupling):
    estimator = pyroflows.DensityEstimator(
        "cnf",
        objective="flow_matching",
        coupling=coupling,
        select=False,
        epochs=150,
        hidden=(64, 64),
        progress=False,
        seed=0,
    )
    estimator.fit(three_blobs(3000, 0))
    test = three_blobs(2000, 1)
    exact = three_blobs_log_density(test).mean()
    score = estimator.score(test)  # the exact trace: an exact log-density of the fitted flow
    gaussian = stats.multivariate_normal(*_moments(three_blobs(3000, 0))).logpdf(test).mean()
    assert score > exact - 0.25, (score, exact)
    assert score > gaussian + 1.0
    assert estimator.history["valid_loss"].iloc[-1] < estimator.history["valid_loss"].iloc[0]


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x.T)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"flow": "realnvp", "objective": "flow_matching"}, "pass flow='cnf'"),
        ({"flow": "cnf", "layers": 2, "objective": "flow_matching"}, "with layers > 1"),
        ({"flow": "cnf", "objective": "score"}, "objective must be one of"),
        ({"flow": "cnf", "coupling": "sinkhorn"}, "coupling must be one of"),
    ],
)
def test_bad_objectives_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        pyroflows.DensityEstimator(**options)


def test_the_cli_fits_by_flow_matching_and_the_saved_model_scores(tmp_path):
    data = tmp_path / "blobs.csv"
    pd.DataFrame(three_blobs(400, 0), columns=["a", "b"]).to_csv(data, index=False)
    model = tmp_path / "model.pt"
    args = ["fit", str(data), "--flow", "cnf", "--objective", "flow_matching", "--epochs", "3"]
    main([*args, "--out", str(model), "--quiet", "--seed", "0"])
    loaded = pyroflows.DensityEstimator.load(model)
    assert loaded.fit_options["objective"] == "flow_matching"
    assert np.isfinite(loaded.log_prob(pd.read_csv(data).head(5))).all()
