"""Flow guides side by side with Pyro's: test energies and reference posteriors.

Every guide is trained by the same SVI loop (Trace_ELBO, Adam, same learning rate, steps
and particles) in one run on one machine:

(a) the four 2-D energies of Rezende & Mohamed (2015), as Pyro models with one latent site;
    KL(q || p) is exact up to Monte Carlo error, since log Z comes from quadrature. pyroflows'
    AutoFlow planar against Pyro's AutoNormalizingFlow with a planar stack at the same
    length K, plus AutoIAFNormal, AutoMultivariateNormal and AutoFlow realnvp;
(b) posteriors of posteriordb (../shared/posteriordb, see posteriordb.py), against their
    reference draws: standardised error of posterior means and standard deviations
    (|guide - reference| / reference sd, mean and max over parameters), sliced Wasserstein
    distance (on parameters standardised by the reference), PSIS k-hat, and wall time per
    SVI step.

    python benchmarks/vi_guides.py [--part energies|posteriors|both] [--steps N]
        [--families realnvp nsf ...] [--components 3 ...] [--decay] [--anneal N]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from posteriordb import POSTERIORS, load
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormalizingFlow,
    init_to_feasible,
)
from pyro.optim import Adam

import pyroflows
from pyroflows.inference.diagnostics import psis_khat, to_inference_data
from pyroflows.inference.targets import ENERGIES, energy_log_density, grid_log_normalizer

GuideMaker = Callable[[Callable], pyro.infer.autoguide.AutoGuide]


def pyro_planar(model, k: int):
    return AutoNormalizingFlow(model, partial(T.iterated, k, T.planar))


def train(
    model,
    guide,
    steps: int,
    particles: int,
    lr: float,
    vectorize: bool,
    decay: bool = False,
    anneal: int = 0,
) -> float:
    """Run SVI; return seconds per step. ``decay``: ClippedAdam, the rate falling tenfold
    over the steps, gradients clipped at norm 10 (else Adam at a constant rate).
    ``anneal > 0``: the likelihood tempered by ``pyroflows.temper``, beta rising linearly
    from 0.01 to 1 over the first ``anneal`` steps. A mixture guide (``components`` K > 1)
    trains by ``pyroflows.StratifiedELBO`` with ``particles // K`` draws per component."""
    pyro.clear_param_store()
    if isinstance(guide, pyroflows.AutoFlow) and guide.components > 1:
        elbo = pyroflows.StratifiedELBO(
            num_particles=max(1, particles // guide.components), vectorize_particles=vectorize
        )
    else:
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=vectorize)
    if decay:
        optim = pyroflows.decaying_adam(steps, lr)
    else:
        optim = Adam({"lr": lr})
    svi = SVI(model, guide, optim, elbo)
    with pyroflows.temper(0.01 if anneal else 1.0):
        svi.step()  # builds the guide; not timed
    start = time.perf_counter()
    for step in range(1, steps):
        with pyroflows.temper(min(1.0, 0.01 + step / anneal) if anneal else 1.0):
            svi.step()
    return (time.perf_counter() - start) / (steps - 1)


# --------------------------------------------------------------------------- energies


def energy_model(log_p: Callable[[torch.Tensor], torch.Tensor]):
    """p(z) ∝ exp(log_p(z)) as a Pyro model: a wide N(0, 10^2) site corrected by a factor."""
    wide = dist.Normal(torch.zeros(2), 10.0).to_event(1)

    def model():
        z = pyro.sample("z", wide)
        pyro.factor("target", log_p(z) - wide.log_prob(z))

    return model


@torch.no_grad()
def guide_kl(guide, log_p, log_z: float, n: int = 100_000) -> float:
    posterior = guide.get_posterior()
    # Pyro's flows can score only their own cached samples; a FlowMixture has no rsample
    z = posterior.rsample((n,)) if posterior.has_rsample else posterior.sample((n,))
    return (posterior.log_prob(z) - log_p(z)).mean().item() + log_z


def energies(args) -> pd.DataFrame:
    # Pyro's AutoNormalizingFlow and AutoIAFNormal start from N(0, I) whatever the model;
    # the planar guides of length K are given the same start (loc 0, scale 1, no Pathfinder
    # start) so that the flows alone differ. Each family (--families) runs at AutoFlow's
    # defaults, its start included, as a user gets it, beside Pyro's Gaussian at its own.
    same_start = {"init_loc_fn": init_to_feasible, "init_scale": 1.0, "start": None}
    guides: dict[str, GuideMaker] = {}
    for k in args.lengths:
        guides[f"pyroflows planar K={k}, N(0, I) start"] = partial(
            pyroflows.AutoFlow, flow="planar", layers=k, stl=args.stl, **same_start
        )
        guides[f"pyro planar K={k}"] = partial(pyro_planar, k=k)
    for family in args.families:
        guides[f"pyroflows {family}"] = partial(pyroflows.AutoFlow, flow=family, stl=args.stl)
        for k in args.components:
            guides[f"pyroflows {family}, {k} components"] = partial(
                pyroflows.AutoFlow, flow=family, components=k
            )
    guides["pyro AutoIAFNormal"] = AutoIAFNormal
    guides["pyro AutoMultivariateNormal"] = AutoMultivariateNormal
    rows = []
    for name in args.energies:
        log_p = energy_log_density(name)
        log_z = grid_log_normalizer(log_p)
        model = energy_model(log_p)
        for label, make in guides.items():
            torch.manual_seed(0)
            pyro.set_rng_seed(0)
            guide = make(model)
            seconds = train(
                model, guide, args.steps, args.particles, args.lr, True, args.decay, args.anneal
            )
            kl = guide_kl(guide, log_p, log_z)
            rows.append({"energy": name, "guide": label, "KL(q||p)": kl, "ms/step": 1e3 * seconds})
            print(f"{name} {label:32s} KL {kl:8.4f}  {1e3 * seconds:6.2f} ms/step", flush=True)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- posteriors


