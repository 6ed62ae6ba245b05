"""Tabular density estimation: pyroflows side by side with Pyro's built-in flows and zuko.

One run, one machine, same data. Every flow below has ``--layers`` layers with two hidden
layers of ``--hidden`` units, and the plain-loop contenders all train for ``--steps`` steps
of fused Adam (``--lr``) on batches of ``--batch`` rows of standardised data:

- pyroflows ``realnvp``, ``glow``, ``maf``, ``nsf`` (spline coupling) and ``nsf_ar``
  (autoregressive spline) (plain loop, and ``realnvp`` also compiled with
  ``torch.compile``);
- Pyro: ``affine_coupling`` and ``spline_coupling`` stacks (with reversing permutations),
  and an ``affine_autoregressive`` stack used in its inverse direction, so that its density
  pass is one network call as in a MAF;
- zuko: ``RealNVP``, ``NSF`` (autoregressive splines), ``MAF``.

Then ``pyroflows.DensityEstimator`` (as a user runs it: preprocessing, whitening start,
early stopping on a validation split taken from the training rows), and two baselines: a
full-covariance Gaussian and a Gaussian mixture with a validated number of components.

Data sets: ``banana`` (synthetic, 8-D, known density: the gap KL(p || q) to the truth is
reported, whose limit is 0), ``cancer`` (scikit-learn's breast cancer table, 569 x 30) and
``digits`` (scikit-learn's digits, 1797 x 64 integer pixels, dequantised with U(0, 1)
noise). Reported: held-out log-likelihood in nats per row in the data's units, training
steps per second, and the seconds to draw 10,000 samples.

    python benchmarks/density_peers.py [--device cuda] [--steps 2000] [--data banana cancer]

Pyro's transforms cache the last (x, y) pair by tensor identity; every step indexes a
fresh batch tensor, so no contender reads a cached value.
"""

from __future__ import annotations

import argparse
import math
import warnings
from functools import partial

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import zuko
from common import timed
from sklearn.datasets import load_breast_cancer, load_digits

import pyroflows
from pyroflows.density.baselines import gaussian_loglik, mixture_loglik

# --------------------------------------------------------------------------- data


