"""Check the Pyro ports of the posteriordb models against their reference draws.

For each posterior (all of ``posteriordb.POSTERIORS``, or those named on the command line):

1. load it;
2. build ``AutoNormal(model)`` and take one SVI step, which must give a finite loss;
3. run a short single-chain NUTS on the port and compare every scalar parameter with the
   reference draws: the standardised error ``|mean_nuts - mean_ref| / sd_ref`` and the ratio
   ``sd_nuts / sd_ref``. A port matches when the largest standardised error is small (below
   0.3 allows for the Monte Carlo noise of a few hundred correlated draws) and the sd ratios
   are near 1.

Pyro's ``NUTS(model)`` fixes each site's bijection to the unconstrained space at
initialisation, so a support that depends on another latent (garch11's ``beta1`` in
``(0, 1 - alpha1)``) would be frozen at the initial ``alpha1``. For such models the check runs
NUTS on a potential that re-evaluates the bijection at every call instead.

    python benchmarks/check_posteriordb.py [NAME ...] [--warmup 200] [--samples 200]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import pyro
import torch
from posteriordb import POSTERIORS, Posterior, load
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_median
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.ops.stats import effective_sample_size
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import biject_to

# Per-posterior NUTS settings where the defaults do not suit: (warmup, samples, full_mass).
SETTINGS: dict[str, tuple[int | None, int | None, bool]] = {
    # badly conditioned (a dense mass matrix makes it cheap) and slow per gradient
    "diamonds-diamonds": (300, 200, True),
    # five strongly correlated coefficients: a dense mass matrix lifts the ESS
    "sblrc-blr": (None, None, True),
}

Draw = dict[str, torch.Tensor]


class FromUnconstrained(Messenger):
    """Set each latent site to ``biject_to(support)(u)`` for given unconstrained values ``u``,
    with the bijection built at run time, and accumulate log|det J| of these maps."""

    def __init__(self, values: Draw) -> None:
        super().__init__()
        self.values = values
        self.log_det: torch.Tensor | float = 0.0

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or msg["name"] not in self.values:
            return
        transform = biject_to(msg["fn"].support)
        u = self.values[msg["name"]]
        x = transform(u)
        self.log_det = self.log_det + transform.log_abs_det_jacobian(u, x).sum()
        msg["value"] = x


def prototype(model: Callable[[], None]) -> poutine.Trace:
    """A trace of the model at ``init_to_median`` values."""
    with torch.no_grad():
        return poutine.trace(InitMessenger(init_to_median)(model)).get_trace()


def latent_sites(trace: poutine.Trace) -> dict[str, dict]:
    """The latent sample sites of a trace (plates' subsample sites left out)."""
    return {
        name: site
        for name, site in trace.iter_stochastic_nodes()
        if not isinstance(site["fn"], _Subsample)
    }


def unconstrained_start(trace: poutine.Trace) -> Draw:
    return {
        name: biject_to(site["fn"].support).inv(site["value"]).detach()
        for name, site in latent_sites(trace).items()
    }


def has_dynamic_support(model: Callable[[], None], start: Draw) -> bool:
    """Whether a latent site's support has bounds that depend on other latent values."""
    values = {name: u.clone().requires_grad_() for name, u in start.items()}
    trace = poutine.trace(FromUnconstrained(values)(model)).get_trace()
    for site in latent_sites(trace).values():
        bounds = vars(site["fn"].support).values()
        if any(isinstance(b, torch.Tensor) and b.requires_grad for b in bounds):
            return True
    return False


def log_joint_unconstrained(model: Callable[[], None], values: Draw) -> torch.Tensor:
    """log p(x(u)) + log|det dx/du|, the log density of the unconstrained values ``u``."""
    handler = FromUnconstrained(values)
    trace = poutine.trace(handler(model)).get_trace()
    return trace.log_prob_sum() + handler.log_det


def svi_step(posterior: Posterior) -> float:
    pyro.clear_param_store()
    guide = AutoNormal(posterior.model)
    svi = SVI(posterior.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    loss = svi.step()
    if not math.isfinite(loss):
        raise RuntimeError(f"{posterior.name}: AutoNormal SVI step gave loss {loss}")
    return loss


def run_nuts(
    posterior: Posterior, warmup: int, samples: int, full_mass: bool, seed: int
) -> tuple[dict[str, np.ndarray], int, bool]:
    """NUTS draws of the reference quantities, the number of divergences, and whether the
    run-time-bijection potential was used."""
    model = posterior.model
    start = unconstrained_start(prototype(model))
    dynamic = has_dynamic_support(model, start)
    pyro.set_rng_seed(seed)
    options = dict(max_tree_depth=8, full_mass=full_mass)
    if dynamic:

        def potential(values: Draw) -> torch.Tensor:
            return -log_joint_unconstrained(model, values)

        kernel = NUTS(potential_fn=potential, **options)
        mcmc = MCMC(kernel, samples, warmup, initial_params=start, disable_progbar=True)
    else:
        kernel = NUTS(model, init_strategy=init_to_median, **options)
        mcmc = MCMC(kernel, samples, warmup, disable_progbar=True)
    mcmc.run()
    draws = mcmc.get_samples()
    divergences = len(mcmc.diagnostics()["divergences"]["chain 0"])

    # Replay the model at each draw to read the reference quantities, deterministic ones too.
    collected: dict[str, list[np.ndarray]] = {name: [] for name in posterior.reference}
    for i in range(samples):
        draw = {name: value[i] for name, value in draws.items()}
        handler = FromUnconstrained(draw) if dynamic else poutine.condition(data=draw)
        with torch.no_grad():
            trace = poutine.trace(handler(model)).get_trace()
        for name in collected:
            collected[name].append(trace.nodes[name]["value"].cpu().numpy())
    return {name: np.stack(values) for name, values in collected.items()}, divergences, dynamic


def compare(
    reference: dict[str, np.ndarray], draws: dict[str, np.ndarray]
) -> list[tuple[str, float, float, float]]:
    """Per scalar parameter: (name, standardised error, sd ratio, effective sample size)."""
    rows = []
    for name, ref in reference.items():
        ref = ref.reshape(len(ref), -1)
        ours = draws[name].reshape(len(draws[name]), -1)
        ess = effective_sample_size(torch.as_tensor(ours)[None], chain_dim=0, sample_dim=1)
        for j in range(ref.shape[1]):
            label = name if reference[name].ndim == 1 else f"{name}[{j + 1}]"
            sd_ref = ref[:, j].std()
            error = abs(ours[:, j].mean() - ref[:, j].mean()) / sd_ref
            rows.append((label, error, ours[:, j].std() / sd_ref, float(ess[j])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="posteriors to check (default: all)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.names or POSTERIORS

    summary = []
    begin = time.perf_counter()
    for name in names:
        tic = time.perf_counter()
        posterior = load(name)
        loss = svi_step(posterior)
        warmup, samples, full_mass = SETTINGS.get(name, (None, None, False))
        warmup, samples = warmup or args.warmup, samples or args.samples
        draws, divergences, dynamic = run_nuts(posterior, warmup, samples, full_mass, args.seed)
        rows = compare(posterior.reference, draws)
        seconds = time.perf_counter() - tic
        how = "run-time bijections" if dynamic else "NUTS(model)"
        print(f"\n== {name} (dim {posterior.dim}; AutoNormal SVI step loss {loss:.6g})")
        print(f"   NUTS {warmup}+{samples}, {how}, {divergences} divergences, {seconds:.1f} s")
        print(f"   {'parameter':<14}{'std err':>9}{'sd ratio':>10}{'ess':>8}")
        for label, error, ratio, ess in rows:
            print(f"   {label:<14}{error:9.3f}{ratio:10.3f}{ess:8.0f}")
        errors, ratios = [r[1] for r in rows], [r[2] for r in rows]
        summary.append(
            (name, max(errors), min(ratios), max(ratios), min(r[3] for r in rows), seconds)
        )
        print(f"   max standardised error {max(errors):.3f}")

    print(f"\n{'posterior':<42}{'max err':>8}{'sd ratio range':>16}{'min ess':>8}{'s':>7}")
    for name, error, low, high, ess, seconds in summary:
        verdict = "ok" if error < 0.3 and 0.7 < low and high < 1.3 else "CHECK"
        print(f"{name:<42}{error:8.3f}{low:8.2f}-{high:<7.2f}{ess:8.0f}{seconds:7.1f}  {verdict}")
    print(f"total {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