def flatten(draws: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([draws[n].reshape(len(draws[n]), -1) for n in names], axis=1)


def sliced_wasserstein(
    a: np.ndarray, b: np.ndarray, directions: int = 200, seed: int = 0
) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance of the projections."""
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    a = a[rng.choice(len(a), n, replace=False)]
    b = b[rng.choice(len(b), n, replace=False)]
    u = rng.normal(size=(a.shape[1], directions))
    u /= np.linalg.norm(u, axis=0)
    return float(np.abs(np.sort(a @ u, axis=0) - np.sort(b @ u, axis=0)).mean())


def compare(samples: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    names = sorted(reference)
    ref, got = flatten(reference, names), flatten(samples, names)
    mean, sd = ref.mean(0), ref.std(0)
    mean_error = np.abs(got.mean(0) - mean) / sd
    sd_error = np.abs(got.std(0) - sd) / sd
    return {
        "mean err (avg)": mean_error.mean(),
        "mean err (max)": mean_error.max(),
        "sd err (avg)": sd_error.mean(),
        "sd err (max)": sd_error.max(),
        "sliced W1": sliced_wasserstein((got - mean) / sd, (ref - mean) / sd),
    }


def posteriors(args) -> pd.DataFrame:
    settled = {"warmup": args.warmup, "stl": True}  # see AutoFlow's docstring
    guides: dict[str, GuideMaker] = {
        "pyroflows realnvp": partial(pyroflows.AutoFlow, flow="realnvp"),
        "pyroflows realnvp, warmup+stl": partial(pyroflows.AutoFlow, flow="realnvp", **settled),
        "pyroflows planar K=8, warmup+stl": partial(
            pyroflows.AutoFlow, flow="planar", layers=8, **settled
        ),
        "pyro planar K=8": partial(pyro_planar, k=8),
        "pyro AutoIAFNormal": AutoIAFNormal,
        "pyro AutoMultivariateNormal": AutoMultivariateNormal,
    }
    rows = []
    for name in args.posteriors:
        post = load(name, dtype=args.dtype)
        for label, make in guides.items():
            torch.manual_seed(0)
            pyro.set_rng_seed(0)
            guide = make(post.model)
            try:
                seconds = train(
                    post.model, guide, args.steps, args.particles, args.lr, False, args.decay
                )
                data = to_inference_data(guide, post.model, num_samples=args.draws)
                samples = {n: data.posterior[n].values[0] for n in post.reference}
                k_hat = psis_khat(
                    torch.as_tensor(data.sample_stats["log_importance_weight"].values[0])
                )
                row = {
                    **compare(samples, post.reference),
                    "k-hat": k_hat,
                    "ms/step": 1e3 * seconds,
                }
            except (RuntimeError, ValueError) as error:  # a guide that fails is reported
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"}
            rows.append({"posterior": name, "dim": post.dim, "guide": label, **row})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["energies", "posteriors", "both"], default="both")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--particles", type=int, default=None, help="default 64 / 1")
    parser.add_argument("--lengths", type=int, nargs="*", default=[2, 8, 32])
    parser.add_argument("--energies", nargs="+", default=list(ENERGIES))
    parser.add_argument(
        "--families",
        nargs="+",
        default=["realnvp"],
        help="AutoFlow families on the energies, each at its defaults ('all': every one)",
    )
    parser.add_argument(
        "--anneal", type=int, default=0, help="energies: temper every guide over N steps"
    )
    parser.add_argument(
        "--components",
        type=int,
        nargs="*",
        default=[],
        help="energies: each family also as a mixture guide of K flows (StratifiedELBO)",
    )
    parser.add_argument(
        "--decay",
        action="store_true",
        help="ClippedAdam for every guide: the rate falls tenfold, gradients clipped at 10",
    )
    parser.add_argument(
        "--stl", action="store_true", help="AutoFlow guides on the energies use stl=True"
    )
    parser.add_argument("--posteriors", nargs="+", default=POSTERIORS)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument(
        "--warmup", type=int, default=1000, help="AutoFlow warm-up steps in the posteriors part"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--float64",
        action="store_true",
        help="run the posteriors in float64 (Pyro's AutoIAFNormal and planar stacks then fail)",
    )
    args = parser.parse_args()
    if args.families == ["all"]:
        args.families = pyroflows.list_flows()
    torch.set_num_threads(args.threads)
    args.dtype = torch.float64 if args.float64 else torch.float32
    pyro.enable_validation(False)  # let guides that leave the support show it in the metrics
    warnings.filterwarnings("ignore", message="Encountered NaN")  # shows as NaN in the table
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {args.steps} steps, lr {args.lr}")
    pd.set_option("display.width", 200)
    if args.part in ("energies", "both"):
        args.particles = args.particles or 64
        table = energies(args)
        print(
            table.pivot(index="guide", columns="energy", values="KL(q||p)").round(3).to_markdown()
        )
        print(table.groupby("guide")["ms/step"].mean().round(2).to_markdown())
    if args.part in ("posteriors", "both"):
        args.particles = args.particles or 1
        table = posteriors(args)
        print(table.round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
