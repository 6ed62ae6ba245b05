"""Flow guides with their defaults on every posteriordb posterior, over several seeds.

For each posterior of ``posteriordb.POSTERIORS`` (all in float64: in float32 the Gaussian
process's Cholesky fails for every guide) and each seed, every guide is trained by the same
plain SVI loop (``Trace_ELBO``, one particle, Adam at ``--lr``, ``--steps`` steps; with
``--decay``, ``pyroflows.decaying_adam``: the rate falling tenfold, gradients clipped at
norm 10) and compared with the reference draws: the standardised mean error ``|mean -
mean_ref| / sd_ref`` and sd error ``|sd - sd_ref| / sd_ref`` (the largest over the
posterior's scalars), the sliced Wasserstein-1 distance in standardised units, PSIS k-hat
of the guide's importance weights, and the wall time to the result (the guide's set-up,
its start included, and the steps). Guides:

- ``pyroflows realnvp``: ``AutoFlow(model, "realnvp")``, its defaults (the Pathfinder start);
- ``pathfinder alone``: the same guide's start, not trained (the normal approximation);
- ``pyro AutoMultivariateNormal`` and ``pyro AutoNormal``: Pyro's Gaussian guides.

Prints a markdown table per score (mean over seeds, and the worst seed) and writes every
row to ``--out`` (CSV); ``--summary`` prints the tables of an existing ``--out``.

    python benchmarks/posteriordb_guides.py [--seeds 0 1 2 3 4] [--posteriors NAME ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd
import pyro
import torch
from posteriordb import POSTERIORS, load
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.optim import Adam
from vi_guides import compare

import pyroflows
from pyroflows.inference.diagnostics import psis_khat, to_inference_data

GUIDES: dict[str, tuple[Callable, bool]] = {  # label: (guide maker, trained?)
    "pyroflows realnvp": (partial(pyroflows.AutoFlow, flow="realnvp"), True),
    "pathfinder alone": (partial(pyroflows.AutoFlow, flow="realnvp"), False),
    "pyro AutoMultivariateNormal": (AutoMultivariateNormal, True),
    "pyro AutoNormal": (AutoNormal, True),
}


def run(name: str, label: str, seed: int, steps: int, lr: float, draws: int, decay: bool) -> dict:
    """Fit one guide to one posterior with one seed; return its scores."""
    post = load(name, dtype=torch.float64)
    make, trained = GUIDES[label]
    pyro.clear_param_store()
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    guide = make(post.model)
    started = time.perf_counter()
    guide()  # the set-up: the prototype trace, and the start where there is one
    if trained:
        if decay:
            optim = pyroflows.decaying_adam(steps, lr)
        else:
            optim = Adam({"lr": lr})
        svi = SVI(post.model, guide, optim, Trace_ELBO())
        for _ in range(steps):
            svi.step()
    seconds = time.perf_counter() - started
    data = to_inference_data(guide, post.model, num_samples=draws)
    samples = {n: data.posterior[n].values[0] for n in post.reference}
    weights = torch.as_tensor(data.sample_stats["log_importance_weight"].values[0])
    return {**compare(samples, post.reference), "k-hat": psis_khat(weights), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posteriors", nargs="+", default=POSTERIORS)
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument(
        "--decay", action="store_true", help="ClippedAdam, rate falling tenfold, clip norm 10"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", action="store_true", help="print the tables of --out only")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/posteriordb_guides.csv"
    )
    args = parser.parse_args()
    if args.summary:
        print(summary(pd.read_csv(args.out)))
        return
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.posteriors:
        for label in args.guides:
            for seed in args.seeds:
                try:
                    row = run(name, label, seed, args.steps, args.lr, args.draws, args.decay)
                except (RuntimeError, ValueError) as error:  # a guide that fails is reported
                    row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"}
                rows.append({"posterior": name, "guide": label, "seed": seed, **row})
                print(rows[-1], flush=True)
            frame = pd.DataFrame(rows)
            with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False) as f:
                frame.to_csv(f, index=False)
            os.replace(f.name, args.out)
    print(summary(pd.DataFrame(rows)))


def summary(frame: pd.DataFrame) -> str:
    """One table per score: a row per posterior, a column per guide, each cell the mean over
    seeds / the worst seed (failed seeds counted apart)."""
    scores = ["mean err (max)", "sd err (max)", "sliced W1", "k-hat", "seconds"]
    grouped = frame.groupby(["posterior", "guide"], sort=False)
    tables = []
    for score in scores:
        cell = grouped[score].mean().round(3).astype(str) + " / "
        cell += grouped[score].max().round(3).astype(str)
        failed = grouped[score].apply(lambda s: int(s.isna().sum()))
        cell = cell.where(failed == 0, cell + f" ({failed} failed)")
        tables.append(f"{score}, mean / worst of the seeds\n\n{cell.unstack().to_markdown()}")
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
