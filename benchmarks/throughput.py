r"""Training throughput: rows per second of maximum-likelihood steps, pyroflows beside
Pyro's and zuko's flows at equal architecture, in one run on one machine.

A step is what :func:`pyroflows.density.fit_max_likelihood` runs
(:func:`~pyroflows.density.training.training_step`): the mean negative log-likelihood of a
fresh batch drawn from a fixed pool of standard-normal rows (moved to the device once),
backward, the gradient norm clipped to 5, one Adam step (fused where torch has a fused
kernel: :func:`~pyroflows.density.training.adam`). Every contender runs this same step
function, so the flows are the only difference. Measured per family (``realnvp``, ``maf``,
``nsf``, ``nsf_ar``), dimension (8, 64), batch (256 to 16,384 rows) and mode:

- ``eager``: the step as is;
- ``compiled``: the loss compiled with :func:`torch.compile` (for every library alike; the
  clipping and the optimiser stay eager, as in ``training_step``). The batch dimension is
  marked dynamic, so one compilation serves every batch size; compilation time is reported
  apart and left out of the rates.

Every flow has 5 layers with two hidden layers of 128 units (ReLU); splines have 8 bins.
The legend printed first says exactly what each contender is and where the architectures
cannot be made equal. Timing: ``--warmup`` steps (compilation included), then the
contenders of one configuration take turns (the order rotating) for ``--repeats`` rounds
of ``--rows`` rows each; the rate is the batch times the steps over the median seconds.
Pyro's transforms cache the last (x, y) pair by tensor identity; every step indexes a fresh
batch tensor, so no contender reads a cached value. Argument validation is off for every
library (``pyro.enable_validation(False)``), as in a tuned training loop.

Pyro's autoregressive transforms are IAFs: their forward (one network pass) is sampling.
The ``pyro`` column uses them inverted, so that the density pass is one network call as in
a MAF; the ``pyro as built`` column is what a Pyro user gets by putting them in a
``TransformedDistribution`` as they are: the density pass inverts them, ``dim`` sequential
network passes per layer. It is measured in eager mode where ``dim * batch`` is at most
``--sequential-limit``, and left out elsewhere (at dim 64 and 16,384 rows one step would
take minutes).

Targets (issue 15): compiled, every family at least 1.5x the faster of Pyro and zuko at
equal architecture; eager, none slower than the faster peer. The rate tables give
pyroflows over the fastest peer of the configuration, and two floors timed in turn with
the flows (:class:`MatmulFloor`): ``matmul floor``, the rate of the step's matrix products
alone, and ``floor + Adam``, the same products followed by the clipping and one fused Adam
step over one flat tensor of the networks' size. No implementation of the architecture and
training step on the device runs faster, so a floor over the fastest peer bounds the
speed-up any flow library could show over it. The closing lines count the configurations
that meet each target, those where each floor allows it, compiled pyroflows against the
peers as their users run them (eager: neither Pyro nor zuko has a compiled option of its
own), and the floor's FLOP rate beside that of a large product on the device
(:func:`gemm_rate`): how near the products run to what the device does at best.

    python benchmarks/throughput.py [--quick] [--device cuda] [--threads 2]
        [--mode eager compiled] [--family nsf ...] [--dim 8 64] [--batch 256 4096 ...]
        [--processes 1 2]

``--processes 1 2 ...`` also times pyroflows' step (the peers have no multi-process
trainer of their own) in N processes on this machine (:func:`measure_processes`): started
by :func:`torch.multiprocessing.spawn`, joined by a ``gloo`` process group on 127.0.0.1
(``nccl``, one GPU each, on ``--device cuda``), each process builds the same flow (same
seed) and wraps its loss as ``fit_max_likelihood`` does under ``torchrun``
(:class:`~torch.nn.parallel.DistributedDataParallel`: the gradients averaged over the
processes in the backward pass). Each process takes ``batch // N`` rows a step, so the
global batch stays ``batch``; each runs ``max(1, threads // N)`` threads, so N processes
use the cores of one. The timed steps run between two ``dist.barrier()`` calls, and
rank 0's seconds count; compiled, every process compiles its own loss. The 1-process
rate is pyroflows' in the race above (always measured), and the "processes" table gives
the ratio.

``--quick`` is a one-minute smoke run (eager, dim 8, two batch sizes, few rows, one
process); options given with it override its settings. Results go to
``benchmarks/results/throughput.csv`` (``--output``, a ``processes`` column: 1 for the
race), rewritten after every unit of work, so an interrupted run keeps what it measured.
The units of work are :func:`measure` (one family, dimension and mode) and
:func:`measure_processes` (the same for pyroflows alone in N processes).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.queues import SimpleQueue
from pathlib import Path

import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.distributed as distributed
import torch.multiprocessing
import zuko
from common import timed
from pyro.nn import AutoRegressiveNN, DenseNN
from torch import Tensor, nn
from zuko.distributions import DiagNormal
from zuko.flows.coupling import GeneralCouplingTransform
from zuko.lazy import UnconditionalDistribution
from zuko.transforms import MonotonicRQSTransform

import pyroflows
from pyroflows.density.training import (
    _replicated,
    adam,
    negative_log_likelihood,
    training_step,
)

LAYERS, HIDDEN, BINS, BOUND = 5, (128, 128), 8, 4.0
CLIP, LR = 5.0, 1e-3
FAMILIES = ("realnvp", "maf", "nsf", "nsf_ar")
DIMS, BATCHES, MODES = (8, 64), (256, 1024, 4096, 16384), ("eager", "compiled")
#: the table's columns, one per contender kind; "ours" is the first
#: the columns of :class:`MatmulFloor`: measured beside the flows, but no flows (not peers)
FLOOR, STEP_FLOOR = "matmul floor", "floor + Adam"
FLOORS = (FLOOR, STEP_FLOOR)
#: the CSV column of each floor over the fastest peer
FLOOR_KEYS = {FLOOR: "floor_over_fastest_peer", STEP_FLOOR: "step_floor_over_fastest_peer"}
COLUMNS = ("pyroflows", "pyro", "zuko", "zuko parts", "pyro as built", *FLOORS)
POOL_ROWS = 65536
RESULTS = Path(__file__).resolve().parent / "results" / "throughput.csv"

Loss = Callable[[Tensor, Tensor | None], Tensor]
Builder = Callable[[int, torch.device], tuple[nn.Module, Loss]]


# ---------------------------------------------------------------------- contenders


def standard_normal(dim: int, device: torch.device) -> dist.Distribution:
    zeros = torch.zeros(dim, device=device)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def mean_nll(log_prob: Callable[[Tensor], Tensor]) -> Loss:
    """The loss ``(rows, context) -> -mean log_prob(rows)`` of a peer (no context)."""

    def loss(rows: Tensor, context: Tensor | None) -> Tensor:
        return -log_prob(rows).mean()

    return loss


def ours(family: str) -> Builder:
    def build(dim: int, device: torch.device) -> tuple[nn.Module, Loss]:
        options = {"bins": BINS} if family.startswith("nsf") else {}
        flow = pyroflows.build(family, dim, layers=LAYERS, hidden=HIDDEN, **options).to(device)
        model = pyroflows.FlowDistribution(standard_normal(dim, device), flow)
        return flow, negative_log_likelihood(model)

    return build


def pyro_coupling(spline: bool) -> Builder:
    """Pyro coupling layers split at ``dim // 2``, the halves swapped between layers."""

    def build(dim: int, device: torch.device) -> tuple[nn.Module, Loss]:
        split, reverse = dim // 2, torch.arange(dim - 1, -1, -1, device=device)
        parts = []
        for i in range(LAYERS):
            if spline:
                sizes = [(dim - split) * BINS, (dim - split) * BINS, (dim - split) * (BINS - 1)]
                net = DenseNN(split, list(HIDDEN), param_dims=sizes)
                parts.append(
                    T.SplineCoupling(
                        dim, split, net, BINS, BOUND, order="quadratic", identity=True
                    )
                )
            else:
                parts.append(T.affine_coupling(dim, hidden_dims=list(HIDDEN)))
            if i < LAYERS - 1:
                parts.append(T.Permute(reverse))  # its index is no buffer: made on the device
        stack = T.ComposeTransformModule(parts).to(device)
        q = dist.TransformedDistribution(standard_normal(dim, device), [stack])
        return stack, mean_nll(q.log_prob)

    return build


