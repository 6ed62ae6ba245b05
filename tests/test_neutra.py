"""NeuTra HMC: Pyro's ``NeuTraReparam`` runs NUTS in the space of a trained ``AutoFlow``.

NeuTra (Hoffman et al. 2019) needs the guide's transform in its sampling direction, the
flow's forward map, with its log|det J|, at every gradient NUTS takes. Every registered
family has a closed-form forward (``forward_method`` ``"analytic"``, or ``"sequential"``:
one pass per dimension), and for each:

* the density NUTS sees is exactly the model's, pulled back through the guide's transform
  (with the Jacobian computed by autograd, not by the flow);
* a guide trained briefly on a small funnel with a known posterior gives NUTS draws that,
  mapped back with ``neutra.transform_sample``, match that posterior.

The same check fails for a warp with a wrong Jacobian, and a family without a forward map
cannot be a guide at all: it fails at its first SVI step, naming the layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size
from pyro.optim import Adam
from torch import Tensor

import pyroflows
from pyroflows.transforms import Flow, FlowStack, NotInvertibleError, registry

FORWARD = {name: pyroflows.build(name, 3).forward_method for name in pyroflows.list_flows()}
ANALYTIC = sorted(name for name, method in FORWARD.items() if method == "analytic")
SEQUENTIAL = sorted(name for name, method in FORWARD.items() if method == "sequential")
# an ODE solve per evaluation (cnf): its density check runs in CI's slow set, and no chain
INTEGRATED = sorted(name for name, method in FORWARD.items() if method == "integrated")
NUM_SAMPLES = 250
# The default run chains NUTS for one family of each forward kind; CI's slow run (pytest -m
# slow) chains it for every family (the density check below runs for all in both). NUTS in
# the warp of the small spline guides (nsf, nsf_ar) takes short steps, their trained
# splines bending sharply in the tails: 30 to 60 s a chain on one core, against 3 s for
# the others.
IN_THE_DEFAULT_RUN = {"realnvp", "planar", "maf"}
# NUTS(jit_compile=True) traces the potential; ignore_jit_warnings hides the tracer's own
# warnings, and this filter torch.jit's deprecation notice.
JIT_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")
Model = Callable[[Tensor], None]


def nuts_param(name: str) -> pytest.param:
    """``name`` as a test parameter, marked slow outside :data:`IN_THE_DEFAULT_RUN`."""
    return pytest.param(name, marks=[] if name in IN_THE_DEFAULT_RUN else [pytest.mark.slow])


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """NUTS on a 3-D model is many tiny operations, fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def funnel(device: torch.device) -> tuple[Model, Tensor]:
    r"""A 3-D model with a funnel and data, and its observations.

    :math:`\log s \sim \mathcal{N}(0, 1)`, :math:`x \mid s \sim \mathcal{N}(0, \sqrt{s})`
    (a funnel: the scale of :math:`x` is :math:`e^{v/2}` in :math:`v = \log s`) and
    :math:`\mu \sim \mathcal{N}(0, 1)` with five observations :math:`y_i \sim
    \mathcal{N}(\mu, 1)`. The exact posterior: :math:`\log s` and :math:`x / \sqrt{s}` are
    independent standard normals, and :math:`\mu \sim \mathcal{N}(\sum y / 6, 1/\sqrt 6)`.
    """
    zero = torch.zeros((), device=device, dtype=torch.float64)
    y = torch.tensor([0.3, 1.1, -0.2, 0.8, 1.5], device=device, dtype=torch.float64)

    def model(y: Tensor) -> None:
        scale = pyro.sample("scale", dist.LogNormal(zero, 1.0))
        pyro.sample("x", dist.Normal(zero, scale.sqrt()))
        mu = pyro.sample("mu", dist.Normal(zero, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    return model, y


def standardised(draws: dict[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    """The draws mapped to three independent standard normals under the exact posterior of
    :func:`funnel`."""
    n = len(y)
    return {
        "log scale": draws["scale"].log(),
        "x / sqrt(scale)": draws["x"] / draws["scale"].sqrt(),
        "mu, standardised": (draws["mu"] - y.sum() / (n + 1)) * math.sqrt(n + 1),
    }


def check_posterior(draws: dict[str, Tensor], y: Tensor) -> None:
    r"""Each standardised coordinate :math:`z` of one chain's draws has :math:`E z = 0` and
    :math:`E z^2 = 1` within 4 Monte Carlo standard errors (:math:`1/\sqrt{n_\text{eff}}`
    and :math:`\sqrt{2/n_\text{eff}}`, from the chain's own effective sample size), and an
    effective sample size of at least 20, so that a stuck chain fails rather than passing
    on a wide error bar."""
    for coordinate, z in standardised(draws, y).items():
        for moment, values, sd in [("E z", z, 1.0), ("E z^2 - 1", z**2 - 1, math.sqrt(2))]:
            ess = float(effective_sample_size(values.unsqueeze(0), chain_dim=0, sample_dim=1))
            error = float(values.mean())
            assert ess >= 20, (coordinate, moment, ess)
            assert abs(error) < 4 * sd / math.sqrt(ess), (coordinate, moment, error, ess)


def trained_guide(name: str, model: Model, y: Tensor, steps: int = 300) -> pyroflows.AutoFlow:
    """A small ``AutoFlow`` of family ``name`` (two layers where the family has layers, one
    hidden layer of 16), trained by ``steps`` SVI steps from its Pathfinder start, then
    frozen, as NeuTra needs."""
    options = {"hidden": (16,)}
    if "layers" in registry.family_options(name):
        options["layers"] = 2
    guide = pyroflows.AutoFlow(model, name, **options)
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(steps):
        svi.step(y)
    return guide.requires_grad_(False)


def neutra_draws(guide: pyroflows.AutoFlow, model: Model, y: Tensor) -> dict[str, Tensor]:
    """A short NUTS chain on ``model`` reparametrised by ``guide``, mapped back to the
    model's sites."""
    neutra = NeuTraReparam(guide)
    kernel = NUTS(neutra.reparam(model), jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, warmup_steps=150, num_samples=NUM_SAMPLES, disable_progbar=True)
    mcmc.run(y)
    (latent,) = mcmc.get_samples().values()  # NeuTra's one shared latent site
    return neutra.transform_sample(latent)


def test_every_family_has_a_forward_that_neutra_can_use():
    """Every family registered at collection has a closed-form forward or an integrated
    one (an ODE solve, cnf: documented in docs/inference.md), so the parametrisations below
    cover them all: one with a numerical forward or none would need its own NeuTra test,
    and a line in docs/inference.md. (Tests register families of their own at run time;
    those are not NeuTra's concern.)"""
    assert set(FORWARD.values()) <= {"analytic", "sequential", "integrated"}, FORWARD


@pytest.mark.parametrize(
    "name",
    ANALYTIC + SEQUENTIAL + [pytest.param(n, marks=pytest.mark.slow) for n in INTEGRATED],
)
def test_neutra_density_is_the_model_pulled_back_through_the_guide(name, device):
    r"""At any point :math:`z` of NeuTra's space, the log-density of the reparametrised
    model is :math:`\log p(c(T z)) + \log|\det J_c| + \log|\det J_T(z)|`, with :math:`T`
    the guide's transform, :math:`c` the constraints' bijections and :math:`J_T` taken by
    autograd."""
    model, y = funnel(device)
    guide = trained_guide(name, model, y, steps=20)
    neutra = NeuTraReparam(guide)
    reparametrised = neutra.reparam(model)
    transform = guide.get_transform()
    for z in torch.randn(5, 3, device=device, dtype=torch.float64):
        conditioned = poutine.condition(reparametrised, {"scale_shared_latent": z})
        got = poutine.trace(conditioned).get_trace(y).log_prob_sum()

        jacobian = torch.autograd.functional.jacobian(transform, z)
        expected = torch.linalg.slogdet(jacobian).logabsdet
        values = {}
        for site, unconstrained in guide._unpack_latent(transform(z)):
            bijection = biject_to(site["fn"].support)
            values[site["name"]] = bijection(unconstrained)
            expected = expected + bijection.log_abs_det_jacobian(
                unconstrained, values[site["name"]]
            )
        expected = (
            expected + poutine.trace(poutine.condition(model, values)).get_trace(y).log_prob_sum()
        )
        torch.testing.assert_close(got, expected)


@JIT_WARNINGS
@pytest.mark.parametrize("name", [nuts_param(name) for name in ANALYTIC])
def test_neutra_nuts_matches_the_posterior_with_an_analytic_forward(name, device):
    model, y = funnel(device)
    draws = neutra_draws(trained_guide(name, model, y), model, y)
    assert {v.device.type for v in draws.values()} == {device.type}
    assert draws["scale"].shape == (NUM_SAMPLES,)
    check_posterior(draws, y)


@JIT_WARNINGS
@pytest.mark.parametrize("name", [nuts_param(name) for name in SEQUENTIAL])
def test_neutra_nuts_matches_the_posterior_with_a_sequential_forward(name, device):
    """Autoregressive families that sample in ``dim`` passes (maf, nsf_ar) work too; each
    NUTS gradient costs ``dim`` network passes, twice (``NeuTraReparam`` calls the
    transform, then its ``log_abs_det_jacobian``, and pyroflows caches nothing)."""
    model, y = funnel(device)
    draws = neutra_draws(trained_guide(name, model, y), model, y)
    check_posterior(draws, y)


class WithoutJacobian(Flow):
    """A guide's warp with its log|det J| left out: NUTS then targets the wrong density."""

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow.dim)
        self.flow = flow

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_det = self.flow.forward_and_log_det(x)
        return y, torch.zeros_like(log_det)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = self.flow.inverse_and_log_det(y)
        return x, torch.zeros_like(log_det)


@JIT_WARNINGS
def test_the_check_fails_for_a_warp_with_a_wrong_jacobian(device, monkeypatch):
    model, y = funnel(device)
    guide = trained_guide("realnvp", model, y)
    # the flow has learnt the funnel: its log-det varies (a constant one would not matter)
    base = torch.randn(1000, 3, device=device, dtype=torch.float64)
    assert guide.flow.forward_and_log_det(base)[1].std() > 0.3
    wrong = WithoutJacobian(guide.transform)
    monkeypatch.setattr(guide, "get_transform", lambda *args, **kwargs: wrong)
    draws = neutra_draws(guide, model, y)
    with pytest.raises(AssertionError, match="log scale"):
        check_posterior(draws, y)


class InverseOnly(Flow):
    """A layer with no forward map: ``x = 2 y`` in the inverse direction only."""

    forward_method = "unavailable"

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return 2 * y, y.new_full(y.shape[:-1], self.dim * math.log(2))


def test_a_family_without_a_forward_map_cannot_be_a_guide_and_the_error_names_the_layer(
    device, monkeypatch
):
    """A guide draws with its forward map, so a family without one fails at its first SVI
    step and never reaches NeuTra (which needs a guide that has run)."""
    monkeypatch.setitem(
        registry._FAMILIES, "inverse_only", lambda dim, **options: FlowStack([InverseOnly(dim)])
    )
    model, y = funnel(device)
    guide = pyroflows.AutoFlow(model, "inverse_only")
    with pytest.raises(NotInvertibleError, match="InverseOnly has no forward direction"):
        SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO()).step(y)