def banana(n: int, rng: np.random.Generator, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a known density, and their exact log-density.

    Pairs (x, y) with x ~ N(0, 1.5^2), y = 0.5 x^2 + 0.5 e, e ~ N(0, 1): the map
    (x, e) -> (x, y) has Jacobian 2 in y, so log p = log N(x) + log N(e) - log 0.5.
    """
    x = rng.normal(0, 1.5, size=(n, dim // 2))
    e = rng.normal(size=(n, dim // 2))
    y = 0.5 * x**2 + 0.5 * e
    rows = np.empty((n, dim))
    rows[:, 0::2], rows[:, 1::2] = x, y
    normal = -0.5 * np.log(2 * np.pi)
    log_p = (normal - np.log(1.5) - 0.5 * (x / 1.5) ** 2 + normal - 0.5 * e**2 - np.log(0.5)).sum(
        1
    )
    return rows, log_p


def load(name: str, seed: int = 0):
    """(train, test, test log-density or None) as float64 arrays; the split is 80/20."""
    rng = np.random.default_rng(seed)
    truth = None
    if name == "banana":
        rows, log_p = banana(12_500, rng)
        return rows[:10_000], rows[10_000:], log_p[10_000:]
    if name == "cancer":
        rows = load_breast_cancer().data.astype(np.float64)
    elif name == "digits":
        rows = load_digits().data.astype(np.float64) + rng.uniform(size=(1797, 64))
    else:
        raise ValueError(f"unknown data set {name!r}")
    order = rng.permutation(len(rows))
    n_test = len(rows) // 5
    return rows[order[n_test:]], rows[order[:n_test]], truth


# ---------------------------------------------------------------------- contenders


def normal(dim, device, dtype):
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    return dist.Normal(zeros, torch.ones_like(zeros), validate_args=False).to_event(1)


def ours(family):
    def make(dim, layers, hidden, device, dtype):
        flow = pyroflows.build(family, dim, layers=layers, hidden=(hidden, hidden))
        q = pyroflows.FlowDistribution(normal(dim, device, dtype), flow.to(device, dtype))
        return flow, q.log_prob, lambda n: q.sample((n,))

    return make


def pyro_stack(kind):
    def make(dim, layers, hidden, device, dtype):
        reverse = torch.arange(dim - 1, -1, -1, device=device)  # Permute's index is no buffer
        parts = []
        for i in range(layers):
            if kind == "affine":
                parts.append(T.affine_coupling(dim, hidden_dims=[hidden, hidden]))
            elif kind == "spline":
                parts.append(T.spline_coupling(dim, hidden_dims=[hidden, hidden], count_bins=8))
            else:  # autoregressive: each layer draws its own random order
                parts.append(T.affine_autoregressive(dim, hidden_dims=[hidden, hidden]))
            if i < layers - 1 and kind != "autoregressive":
                parts.append(T.Permute(reverse))
        stack = T.ComposeTransformModule(parts).to(device, dtype)
        # Pyro's autoregressive layers are IAFs (one-pass forward); used inverted, the
        # density pass is their forward pass.
        transform = stack.inv if kind == "autoregressive" else stack
        q = dist.TransformedDistribution(normal(dim, device, dtype), [transform])
        return stack, q.log_prob, lambda n: q.sample((n,))

    return make


def zuko_flow(cls):
    def make(dim, layers, hidden, device, dtype):
        flow = cls(dim, transforms=layers, hidden_features=(hidden, hidden)).to(device, dtype)
        return flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,))

    return make


CONTENDERS = {
    "pyroflows realnvp": ours("realnvp"),
    "pyroflows glow": ours("glow"),
    "pyroflows maf": ours("maf"),
    "pyroflows nsf": ours("nsf"),
    "pyroflows nsf_ar": ours("nsf_ar"),
    "pyro affine_coupling": pyro_stack("affine"),
    "pyro spline_coupling": pyro_stack("spline"),
    "pyro affine_autoregressive (inverted)": pyro_stack("autoregressive"),
    "zuko RealNVP": zuko_flow(zuko.flows.RealNVP),
    "zuko NSF": zuko_flow(zuko.flows.NSF),
    "zuko MAF": zuko_flow(zuko.flows.MAF),
}


def plain_loop(module, log_prob, train, steps, batch, lr, device, compile=False) -> float:
    """Fused Adam on random minibatches; steps per second (compilation not timed)."""
    optimiser = torch.optim.Adam(module.parameters(), lr=lr, fused=True)

    def loss_fn(rows):
        return -log_prob(rows).mean()

    loss_fn = torch.compile(loss_fn) if compile else loss_fn
    generator = torch.Generator(device=device).manual_seed(0)
    indices = torch.randint(len(train), (steps + 5, batch), device=device, generator=generator)

    def run(index_rows):
        for index in index_rows:
            loss = loss_fn(train[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

    run(indices[:5])  # warm-up (and compilation), not timed
    return steps / timed(lambda: run(indices[5:]), device)[1]


@torch.no_grad()
def held_out(log_prob, test, log_jacobian) -> float:
    value = torch.cat([log_prob(chunk) for chunk in test.split(4096)]).mean().item()
    return value + log_jacobian if math.isfinite(value) else -math.inf


def record(rows, data, truth, model, loglik, steps_per_s=None, sample_s=None, note=""):
    """Append one result row (with the gap to the true density where it is known)."""
    gap = None if truth is None else truth.mean() - loglik
    rows.append(
        {
            "data": data,
            "model": model + note,
            "held-out loglik": loglik,
            "KL(p||q)": gap,
            "steps/s": steps_per_s,
            "10k samples (s)": sample_s,
        }
    )
    print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", nargs="+", default=["banana", "cancer", "digits"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled row")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="run only the plain-loop contenders whose names contain one of these words",
    )
    parser.add_argument("--no-estimator", action="store_true", help="skip DensityEstimator")
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=["realnvp", "glow", "maf", "nsf"],
        help="families fitted by DensityEstimator",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device, dtype = torch.device(args.device), torch.float32
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"{args.layers} layers, hidden ({args.hidden}, {args.hidden}), fused Adam lr "
        f"{args.lr}, batch {args.batch}, {args.steps} steps\n"
    )
    rows = []
    for name in args.data:
        train_np, test_np, truth = load(name)
        mean, std = train_np.mean(0), train_np.std(0)
        std = np.where(std > 0, std, 1.0)
        log_jacobian = float(-np.log(std).sum())
        train = torch.tensor((train_np - mean) / std, device=device, dtype=dtype)
        test = torch.tensor((test_np - mean) / std, device=device, dtype=dtype)
        dim = train.shape[1]

        data_label = f"{name} ({len(train_np) + len(test_np)}x{dim})"
        add = partial(record, rows, data_label, truth)
        if truth is not None:
            add("true density", truth.mean())
        add("Gaussian (full covariance)", gaussian_loglik(train_np, test_np).mean())
        mixture, k = mixture_loglik(train_np, test_np)
        add(f"Gaussian mixture ({k} comp.)", mixture.mean())
        contenders = {
            label: make
            for label, make in CONTENDERS.items()
            if args.models is None or any(word in label for word in args.models)
        }
        for label, make in contenders.items():
            torch.manual_seed(0)
            module, log_prob, sample = make(dim, args.layers, args.hidden, device, dtype)
            rate = plain_loop(module, log_prob, train, args.steps, args.batch, args.lr, device)
            with torch.no_grad():
                sample(100)
                sample_s = timed(partial(sample, 10_000), device)[1]
            add(label, held_out(log_prob, test, log_jacobian), rate, sample_s, ", plain loop")
        if not args.no_compile:
            torch.manual_seed(0)
            module, log_prob, _ = ours("realnvp")(dim, args.layers, args.hidden, device, dtype)
            rate = plain_loop(
                module, log_prob, train, args.steps, args.batch, args.lr, device, True
            )
            add(
                "pyroflows realnvp",
                held_out(log_prob, test, log_jacobian),
                rate,
                None,
                ", plain loop, torch.compile",
            )
        for family in () if args.no_estimator else args.estimators:
            estimator = pyroflows.DensityEstimator(
                family,
                layers=args.layers,
                hidden=(args.hidden, args.hidden),
                batch_size=args.batch,
                lr=args.lr,
                seed=0,
                progress=False,
                device=device,
            )
            history = estimator.fit(pd.DataFrame(train_np))
            add(
                f"pyroflows DensityEstimator {family}",
                estimator.score(pd.DataFrame(test_np)),
                note=f" ({len(history)} epochs)",
            )
    table = pd.DataFrame(rows)
    print()
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