def pyro_autoregressive(spline: bool, inverted: bool) -> Builder:
    """Pyro autoregressive layers (each its own random order), inverted or as built."""

    def build(dim: int, device: torch.device) -> tuple[nn.Module, Loss]:
        parts = []
        for _ in range(LAYERS):
            if spline:
                net = AutoRegressiveNN(dim, list(HIDDEN), param_dims=[BINS, BINS, BINS - 1])
                parts.append(T.SplineAutoregressive(dim, net, BINS, BOUND, order="quadratic"))
            else:
                parts.append(T.affine_autoregressive(dim, hidden_dims=list(HIDDEN)))
        stack = T.ComposeTransformModule(parts).to(device)
        transform = stack.inv if inverted else stack
        q = dist.TransformedDistribution(standard_normal(dim, device), [transform])
        return stack, mean_nll(q.log_prob)

    return build


def zuko_flow(make: Callable[[int], zuko.flows.Flow]) -> Builder:
    def build(dim: int, device: torch.device) -> tuple[nn.Module, Loss]:
        flow = make(dim).to(device)
        return flow, mean_nll(lambda rows: flow().log_prob(rows))

    return build


def zuko_spline_coupling(dim: int) -> zuko.flows.Flow:
    """zuko's coupling layer with its spline: the equal of pyroflows' ``nsf``."""
    spline = partial(MonotonicRQSTransform, bound=BOUND)
    shapes = [(BINS,), (BINS,), (BINS - 1,)]
    layers = [
        GeneralCouplingTransform(
            dim,
            mask=torch.arange(dim) % 2 == i % 2,
            univariate=spline,
            shapes=shapes,
            hidden_features=HIDDEN,
        )
        for i in range(LAYERS)
    ]
    zeros = torch.zeros(dim)
    base = UnconditionalDistribution(DiagNormal, zeros, torch.ones(dim), buffer=True)
    return zuko.flows.Flow(layers, base)


