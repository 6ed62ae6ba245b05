"""Time per SVI step of flow guides, interleaved and repeated, on posteriordb posteriors.

The accuracy runs of ``vi_guides.py`` time each guide once, in sequence, and on a shared
virtual machine one run can be 1.5x slower than the next. Here every guide is timed in
``--reps`` rounds of ``--steps`` steps, rounds interleaved across guides, and the fastest
round is kept. The AutoFlow guides run with ``stl=True`` but no warm-up, which is the cost
of every step after a warm-up ends.

    python benchmarks/guide_step_time.py [--posteriors ...] [--steps 200] [--reps 3]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import pandas as pd
import pyro
import torch
from posteriordb import POSTERIORS, load
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal
from pyro.optim import Adam
from vi_guides import pyro_planar

import pyroflows

GUIDES = {
    "pyroflows realnvp": partial(pyroflows.AutoFlow, flow="realnvp"),
    "pyroflows realnvp, stl": partial(pyroflows.AutoFlow, flow="realnvp", stl=True),
    "pyroflows planar K=8": partial(pyroflows.AutoFlow, flow="planar", layers=8),
    "pyroflows planar K=8, stl": partial(pyroflows.AutoFlow, flow="planar", layers=8, stl=True),
    "pyro planar K=8": partial(pyro_planar, k=8),
    "pyro AutoIAFNormal": AutoIAFNormal,
    "pyro AutoMultivariateNormal": AutoMultivariateNormal,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posteriors", nargs="+", default=POSTERIORS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    rows = []
    for name in args.posteriors:
        post = load(name, dtype=torch.float32)  # Pyro's flow guides fail in float64
        store = pyro.get_param_store()
        svis, scopes = {}, {}
        for label, make in GUIDES.items():
            pyro.set_rng_seed(0)
            with store.scope() as scopes[label]:  # each guide its own parameters
                guide = make(post.model)
                svis[label] = SVI(post.model, guide, Adam({"lr": 5e-3}), Trace_ELBO())
                try:
                    for _ in range(20):  # set up and warm the caches; not timed
                        svis[label].step()
                except (RuntimeError, ValueError) as error:
                    print(name, label, "fails:", str(error).splitlines()[0][:60])
                    del svis[label]
        if not svis:
            continue
        best = dict.fromkeys(svis, float("inf"))
        for _ in range(args.reps):
            for label, svi in svis.items():
                with store.scope(scopes[label]):
                    start = time.perf_counter()
                    try:
                        for _ in range(args.steps):
                            svi.step()
                    except (RuntimeError, ValueError):  # reported as NaN
                        best[label] = float("nan")
                    best[label] = min(best[label], (time.perf_counter() - start) / args.steps)
        row = {"posterior": name.split("-")[1], **{k: 1e3 * v for k, v in best.items()}}
        rows.append(row)
        print(row, flush=True)
    table = pd.DataFrame(rows).set_index("posterior")
    print(table.round(2).to_markdown())
    ours = table["pyroflows planar K=8, stl"] / table["pyro planar K=8"]
    print(f"planar K=8 stl / Pyro planar K=8: {ours.min():.2f} to {ours.max():.2f}")


if __name__ == "__main__":
    main()
