"""Training steps run on one device without host synchronisation (issue 15, item 1).

Each test builds a model on the CPU (data-dependent starts read values, once, outside any
step), moves it to the test device and runs training steps under
:class:`device_check.DeviceRecorder`, which fails on a value read on the host (``.item()``,
a Python branch on a tensor) or on a tensor on another device. The device is ``meta``
(tensors without values: a stand-in for a GPU, on which every value read and every stray CPU
constant fails as well), or the suite's ``--device`` when that is an accelerator.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from device_check import DeviceRecorder, HostSyncError

import pyroflows
from pyroflows.density.estimator import density_families
from pyroflows.density.matching import MatchingObjective
from pyroflows.density.training import adam, negative_log_likelihood, training_step
from pyroflows.inference.bounds import FlowMixture, mixture_logits
from pyroflows.inference.vi import posterior_flow, reverse_kl_loss
from pyroflows.transforms import FlowStack

FAMILIES = pyroflows.list_flows()
#: options that make a family's step sync-free: an adaptive ODE solver decides on the host
#: whether to accept each step (torchdiffeq), so the cnf family is checked at a fixed step
SYNC_FREE = {"cnf": {"solver": "rk4", "steps": 4}}
STEPS = 2
#: every family alone, and mixtures of a few (a mixture's density inverts every component:
#: a root search of 64 steps per layer for planar and sylvester, slow through the check)
MIXED = [(family, 1) for family in FAMILIES] + [("realnvp", 3), ("nsf", 2), ("radial", 2)]


@pytest.fixture
def target(device: torch.device) -> torch.device:
    """The device the steps run on: the suite's accelerator, else ``meta``."""
    pyro.enable_validation(False)  # validating arguments reads their values
    return device if device.type != "cpu" else torch.device("meta")


def build(family: str, dim: int, **options) -> pyroflows.transforms.Flow:
    return pyroflows.build(family, dim, **{**SYNC_FREE.get(family, {}), **options})


def run_steps(step, *args, device: torch.device) -> None:
    with DeviceRecorder(device) as seen:
        for _ in range(STEPS):
            loss = step(*args)
    assert seen.devices <= {device.type, "cpu"} and seen.operations > 0
    assert loss.device == device and loss.dim() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_maximum_likelihood_step(family, target):
    flow = build(family, 3).to(target)
    base = dist.Normal(torch.zeros(3, device=target), torch.ones(3, device=target)).to_event(1)
    model = pyroflows.FlowDistribution(base, flow)
    params = list(flow.parameters())
    step = training_step(negative_log_likelihood(model), params, adam(params, 1e-3), 5.0)
    run_steps(step, torch.randn(64, 3, device=target), None, device=target)


def estimator_model(family: str, objective: str = "likelihood", context: bool = False):
    """A fitted estimator's model on a table with real, positive, bounded, integer and
    boolean columns (each a different column map), its flow trained for one epoch, with
    the table's rows and their contexts (two columns, or none)."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "real": rng.normal(size=200),
            "positive": rng.lognormal(size=200),
            "share": rng.uniform(0.05, 0.95, size=200),
            "count": rng.poisson(3.0, size=200),
            "flag": rng.uniform(size=200) < 0.3,
        }
    )
    options = SYNC_FREE.get(family, {})
    estimator = pyroflows.DensityEstimator(
        family, epochs=1, select=False, progress=False, seed=0, objective=objective, **options
    )
    given = pd.DataFrame(rng.normal(size=(200, 2))) if context else None
    estimator.fit(frame, given)
    rows = torch.tensor(frame.to_numpy(dtype=np.float64), dtype=torch.float32)
    given = None if given is None else torch.tensor(given.to_numpy(), dtype=torch.float32)
    return estimator.model, rows, given


def check_estimator_step(model, loss, rows, context, target) -> None:
    model = model.to(target).train()
    params = [p for p in model.parameters() if p.requires_grad]
    step = training_step(loss(model), params, adam(params, 1e-3), 5.0)
    given = None if context is None else context[:64].to(target)
    run_steps(step, rows[:64].to(target), given, device=target)


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("family", density_families())
def test_estimator_step(family, context, target):
    model, rows, given = estimator_model(family, context=context)
    check_estimator_step(model, negative_log_likelihood, rows, given, target)


def test_flow_matching_step(target):
    model, rows, _ = estimator_model("cnf", "flow_matching")
    loss = lambda model: MatchingObjective(model, "independent")  # noqa: E731
    check_estimator_step(model, loss, rows, None, target)


@pytest.mark.parametrize(("family", "components"), MIXED)
def test_reverse_kl_step(family, components, target):
    base = dist.Normal(torch.zeros(2, device=target), torch.ones(2, device=target)).to_event(1)
    options = SYNC_FREE.get(family, {})
    parts = [posterior_flow(family, torch.randn(2), 1.0, **options) for _ in range(components)]
    flows = [pyroflows.FlowDistribution(base, FlowStack(p).to(target)) for p in parts]
    q = FlowMixture(flows, mixture_logits(components, torch.zeros(2, device=target)))
    params = q.parameters if components > 1 else q.parameters[1:]

    def banana(z):
        return -0.5 * (z[..., 0] ** 2 + (z[..., 1] - z[..., 0] ** 2) ** 2)

    loss = reverse_kl_loss(q, banana, 8, alpha=1.0, importance=1)
    step = training_step(loss, params, adam(params, 1e-3), 100.0)
    run_steps(step, 0.5, device=target)


def test_the_check_catches_a_host_sync_and_a_stray_device(target):
    x = torch.ones(3, device=target)
    with pytest.raises(HostSyncError, match="host sync"), DeviceRecorder(target):
        if (x > 0).all():
            pass
    with pytest.raises(HostSyncError, match="stray device"), DeviceRecorder(target):
        x + torch.ones(3)


def regression(device: torch.device):
    """A Pyro model with a real, a positive and a vector site, every tensor on ``device``."""
    data = torch.zeros(20, device=device)

    def model():
        loc = pyro.sample("loc", dist.Normal(torch.zeros((), device=device), 1.0))
        scale = pyro.sample("scale", dist.LogNormal(torch.zeros((), device=device), 1.0))
        weights = pyro.sample("w", dist.Normal(torch.zeros(3, device=device), 1.0).to_event(1))
        with pyro.plate("data", 20, device=device):
            pyro.sample("y", dist.Normal(loc + weights.sum(), scale), obs=data)

    return model


@pytest.mark.parametrize(("family", "components"), MIXED)
def test_guide_step(family, components, target):
    """An AutoFlow guide's step by StratifiedELBO's differentiable loss (Pyro's Trace_ELBO
    reads each site's log-density on the host, and SVI.step returns the loss as a float:
    one sync each per step, Pyro's own)."""
    guide = pyroflows.AutoFlow(
        regression(torch.device("cpu")), family, components=components, **SYNC_FREE.get(family, {})
    )
    with torch.no_grad():
        guide()  # the prototype trace and the start read values: once, on the CPU
    guide.to(target)
    elbo = pyroflows.StratifiedELBO(num_particles=4, vectorize_particles=True)
    params = list(guide.parameters())
    step = training_step(
        lambda: elbo.differentiable_loss(regression(target), guide),
        params,
        adam(params, 1e-3),
        10.0,
    )
    run_steps(step, device=target)
