"""Maximum-likelihood training with validation and early stopping."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows.density.training import evaluate, fit_max_likelihood


def gaussian_model(dim, device, name="realnvp"):
    zeros = torch.zeros(dim, device=device, dtype=torch.float64)
    base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
    flow = pyroflows.build(name, dim).to(device=device, dtype=torch.float64)
    return pyroflows.FlowDistribution(base, flow)


def test_fit_learns_a_known_gaussian_to_its_entropy(device):
    torch.manual_seed(0)
    scale = torch.tensor([3.0, 0.2], device=device, dtype=torch.float64)
    data = torch.randn(3000, 2, device=device, dtype=torch.float64) * scale + 5
    model = gaussian_model(2, device, "actnorm")
    model.transform.initialize(data[:2000])  # the data-dependent start, asked for
    history = fit_max_likelihood(model, data[:2000], data[2000:], epochs=50, progress=False)
    entropy = 0.5 * 2 * (1 + math.log(2 * math.pi)) + scale.log().sum().item()
    assert abs(evaluate(model, data[2000:]) - entropy) < 0.1
    assert list(history.columns) == ["epoch", "train_loss", "valid_loss", "lr"]


def test_early_stopping_restores_the_best_epoch(device):
    torch.manual_seed(0)
    data = torch.randn(60, 3, device=device, dtype=torch.float64)  # tiny: overfits fast
    model = gaussian_model(3, device)
    start = evaluate(model, data[30:])
    history = fit_max_likelihood(
        model,
        data[:30],
        data[30:],
        epochs=400,
        batch_size=8,
        lr=1e-2,
        patience=10,
        progress=False,
    )
    assert len(history) < 400  # stopped early
    best = min(history["valid_loss"].min(), start)  # the start is a candidate too
    assert evaluate(model, data[30:]) == pytest.approx(best, rel=1e-9)
    assert history["valid_loss"].iloc[-1] > best
    assert not model.transform.training


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("epochs", 0, "epochs must be a positive integer"),
        ("batch_size", 1.5, "batch_size must be a positive integer"),
        ("lr", -1.0, "lr must be a finite positive number"),
        ("clip", float("inf"), "clip must be a finite positive number"),
        ("tolerance", float("nan"), "tolerance must be a finite number >= 0"),
    ],
)
def test_bad_options_are_named(option, value, message):
    model = gaussian_model(2, "cpu")
    data = torch.randn(10, 2, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=message):
        fit_max_likelihood(model, data, data, progress=False, **{option: value})


def test_fitting_never_ends_worse_on_validation_than_it_started(device):
    # Tiny data and a large learning rate: every epoch overfits, so the start must win.
    torch.manual_seed(0)
    data = torch.randn(40, 4, device=device, dtype=torch.float64)
    model = gaussian_model(4, device)
    start = evaluate(model, data[20:])
    history = fit_max_likelihood(
        model, data[:20], data[20:], epochs=30, batch_size=4, lr=0.05, patience=5, progress=False
    )
    assert history["valid_loss"].min() > start
    assert evaluate(model, data[20:]) == pytest.approx(start, rel=1e-12)