@dataclass(frozen=True)
class Contender:
    """One flow in the race: its table column, what it is, and how to build it."""

    column: str
    what: str
    build: Builder
    sequential: bool = False  # the density pass takes dim network passes per layer
    #: why the compiled mode leaves it out, if it does
    not_compiled: str | None = None


ARCH = f"{LAYERS} layers, hidden {HIDDEN}"
ZUKO = f"transforms={LAYERS}, hidden_features={HIDDEN}"
CONTENDERS: dict[str, list[Contender]] = {
    "realnvp": [
        Contender("pyroflows", f"build('realnvp'), {ARCH}, alternating masks", ours("realnvp")),
        Contender(
            "pyro",
            f"affine_coupling(dim, hidden_dims={list(HIDDEN)}) x{LAYERS}, Permute(reversed) "
            "between; density = inverse (one pass)",
            pyro_coupling(spline=False),
        ),
        Contender(
            "zuko",
            f"zuko.flows.RealNVP(dim, {ZUKO}), alternating masks",
            zuko_flow(partial(zuko.flows.RealNVP, transforms=LAYERS, hidden_features=HIDDEN)),
            not_compiled="left out compiled: its compiled backward kills the process "
            "(free(): invalid next size in inductor's CPU kernel, torch 2.13)",
        ),
    ],
    "maf": [
        Contender("pyroflows", f"build('maf'), {ARCH}, reversed orders", ours("maf")),
        Contender(
            "pyro",
            f"affine_autoregressive(dim, hidden_dims={list(HIDDEN)}) x{LAYERS}, random "
            "orders, stack inverted: density = forward (one pass)",
            pyro_autoregressive(spline=False, inverted=True),
        ),
        Contender(
            "zuko",
            f"zuko.flows.MAF(dim, {ZUKO}), reversed orders",
            zuko_flow(partial(zuko.flows.MAF, transforms=LAYERS, hidden_features=HIDDEN)),
        ),
        Contender(
            "pyro as built",
            "the same Pyro stack not inverted: density = inverse, dim passes per layer",
            pyro_autoregressive(spline=False, inverted=False),
            sequential=True,
        ),
    ],
    "nsf": [
        Contender(
            "pyroflows",
            f"build('nsf', bins={BINS}), {ARCH}, bound {BOUND}, alternating masks",
            ours("nsf"),
        ),
        Contender(
            "pyro",
            f"SplineCoupling(dim, dim // 2, DenseNN(hidden {list(HIDDEN)}), {BINS} bins, "
            f"bound {BOUND}, order='quadratic', identity=True) x{LAYERS}, Permute(reversed) "
            "between; density = inverse (one pass)",
            pyro_coupling(spline=True),
        ),
        Contender(
            "zuko",
            f"zuko.flows.NSF(dim, {ZUKO}, bins={BINS}, passes=2): coupling by a masked "
            "network over all dim inputs and outputs (bound 5, fixed)",
            zuko_flow(
                partial(
                    zuko.flows.NSF,
                    transforms=LAYERS,
                    hidden_features=HIDDEN,
                    bins=BINS,
                    passes=2,
                )
            ),
        ),
        Contender(
            "zuko parts",
            f"zuko.flows.Flow of {LAYERS} GeneralCouplingTransform(MonotonicRQSTransform, "
            f"bound {BOUND}, {BINS} bins, hidden_features={HIDDEN}), alternating masks",
            zuko_flow(zuko_spline_coupling),
        ),
    ],
    "nsf_ar": [
        Contender(
            "pyroflows",
            f"build('nsf_ar', bins={BINS}), {ARCH}, bound {BOUND}, reversed orders",
            ours("nsf_ar"),
        ),
        Contender(
            "pyro",
            f"SplineAutoregressive(dim, AutoRegressiveNN(hidden {list(HIDDEN)}), {BINS} bins, "
            f"bound {BOUND}, order='quadratic') x{LAYERS}, random orders, stack inverted: "
            "density = forward (one pass)",
            pyro_autoregressive(spline=True, inverted=True),
        ),
        Contender(
            "zuko",
            f"zuko.flows.NSF(dim, {ZUKO}, bins={BINS}), reversed orders (bound 5, fixed)",
            zuko_flow(
                partial(zuko.flows.NSF, transforms=LAYERS, hidden_features=HIDDEN, bins=BINS)
            ),
        ),
        Contender(
            "pyro as built",
            "the same Pyro stack not inverted: density = inverse, dim passes per layer",
            pyro_autoregressive(spline=True, inverted=False),
            sequential=True,
        ),
    ],
}

DIFFERENCES = (
    "Where the architectures differ: Pyro draws a random order per autoregressive layer "
    "(pyroflows and zuko reverse it), Pyro's couplings split the vector in halves with a "
    "reversal between layers (pyroflows and zuko alternate even and odd entries): same "
    "sizes, same cost. zuko's NSF(passes=2) is a coupling computed by a masked network "
    "that reads all dim inputs and predicts all dim outputs (about twice the last layer's "
    "work); 'zuko parts' is the equal coupling built from zuko's own pieces. zuko's NSF fixes "
    "its spline bound at 5 (the others use 4). Each library keeps its own scale "
    "parametrisation of the affine layers (pyroflows and Pyro clamp a log-scale, zuko "
    "bounds its slope) and its own initialisation."
)


