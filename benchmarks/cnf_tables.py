"""Continuous flows on tables: the cnf family by flow matching and by likelihood, beside
realnvp, nsf and zuko's CNF.

Tables, splits and units are those of ``density_tables.py`` (64/16/20 split per seed,
columns standardised by the training rows, log-likelihoods in nats per row of the
standardised table), plus ``mixture2d``: a 2-D mixture of 4 Gaussians drawn as that
script's 8-D ``mixture`` is (known density, 10,000 rows). For known densities the gap
KL(p || q) on the test rows is reported too.

Methods (``pyroflows.DensityEstimator`` with ``select=False``, so the flow itself is
scored, not the Gaussian, mixture or blend it could fall back to; each on the training
rows with the validation rows given):

- ``cnf FM``: ``DensityEstimator("cnf", objective="flow_matching")``, independent coupling;
- ``cnf FM, OT``: the same with ``coupling="ot"`` (minibatch optimal transport);
- ``cnf ML``: ``DensityEstimator("cnf")`` (maximum likelihood through the solver, exact
  trace up to 16 columns, Hutchinson's above), at most ``--ml-epochs`` epochs;
- ``realnvp``, ``nsf``: ``DensityEstimator(family)`` at its defaults;
- ``zuko CNF``: ``zuko.flows.CNF`` (hidden (64, 64), zuko's defaults otherwise: exact trace,
  tolerances 1e-6/1e-5), trained by likelihood with AdamW (lr 1e-3, weight decay 1e-4,
  gradient norm clipped at 5, batches of 256, shuffled epochs), validated after every
  epoch with the best weights restored, for the wall time that ``cnf FM`` took on the
  same split (equal wall time; a run of ``cnf FM`` must come first).

Reported per table, seed and method: test log-likelihood (nats per row), KL where known,
fit seconds, seconds and field evaluations (NFE) to sample 1,000 rows and to score the
test rows. Torch uses ``--threads`` threads.

    python benchmarks/cnf_tables.py                          # default tables, 3 seeds
    python benchmarks/cnf_tables.py --tables mixture2d --seeds 0 --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zuko
from density_tables import Split, Table, load, mixture, split, write_csv
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

import pyroflows
from pyroflows.transforms.cnf import count_evaluations

TABLES = ["mixture2d", "mixture", "iris", "wine", "diabetes", "banana"]
SAMPLES = 1000


def load_table(name: str, quick: bool) -> Table:
    if name == "mixture2d":
        return mixture(2_000 if quick else 10_000, np.random.default_rng(1234), dim=2, k=4)
    return load(name, quick)


def frame(rows: np.ndarray, table: Table) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=table.columns)


def ours(data: Split, seed: int, table: Table, args, family: str, **options) -> dict:
    """A DensityEstimator fit, its test score, and the cost of sampling and scoring."""
    epochs = 100 if args.quick else 1000
    if options.get("objective", "likelihood") == "likelihood" and family == "cnf":
        epochs = min(epochs, args.ml_epochs)
    estimator = pyroflows.DensityEstimator(
        family, select=False, seed=seed, progress=False, epochs=epochs, **options
    )
    start = time.perf_counter()
    history = estimator.fit(frame(data.train, table), valid=frame(data.valid, table))
    fit_seconds = time.perf_counter() - start
    test = frame(data.test, table)
    with count_evaluations(estimator.model) as scored:
        start = time.perf_counter()
        score = estimator.score(test)
        score_seconds = time.perf_counter() - start
    with count_evaluations(estimator.model) as sampled:
        start = time.perf_counter()
        estimator.sample(SAMPLES)
        sample_seconds = time.perf_counter() - start
    return {
        "test_nats": score,
        "fit_seconds": fit_seconds,
        "score_seconds": score_seconds,
        "score_nfe": scored[0],
        "sample_seconds": sample_seconds,
        "sample_nfe": sampled[0],
        "settings": {"epochs": len(history)},
    }


def zuko_cnf(data: Split, seed: int, table: Table, args, budget: float) -> dict:
    """zuko's CNF by likelihood for ``budget`` seconds of training (module doc)."""
    torch.manual_seed(seed)
    train, valid, test = (
        torch.tensor(part, dtype=torch.float32) for part in (data.train, data.valid, data.test)
    )
    flow = zuko.flows.CNF(train.shape[1], hidden_features=(64, 64))
    optimiser = torch.optim.AdamW(flow.parameters(), lr=1e-3, weight_decay=1e-4)

    def mean_log_prob(rows: torch.Tensor) -> float:
        flow.eval()
        with torch.no_grad():
            return torch.cat([flow().log_prob(c) for c in rows.split(4096)]).mean().item()

    start = time.perf_counter()
    best, best_state, epochs = mean_log_prob(valid), copy.deepcopy(flow.state_dict()), 0
    while time.perf_counter() - start < budget:
        flow.train()
        for index in torch.randperm(len(train)).split(256):
            loss = -flow().log_prob(train[index]).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            optimiser.step()
            if time.perf_counter() - start > budget:
                break
        epochs += 1
        score = mean_log_prob(valid)
        if score > best:
            best, best_state = score, copy.deepcopy(flow.state_dict())
    fit_seconds = time.perf_counter() - start
    flow.load_state_dict(best_state)
    evaluations = [0]
    count = lambda *_: evaluations.__setitem__(0, evaluations[0] + 1)  # noqa: E731
    flow.transform.ode.register_forward_hook(count)
    start = time.perf_counter()
    score = mean_log_prob(test)
    score_seconds, score_nfe = time.perf_counter() - start, evaluations[0]
    evaluations[0] = 0
    start = time.perf_counter()
    with torch.no_grad():
        flow().sample((SAMPLES,))
    return {
        "test_nats": score,
        "fit_seconds": fit_seconds,
        "score_seconds": score_seconds,
        "score_nfe": score_nfe,
        "sample_seconds": time.perf_counter() - start,
        "sample_nfe": evaluations[0],
        "settings": {"epochs": epochs, "budget_s": round(budget, 1)},
    }


