"""Fit time of ``DensityEstimator()`` with its defaults, and where the time goes.

Three tables as a user has them (raw values, the estimator's own validation split):
scikit-learn's breast cancer (569 x 30), its digits (1797 x 64 integer pixels, dequantised
by the estimator), and a synthetic 100,000 x 10 table (five curved pairs, as in
``density_tables.banana``, with a skewed positive column in each pair). For each: the
seconds of the whole fit, of the mixture search, of each flow family trained, the epochs,
and the validation score of the chosen model.

    python benchmarks/density_fit_time.py [--threads 2] [--tables cancer digits large]

Targets (issue 12, 2 cores): cancer under 30 s, digits under 2 minutes, 100k x 10 under
5 minutes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from pyroflows import DensityEstimator


def large(rows: int = 100_000, seed: int = 0) -> pd.DataFrame:
    """Five pairs (x, y) with y = x^2 / 2 + noise, y shifted to be positive and skewed."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1.5, size=(rows, 5))
    y = np.exp(0.3 * (x**2 / 2 + rng.normal(size=(rows, 5)) / 2))
    return pd.DataFrame(
        np.c_[x, y], columns=[f"x{i}" for i in range(5)] + [f"y{i}" for i in range(5)]
    )


TABLES = {
    "cancer": lambda: load_breast_cancer(as_frame=True).frame.drop(columns=["target"]),
    "digits": lambda: load_digits(as_frame=True).frame.drop(columns=["target"]).astype("int64"),
    "large": large,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    parser.add_argument("--progress", action="store_true", help="show the progress bars")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.tables:
        frame = TABLES[name]()
        frame = frame.loc[:, frame.nunique() > 1]  # digits has constant pixels: refused
        model = DensityEstimator(seed=0, progress=args.progress)
        started = time.perf_counter()
        history = model.fit(frame)
        total = time.perf_counter() - started
        report = model.summary()
        rows.append(
            {
                "table": f"{name} ({len(frame)} x {frame.shape[1]})",
                "fit (s)": round(total, 1),
                "mixtures (s)": round(report.loc["mixture", "seconds"], 1),
                "flows (s)": round(report.loc["flow", "seconds"], 1),
                "epochs": len(history),
                "flows": report.loc["flow", "details"],
                "chosen": report.index[report["chosen"]][0],
                "valid nats": round(report["valid_nats"].max(), 3),
            }
        )
        print(rows[-1], flush=True)
    print(f"\n{args.threads} threads, torch {torch.__version__}\n")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