def network_widths(family: str, dim: int) -> list[int]:
    """The widths of one layer's network in pyroflows' ``family`` (ours; the peers' are the
    same sizes): inputs, the hidden layers, the transformer's parameters."""
    per_entry = 3 * BINS - 1 if family.startswith("nsf") else 2
    transformed = (dim + 1) // 2  # alternating masks transform the even entries
    if family in ("maf", "nsf_ar"):  # MADE: every entry in, every entry's parameters out
        return [dim, *HIDDEN, dim * per_entry]
    return [dim - transformed, *HIDDEN, transformed * per_entry]


def product_shapes(family: str, dim: int) -> list[tuple[int, int]]:
    """(inputs, outputs) of every linear map of pyroflows' ``family`` flow, layer by layer."""
    return list(itertools.pairwise(network_widths(family, dim))) * LAYERS


def product_flops(family: str, dim: int) -> int:
    """Floating-point operations per row of the step's matrix products (:class:`MatmulFloor`):
    two per multiply-add, three products per map but two for the first."""
    shapes = product_shapes(family, dim)
    return sum(2 * a * b * (2 if k == 0 else 3) for k, (a, b) in enumerate(shapes))


class MatmulFloor:
    r"""The matrix products of pyroflows' step alone, and with the optimiser: two floors
    under any implementation of the architecture on this device.

    Per flow layer and linear map of its network (:func:`network_widths`), a step of a
    batch of :math:`B` rows multiplies :math:`(B, a) \times (a, b)` forward and, backward,
    :math:`(b, B) \times (B, a)` for the weight's gradient and :math:`(B, b) \times (b, a)`
    for the input's (not for the first map of the first layer, whose input is data).
    Here they run back to back into preallocated outputs: no elementwise work, no
    allocation, no autograd. Every library's step does at least these products (MADE's
    masks leave its matrices dense), so the fastest peer's step time over this floor's
    bounds the speed-up any implementation could have over that peer: where it is below
    1.5, the compiled target cannot be met at equal architecture.

    ``optimiser=True`` adds what every step of the issue's training loop does besides:
    the gradient norm clipped and one fused Adam step, over one flat tensor holding as
    many numbers as the networks' weights and biases (the cheapest layout: one kernel
    each). :func:`product_flops` counts the products' floating-point operations per row,
    so a rate of rows becomes one of FLOPs, to set beside the device's rate on a large
    product (:func:`gemm_rate`).
    """

    def __init__(
        self, family: str, dim: int, device: torch.device, optimiser: bool = False
    ) -> None:
        self.contender = FLOOR_CONTENDERS[optimiser]
        self.compiled = False
        self.shapes = product_shapes(family, dim)
        self.weights = [torch.randn(b, a, device=device) for a, b in self.shapes]
        self.gradients = [torch.empty_like(w) for w in self.weights]
        self.device, self.batch, self.buffers = device, 0, []
        self.update: Callable[[], None] = lambda: None
        if optimiser:
            size = sum(b * (a + 1) for a, b in self.shapes)
            flat = nn.Parameter(torch.zeros(size, device=device))
            flat.grad = torch.randn(size, device=device)  # clipping scales it every step
            step = adam([flat], LR).step

            def update() -> None:
                torch.nn.utils.clip_grad_norm_([flat], CLIP)
                step()

            self.update = update

    def run(self, pool: Tensor, batch: int, steps: int, generator: torch.Generator) -> None:
        if batch != self.batch:  # allocated in the warm-up steps of each batch size
            self.batch = batch
            self.buffers = [
                [torch.randn(batch, n, device=self.device) for n in (a, b, b, a)]
                for a, b in self.shapes
            ]
        layers = list(zip(self.buffers, self.weights, self.gradients, strict=True))
        for _ in range(steps):
            for (x, y, _, _), weight, _ in layers:
                torch.mm(x, weight.t(), out=y)
            for k, ((x, _, grad_y, grad_x), weight, grad_weight) in enumerate(layers):
                torch.mm(grad_y.t(), x, out=grad_weight)
                if k:
                    torch.mm(grad_y, weight, out=grad_x)
            self.update()


FLOOR_CONTENDERS = {
    False: Contender(
        FLOOR, "the products of pyroflows' networks alone (no flow): a lower bound", None
    ),
    True: Contender(
        STEP_FLOOR,
        "the same products, then the gradient clipped and one fused Adam step over one "
        "flat tensor of the networks' size: a lower bound on the whole step",
        None,
    ),
}