METHODS: dict[str, Callable] = {
    "cnf FM": partial(ours, family="cnf", objective="flow_matching"),
    "cnf FM, OT": partial(ours, family="cnf", objective="flow_matching", coupling="ot"),
    "cnf ML": partial(ours, family="cnf"),
    "realnvp": partial(ours, family="realnvp"),
    "nsf": partial(ours, family="nsf"),
    "zuko CNF": zuko_cnf,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", nargs="+", default=TABLES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="2,000 synthetic rows, 100 epochs")
    parser.add_argument("--ml-epochs", type=int, default=100, help="cnf ML: most epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/cnf_tables.csv"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    print(f"torch {torch.__version__}, {args.threads} threads, seeds {args.seeds}", flush=True)
    records = []
    for name in args.tables:
        table = load_table(name, args.quick)
        for seed in args.seeds:
            data = split(table.rows, seed)
            truth = None
            if table.log_p is not None:
                truth = float(table.log_p(data.raw_test).mean()) - data.log_jacobian
            budget = math.nan
            for method in args.methods:
                run = METHODS[method]
                if method == "zuko CNF":
                    run = partial(run, budget=budget)
                try:
                    result = run(data, seed, table, args)
                except Exception as error:  # recorded; one broken method spoils no run
                    print(f"{name} seed {seed} {method} FAILED: {error!r}", flush=True)
                    result = {"test_nats": math.nan, "settings": {"error": repr(error)}}
                if method == "cnf FM":
                    budget = result["fit_seconds"]
                records.append(
                    {
                        "table": name,
                        "seed": seed,
                        "method": method,
                        "dim": table.rows.shape[1],
                        "n_train": len(data.train),
                        **result,
                        "kl": None if truth is None else truth - result["test_nats"],
                        "load_1min": round(os.getloadavg()[0], 2),
                        "settings": json.dumps(result["settings"]),
                    }
                )
                shown = {k: v for k, v in records[-1].items() if isinstance(v, float)}
                print(
                    f"{name} seed {seed} {method}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()),
                    flush=True,
                )
            write_csv(pd.DataFrame(records), args.out)
    results = pd.DataFrame(records)
    for value in ["test_nats", "kl", "fit_seconds", "score_seconds", "score_nfe", "sample_nfe"]:
        print(f"\n{value}, mean ± std over seeds\n" + table_of(results, value))


def table_of(results: pd.DataFrame, value: str) -> str:
    """Tables x methods of 'mean ± std' of ``value``."""
    stats = results.groupby(["table", "method"], sort=False)[value].agg(["mean", "std"])
    cells = stats.apply(lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}", axis=1).unstack()
    return cells[[m for m in METHODS if m in cells.columns]].to_markdown()


if __name__ == "__main__":
    main()
