"""RealNVP density estimation: pyroflows side by side with Pyro's built-in flows and zuko.

Every contender gets the same data, depth (``--layers`` coupling layers), width
(``--hidden`` units in two hidden layers), optimiser (Adam, ``--lr``), batch size and number
of steps, in one run on one machine. The peers are trained by a plain loop of ``--steps``
steps, as their documentation shows; pyroflows is run both by the same plain loop (the
engine compared alone) and by its own trainer (``fit_max_likelihood``: validation split,
early stopping, best weights restored), which is how a pyroflows user trains. A
full-covariance Gaussian fitted to the training rows is the baseline every flow should beat.

Reported: held-out log-likelihood in nats per row in the data's own units (higher is
better), training steps per second, and the time to draw 10,000 samples.

    python benchmarks/density_realnvp.py [--device cuda] [--steps 2000]

Pyro's transforms cache the last (x, y) pair by tensor identity; every step here indexes a
fresh batch tensor, so no contender reads a cached value.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import zuko
from common import Split, split, timed

import pyroflows
from pyroflows.training import fit_max_likelihood

LogProb = Callable[[torch.Tensor], torch.Tensor]
Sampler = Callable[[int], torch.Tensor]


def normal(dim: int, device, dtype) -> dist.Distribution:
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def make_pyroflows(dim, layers, hidden, device, dtype):
    flow = pyroflows.build("realnvp", dim, layers=layers, hidden=(hidden, hidden))
    q = pyroflows.FlowDistribution(normal(dim, device, dtype), flow.to(device, dtype))
    return list(flow.parameters()), q.log_prob, lambda n: q.sample((n,)), q


def make_pyro(dim, layers, hidden, device, dtype):
    # Pyro's Permute keeps its permutation in a plain attribute, not a buffer, so .to(device)
    # does not move it: it must be made on the device.
    reverse = torch.arange(dim - 1, -1, -1, device=device)
    parts = []
    for i in range(layers):
        parts.append(T.affine_coupling(dim, hidden_dims=[hidden, hidden]))
        if i < layers - 1:
            parts.append(T.Permute(reverse))
    stack = T.ComposeTransformModule(parts).to(device, dtype)
    q = dist.TransformedDistribution(normal(dim, device, dtype), [stack])
    return list(stack.parameters()), q.log_prob, lambda n: q.sample((n,)), None


def make_zuko(dim, layers, hidden, device, dtype):
    flow = zuko.flows.RealNVP(dim, transforms=layers, hidden_features=(hidden, hidden))
    flow = flow.to(device, dtype)
    return (
        list(flow.parameters()),
        lambda x: flow().log_prob(x),
        lambda n: flow().sample((n,)),
        None,
    )


CONTENDERS = {
    "pyroflows realnvp": make_pyroflows,
    "pyro affine_coupling": make_pyro,
    "zuko RealNVP": make_zuko,
}


def plain_loop(params, log_prob: LogProb, data: Split, steps, batch, lr, device) -> float:
    """Train for ``steps`` Adam steps on random minibatches; return steps per second."""
    optimiser = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator(device=device).manual_seed(0)
    indices = torch.randint(len(data.train), (steps, batch), device=device, generator=generator)

    def run():
        for index in indices:
            loss = -log_prob(data.train[index]).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

    _, seconds = timed(run, device)
    return steps / seconds


@torch.no_grad()
def held_out(log_prob: LogProb, data: Split) -> float:
    value = torch.cat([log_prob(chunk) for chunk in data.test.split(4096)]).mean().item()
    return value + data.log_jacobian if math.isfinite(value) else -math.inf


def sampling_time(sample: Sampler, device) -> float:
    with torch.no_grad():
        sample(100)
        return timed(lambda: sample(10_000), device)[1]


def gaussian(data: Split) -> float:
    train = data.train.double()
    mvn = dist.MultivariateNormal(train.mean(0), torch.cov(train.T))
    return mvn.log_prob(data.test.double()).mean().item() + data.log_jacobian


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", nargs="+", default=["moons", "cancer2", "cancer30", "digits64"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.float32
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{args.layers} coupling layers, hidden ({args.hidden}, {args.hidden}), Adam lr "
        f"{args.lr}, batch {args.batch}, {args.steps} steps\n"
    )
    print("| data | rows x dim | model | held-out loglik | steps/s | 10k samples (s) |")
    print("|---|---|---|---|---|---|")
    for name in args.data:
        data = split(name, device, dtype)
        shape = f"{len(data.train) + len(data.valid) + len(data.test)} x {data.dim}"
        print(f"| {name} | {shape} | Gaussian (full covariance) | {gaussian(data):.3f} | | |")
        for label, make in CONTENDERS.items():
            torch.manual_seed(0)
            params, log_prob, sample, _ = make(data.dim, args.layers, args.hidden, device, dtype)
            rate = plain_loop(params, log_prob, data, args.steps, args.batch, args.lr, device)
            print(
                f"| {name} | {shape} | {label}, plain loop | {held_out(log_prob, data):.3f} "
                f"| {rate:.0f} | {sampling_time(sample, device):.4f} |"
            )
        torch.manual_seed(0)
        _, log_prob, _, q = make_pyroflows(data.dim, args.layers, args.hidden, device, dtype)
        history = fit_max_likelihood(
            q,
            data.train,
            data.valid,
            epochs=10_000,
            batch_size=args.batch,
            lr=args.lr,
            patience=30,
            progress=False,
        )
        print(
            f"| {name} | {shape} | pyroflows realnvp, early stopping ({len(history)} epochs) "
            f"| {held_out(log_prob, data):.3f} | | |"
        )


if __name__ == "__main__":
    main()
