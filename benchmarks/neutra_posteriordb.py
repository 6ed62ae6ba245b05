"""NUTS, plain and with a pyroflows NeuTra warp, on the posteriors no guide gets right.

For each posterior (default: the two that ``posteriordb_guides.py`` leaves out of reach)
and each seed: plain NUTS on the model, and NUTS on the model reparametrised by a realnvp
``AutoFlow`` (``NeuTraReparam``) trained by ``--steps`` SVI steps with
``pyroflows.decaying_adam``; one chain each, ``--warmup`` and ``--draws``, float64, one
thread. Scores against the reference draws as in ``posteriordb_guides.py`` (standardised
mean and sd errors, sliced W1), the chain's smallest effective sample size over the
scalars, and the wall time (NeuTra's includes the guide's training).

    python benchmarks/neutra_posteriordb.py [--posteriors NAME ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from posteriordb import load
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size
from vi_guides import compare

import pyroflows

OUT_OF_REACH = ["eight_schools-eight_schools_noncentered", "gp_pois_regr-gp_pois_regr"]


def all_sites(model, latent: list[dict[str, torch.Tensor]], names) -> dict[str, np.ndarray]:
    """Every site in ``names`` (deterministic ones included) at each latent draw."""
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for draw in latent:
        trace = poutine.trace(poutine.condition(model, draw)).get_trace()
        for name in names:
            values[name].append(trace.nodes[name]["value"].detach().numpy())
    return {name: np.stack(v) for name, v in values.items()}


def chain(model, warmup: int, draws: int) -> tuple[dict[str, torch.Tensor], float]:
    kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, warmup_steps=warmup, num_samples=draws, disable_progbar=True)
    started = time.perf_counter()
    mcmc.run()
    return mcmc.get_samples(), time.perf_counter() - started


def min_ess(samples: dict[str, np.ndarray]) -> float:
    flat = np.concatenate([v.reshape(len(v), -1) for v in samples.values()], axis=1)
    return float(effective_sample_size(torch.as_tensor(flat).unsqueeze(0)).min())


def run(name: str, method: str, seed: int, args) -> dict:
    post = load(name, dtype=torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    started = time.perf_counter()
    if method == "plain NUTS":
        samples, _ = chain(post.model, args.warmup, args.draws)
        n = len(next(iter(samples.values())))
        latent = [{k: v[i] for k, v in samples.items()} for i in range(n)]
    else:
        guide = pyroflows.AutoFlow(post.model, "realnvp")
        svi = SVI(post.model, guide, pyroflows.decaying_adam(args.steps), Trace_ELBO())
        for _ in range(args.steps):
            svi.step()
        neutra = NeuTraReparam(guide.requires_grad_(False))
        samples, _ = chain(neutra.reparam(post.model), args.warmup, args.draws)
        (z,) = samples.values()
        latent = [neutra.transform_sample(row) for row in z]
    seconds = time.perf_counter() - started
    draws = all_sites(post.model, latent, list(post.reference))
    return {**compare(draws, post.reference), "min ESS": min_ess(draws), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posteriors", nargs="+", default=OUT_OF_REACH)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.posteriors:
        for method in ["plain NUTS", "NeuTra NUTS (realnvp)"]:
            for seed in args.seeds:
                rows.append({"posterior": name, "method": method, "seed": seed})
                rows[-1].update(run(name, method, seed, args))
                print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    scores = ["mean err (max)", "sd err (max)", "sliced W1", "min ESS", "seconds"]
    grouped = frame.groupby(["posterior", "method"], sort=False)[scores]
    print(
        (
            grouped.mean().round(3).astype(str) + " / " + grouped.max().round(3).astype(str)
        ).to_markdown()
    )


if __name__ == "__main__":
    main()