def gemm_rate(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """FLOPs per second of a large square float32 product on ``device``: near the most
    this device does, to judge how close the floors' small products come to it."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)
    seconds = timed(lambda: [torch.mm(a, b, out=out) for _ in range(repeats)], device)[1]
    return 2 * size**3 * repeats / seconds


# ------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Settings:
    """How to time: on which device, for how long, how often."""

    device: str = "cpu"
    rows: int = 8192  # rows per timed repeat (steps = rows // batch, at least 1)
    repeats: int = 3
    warmup: int = 2
    sequential_limit: int = 8192  # measure "pyro as built" where dim * batch <= this
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """One unit of work: every contender of ``family`` in ``dim`` dimensions, one mode,
    at each of ``batches``."""

    family: str
    dim: int
    compiled: bool
    batches: tuple[int, ...]
    settings: Settings


class Trial:
    """A built contender with its step, its optimiser state kept across batch sizes.

    ``replicated``: the loss wrapped as pyroflows' estimator wraps it under ``torchrun``
    (a :class:`~torch.nn.parallel.DistributedDataParallel` module over the module that
    owns the parameters); a process group must be initialised.
    """

    def __init__(
        self, contender: Contender, config: Config, device: torch.device, replicated: bool = False
    ) -> None:
        self.contender = contender
        module, loss = contender.build(config.dim, device)
        if replicated:
            loss = _replicated(module, loss, device)
        params = [p for p in module.parameters() if p.requires_grad]
        self.step = training_step(loss, params, adam(params, LR), CLIP, compile=config.compiled)
        self.compiled = config.compiled

    def run(self, pool: Tensor, batch: int, steps: int, generator: torch.Generator) -> None:
        for _ in range(steps):
            index = torch.randint(len(pool), (batch,), device=pool.device, generator=generator)
            rows = pool[index]  # a fresh tensor every step: no cached (x, y) pair applies
            if self.compiled:
                torch._dynamo.maybe_mark_dynamic(rows, 0)
            self.step(rows, None)


def measure(config: Config) -> dict[tuple[str, int], dict]:
    """Time every contender of ``config``; one result per (column, batch).

    The contenders are built once (and, when compiled, compiled once: dynamo's caches are
    cleared first). At each batch size each one takes its warm-up steps, then they take
    turns for ``repeats`` rounds, the first place rotating. A result holds the rate (rows
    per second at the median), the seconds of every repeat, and the warm-up's excess over
    that many timed steps (the compilation, or any recompilation for a new batch size).
    """
    settings, device = config.settings, torch.device(config.settings.device)
    if config.compiled:
        torch._dynamo.reset()
    torch.manual_seed(settings.seed)
    pool = torch.randn(POOL_ROWS, config.dim, device=device)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    contenders = [
        c
        for c in CONTENDERS[config.family]
        if not (config.compiled and (c.sequential or c.not_compiled))
    ]
    trials = [Trial(c, config, device) for c in contenders]
    trials += [MatmulFloor(config.family, config.dim, device, step) for step in (False, True)]
    results = {}
    for batch in config.batches:
        active = [
            t
            for t in trials
            if not t.contender.sequential or config.dim * batch <= settings.sequential_limit
        ]
        steps = max(1, settings.rows // batch)
        warm, graphs = {}, {}
        for trial in active:
            before = _unique_graphs()
            warm[trial] = timed(
                partial(trial.run, pool, batch, settings.warmup, generator), device
            )[1]
            graphs[trial] = _unique_graphs() - before
        seconds = {trial: [] for trial in active}
        for r in range(settings.repeats):
            for trial in active[r % len(active) :] + active[: r % len(active)]:
                run = partial(trial.run, pool, batch, steps, generator)
                seconds[trial].append(timed(run, device)[1])
        for trial in active:
            median = statistics.median(seconds[trial])
            per_step = median / steps
            results[trial.contender.column, batch] = {
                "rows_per_s": batch * steps / median,
                "seconds": seconds[trial],
                "steps": steps,
                "compile_s": max(0.0, warm[trial] - settings.warmup * per_step),
                "graphs": graphs[trial],
            }
    return results


def measure_processes(config: Config, processes: int, threads: int) -> dict[int, dict]:
    """Time pyroflows' step of ``config`` in ``processes`` processes, ``threads`` threads
    in all; one result per batch (as :func:`measure`'s), from rank 0.

    The processes are spawned afresh (so each compiles its own loss when compiled) and
    joined by a process group on a free port of 127.0.0.1.
    """
    with socket.socket() as probe:  # a free port: taken by rank 0's store right after
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    each = max(1, threads // processes)
    torch.multiprocessing.spawn(
        replica, args=(processes, config, port, each, queue), nprocs=processes, join=True
    )
    return queue.get()


def replica(
    rank: int, world: int, config: Config, port: int, threads: int, queue: SimpleQueue
) -> None:
    """One of :func:`measure_processes`'s processes: at each batch size ``batch // world``
    rows a step, warm-up, then ``repeats`` timed runs, each between two barriers."""
    settings = config.settings
    torch.set_num_threads(threads)
    pyro.enable_validation(False)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    cuda = settings.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device(settings.device)
    if cuda:
        torch.cuda.set_device(device)
    distributed.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    barrier = partial(distributed.barrier, device_ids=[rank]) if cuda else distributed.barrier
    try:
        torch.manual_seed(settings.seed)
        pool = torch.randn(POOL_ROWS, config.dim, device=device)
        generator = torch.Generator(device=device).manual_seed(settings.seed + rank)
        ours = next(c for c in CONTENDERS[config.family] if c.column == "pyroflows")
        trial = Trial(ours, config, device, replicated=True)

        def between_barriers(batch: int, steps: int) -> float:
            barrier()

            def run() -> None:
                trial.run(pool, batch // world, steps, generator)
                barrier()

            return timed(run, device)[1]

        results = {}
        for batch in config.batches:
            steps = max(1, settings.rows // batch)
            before = _unique_graphs()
            warm = between_barriers(batch, settings.warmup)
            graphs = _unique_graphs() - before
            seconds = [between_barriers(batch, steps) for _ in range(settings.repeats)]
            median = statistics.median(seconds)
            results[batch] = {
                "rows_per_s": batch * steps / median,
                "seconds": seconds,
                "steps": steps,
                "compile_s": max(0.0, warm - settings.warmup * median / steps),
                "graphs": graphs,
            }
        if rank == 0:
            queue.put(results)
    finally:
        distributed.destroy_process_group()


def _unique_graphs() -> int:
    """How many graphs dynamo has compiled so far (its own counter)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# --------------------------------------------------------------------------- tables


def records(config: Config, results: dict[tuple[str, int], dict]) -> list[dict]:
    """Rows for the CSV: one per (contender, batch), with ours over the fastest peer."""
    contenders = [*CONTENDERS[config.family], *FLOOR_CONTENDERS.values()]
    whats = {c.column: c.what for c in contenders}
    flops = product_flops(config.family, config.dim)
    rows = []
    for (column, batch), result in results.items():
        peers = [
            r["rows_per_s"]
            for (c, b), r in results.items()
            if b == batch and c not in ("pyroflows", *FLOORS)
        ]
        ours = column == "pyroflows" and peers
        ratio = result["rows_per_s"] / max(peers) if ours else None
        floors = {f: results.get((f, batch)) for f in FLOORS}
        over = {
            FLOOR_KEYS[f]: r["rows_per_s"] / max(peers) if ours and r else None
            for f, r in floors.items()
        }
        rows.append(
            {
                "mode": "compiled" if config.compiled else "eager",
                "family": config.family,
                "dim": config.dim,
                "batch": batch,
                "column": column,
                "processes": 1,
                "contender": whats[column],
                "rows_per_s": result["rows_per_s"],
                "s_per_1M_rows": 1e6 / result["rows_per_s"],
                "seconds_median": statistics.median(result["seconds"]),
                "seconds_min": min(result["seconds"]),
                "seconds_max": max(result["seconds"]),
                "steps": result["steps"],
                "repeats": len(result["seconds"]),
                "compile_s": result["compile_s"] if config.compiled else None,
                "graphs": result["graphs"] if config.compiled else None,
                "ours_over_fastest_peer": ratio,
                **over,
                "floor_gflop_per_s": result["rows_per_s"] * flops / 1e9
                if column == FLOOR
                else None,
            }
        )
    return rows


def process_records(
    config: Config, processes: int, threads: int, results: dict[int, dict]
) -> list[dict]:
    """Rows for the CSV from :func:`measure_processes` (no peer ratio: ours alone)."""
    ours = next(c for c in CONTENDERS[config.family] if c.column == "pyroflows")
    cuda = config.settings.device.startswith("cuda")
    unit = "one GPU" if cuda else f"{threads} thread{'s' if threads > 1 else ''}"
    what = f"{ours.what}; {processes} processes (DistributedDataParallel), {unit} each"
    rows = records(config, {("pyroflows", batch): r for batch, r in results.items()})
    for row in rows:
        row.update(processes=processes, contender=what)
    return rows


def rate(value: float) -> str:
    """Rows per second, short: ``41k``, ``1.25M`` (blank where not measured)."""
    if pd.isna(value):
        return ""
    return f"{value / 1e3:,.0f}k" if value < 1e6 else f"{value / 1e6:.2f}M"


def rate_table(frame: pd.DataFrame, mode: str) -> str:
    """Rows per second per configuration, one column per contender kind, and ours over
    the fastest peer (named)."""
    part = frame[frame["mode"] == mode]
    wide = part.pivot_table(
        index=["family", "dim", "batch"], columns="column", values="rows_per_s", sort=False
    )
    columns = [c for c in COLUMNS if c in wide.columns]
    peers = wide[[c for c in columns if c not in ("pyroflows", *FLOORS)]]
    table = wide[columns].map(rate)
    ratio = wide["pyroflows"] / peers.max(axis=1)
    table["ours / fastest peer"] = [
        f"{r:.2f} ({p})" if pd.notna(r) else ""
        for r, p in zip(ratio, peers.idxmax(axis=1), strict=True)
    ]
    for floor in FLOORS:  # the most any implementation could gain on that peer
        if floor in wide.columns:
            table[f"{floor} / fastest peer"] = (wide[floor] / peers.max(axis=1)).map(
                "{:.2f}".format
            )
    return table.reset_index().to_markdown(index=False)


def compile_table(frame: pd.DataFrame) -> str:
    """Seconds of compilation per contender (at its first batch size) and dynamo graphs."""
    part = frame[frame["mode"] == "compiled"].sort_values("batch")
    first = part.groupby(["family", "dim", "column"], sort=False).first()
    cells = (
        first["compile_s"].map("{:.0f} s".format) + " / " + first["graphs"].map("{:.0f}".format)
    )
    wide = cells.unstack("column")
    return wide[[c for c in COLUMNS if c in wide.columns]].reset_index().to_markdown(index=False)


def scaling_table(frame: pd.DataFrame) -> str:
    """pyroflows eager: seconds per million rows by batch size (rows) and dimension."""
    part = frame[(frame["mode"] == "eager") & (frame["column"] == "pyroflows")]
    wide = part.pivot_table(
        index=["family", "dim"], columns="batch", values="s_per_1M_rows", sort=False
    )
    wide.columns = [f"batch {b}" for b in wide.columns]
    return wide.reset_index().to_markdown(index=False, floatfmt=".2f")


def processes_table(frame: pd.DataFrame, threads: int | None) -> str:
    """pyroflows' rows per second in 1 and N processes (``threads`` in all, or one GPU
    each where None), N over 1, and each N's compilation seconds where compiled."""
    part = frame[frame["column"] == "pyroflows"]
    wide = part.pivot_table(
        index=["family", "dim", "batch", "mode"],
        columns="processes",
        values=["rows_per_s", "compile_s"],
        aggfunc="first",
        dropna=False,
        sort=False,
    )

    def label(n: int) -> str:
        each = "1 GPU" if threads is None else f"{max(1, threads // n)} thr"
        return f"{n} proc x {each}"

    table = pd.DataFrame({label(1): wide["rows_per_s", 1].map(rate)})
    compiled = (frame["mode"] == "compiled").any()
    for n in sorted(set(part["processes"]) - {1}):
        table[label(n)] = wide["rows_per_s", n].map(rate)
        table[f"{n} / 1"] = (wide["rows_per_s", n] / wide["rows_per_s", 1]).map("{:.2f}".format)
        if compiled:
            seconds = wide["compile_s", n]
            table[f"compile s, {n}"] = seconds.map(lambda s: "" if pd.isna(s) else f"{s:.0f}")
    return table.reset_index().to_markdown(index=False)


def targets(frame: pd.DataFrame, gemm: float | None = None) -> str:
    """How many configurations meet the issue's targets, and how many the floors allow;
    with ``gemm`` (the device's FLOPs per second on a large product), how near the
    matmul floor's products run to it."""
    ours = frame[frame["column"] == "pyroflows"].dropna(subset=["ours_over_fastest_peer"])
    lines = []
    for mode, goal in (("compiled", 1.5), ("eager", 1.0)):
        part = ours[ours["mode"] == mode]
        ratios = part["ours_over_fastest_peer"]
        if len(ratios):
            met = int((ratios >= goal).sum())
            allowed = [
                f"the {floor} allows it in {int((part[key] >= goal).sum())}"
                for floor, key in FLOOR_KEYS.items()
            ]
            lines.append(
                f"{mode}: ours >= {goal}x the fastest peer ({mode}) in {met} of {len(ratios)} "
                f"configurations (lowest {ratios.min():.2f}x); {', '.join(allowed)}"
            )
    key = ["family", "dim", "batch"]
    peers = frame[~frame["column"].isin(["pyroflows", *FLOORS])]
    eager_peers = peers[peers["mode"] == "eager"].groupby(key)["rows_per_s"].max()
    compiled = ours[ours["mode"] == "compiled"].set_index(key)["rows_per_s"]
    if len(compiled) and len(eager_peers):  # the peers as their users run them
        ratios = (compiled / eager_peers).dropna()
        lines.append(
            f"compiled ours >= 1.5x the fastest peer as shipped (eager) in "
            f"{int((ratios >= 1.5).sum())} of {len(ratios)} configurations "
            f"(lowest {ratios.min():.2f}x)"
        )
    rates = frame["floor_gflop_per_s"].dropna()
    if gemm and len(rates):
        lines.append(
            f"the matmul floor's products ran at {rates.min():.0f} to {rates.max():.0f} "
            f"GFLOP/s, {rates.min() / gemm * 1e9:.0%} to {rates.max() / gemm * 1e9:.0%} of a "
            f"2048 x 2048 product's {gemm / 1e9:.0f} GFLOP/s on this device"
        )
    return "\n".join(lines)


def legend(families: list[str]) -> str:
    rows = [
        {
            "family": family,
            "column": c.column,
            "contender": c.what + (f"; {c.not_compiled}" if c.not_compiled else ""),
        }
        for family in families
        for c in CONTENDERS[family]
    ]
    return pd.DataFrame(rows).to_markdown(index=False)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
    try:
        with os.fdopen(handle, "w") as file:
            frame.to_csv(file, index=False)
        os.chmod(temporary, 0o644)  # mkstemp's file is private; a results file is not
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def environment(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as file:
            names = [
                line.split(":", 1)[1].strip() for line in file if line.startswith("model name")
            ]
        cpu = f"{names[0]} ({len(names)} logical CPUs)" if names else cpu
    except OSError:
        pass
    accelerator = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"torch {torch.__version__}, pyro {pyro.__version__}, zuko {zuko.__version__}, "
        f"pyroflows {getattr(pyroflows, '__version__', '?')}; device {device}{accelerator}, "
        f"{torch.get_num_threads()} threads; CPU {cpu}"
    )


# ----------------------------------------------------------------------------- main

#: the settings of a one-minute smoke run, and of a full run (about 25 minutes on 2 cores)
QUICK = {
    "mode": ["eager"],
    "dim": [8],
    "batch": [256, 1024],
    "rows": 4096,
    "repeats": 3,
    "warmup": 1,
    "processes": [1],
}
FULL = {
    "mode": list(MODES),
    "dim": list(DIMS),
    "batch": list(BATCHES),
    "rows": Settings.rows,
    "repeats": Settings.repeats,
    "warmup": Settings.warmup,
    "processes": [1],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--mode", nargs="+", choices=MODES)
    parser.add_argument("--dim", nargs="+", type=int)
    parser.add_argument("--batch", nargs="+", type=int)
    parser.add_argument("--rows", type=int, help="rows per timed repeat")
    parser.add_argument("--repeats", type=int, help="timed repeats (the median is kept)")
    parser.add_argument("--warmup", type=int, help="untimed steps per batch size")
    parser.add_argument(
        "--sequential-limit",
        type=int,
        default=Settings.sequential_limit,
        help="measure 'pyro as built' (dim passes per layer) where dim * batch <= this",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processes",
        nargs="+",
        type=int,
        help="also time pyroflows' step in N processes (DistributedDataParallel), "
        "threads // N threads each; 1 process is always measured",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.processes) < 1:
        parser.error(f"--processes must be positive, got {args.processes}")
    many = sorted(set(args.processes) - {1})
    if odd := [(b, n) for b in args.batch for n in many if b % n]:
        parser.error(f"--batch must be a multiple of every --processes; {odd[0]} is not")
    if args.device.startswith("cuda") and many and many[-1] > torch.cuda.device_count():
        parser.error(
            f"--processes {many[-1]} needs as many GPUs, found {torch.cuda.device_count()}"
        )

    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device(args.device)
    settings = Settings(
        args.device, args.rows, args.repeats, args.warmup, args.sequential_limit, args.seed
    )
    print(environment(device))
    gemm = gemm_rate(device)
    print(f"a 2048 x 2048 float32 product: {gemm / 1e9:.0f} GFLOP/s")
    print(
        f"{ARCH}, {BINS} bins; fused Adam lr {LR}, clip {CLIP}; {args.rows} rows per repeat, "
        f"median of {args.repeats}, {args.warmup} warm-up steps\n"
    )
    print(legend(args.family))
    print(f"\n{DIFFERENCES}\n", flush=True)
    if many:
        print(
            f"pyroflows also in {', '.join(map(str, many))} processes "
            "(DistributedDataParallel over "
            f"{'nccl, one GPU each' if device.type == 'cuda' else 'gloo, 127.0.0.1'}), "
            f"the batch split between them, {args.threads} threads in all\n",
            flush=True,
        )

    configs = [
        Config(family, dim, mode == "compiled", tuple(args.batch), settings)
        for mode in args.mode
        for family in args.family
        for dim in args.dim
    ]
    work = [(config, n) for config in configs for n in [1, *many]]
    rows, start = [], time.perf_counter()
    for k, (config, n) in enumerate(work, 1):
        begun = time.perf_counter()
        if n == 1:
            rows += records(config, measure(config))
        else:
            each = max(1, args.threads // n)
            rows += process_records(config, n, each, measure_processes(config, n, args.threads))
        write_csv(pd.DataFrame(rows), args.output)
        mode = "compiled" if config.compiled else "eager"
        print(
            f"[{k}/{len(work)}] {mode} {config.family} dim {config.dim}"
            f"{f', {n} processes' if n > 1 else ''}: {time.perf_counter() - begun:.0f} s",
            flush=True,
        )
    everything = pd.DataFrame(rows)
    frame = everything[everything["processes"] == 1]
    for mode in args.mode:
        print(f"\nTraining rows per second, {mode}:\n")
        print(rate_table(frame, mode))
        if mode == "eager" and any(CONTENDERS[f][-1].sequential for f in args.family):
            print(
                f"\n'pyro as built' is measured where dim * batch <= {args.sequential_limit} "
                "(--sequential-limit), blank elsewhere."
            )
    if "compiled" in args.mode:
        print("\nCompilation (seconds at the first batch size / dynamo graphs):\n")
        print(compile_table(frame))
    if "eager" in args.mode:
        print("\npyroflows eager, seconds per million rows:\n")
        print(scaling_table(frame))
    if many:
        threads = None if device.type == "cuda" else args.threads
        print("\npyroflows in processes, rows per second (the same cores in all):\n")
        print(processes_table(everything, threads))
    print(f"\n{targets(frame, gemm)}")
    elapsed = time.perf_counter() - start
    done = f"{len(configs)} configurations" + (f" ({len(work)} units of work)" if many else "")
    print(f"\n{done} in {elapsed:.0f} s; results in {args.output}")


if __name__ == "__main__":
    main()
