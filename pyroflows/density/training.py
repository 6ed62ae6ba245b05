r"""Maximum-likelihood (forward-KL) training of a flow on samples, with validation.

Minimising the average negative log-likelihood of data is minimising
:math:`\mathrm{KL}(p_\text{data} \,\|\, q)` up to the data's entropy. Small tables overfit
fast, so training always holds out a validation split, stops early when the validation loss
has not improved for ``patience`` epochs, and restores the best weights seen.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyroflows._checks import (
    check_non_negative_float,
    check_positive_float,
    check_positive_int,
)
from pyroflows.distributions import FlowDistribution

#: the fewest draws a stochastic validation objective is averaged over (rows repeated)
VALIDATION_DRAWS = 4096
#: a mean loss over rows, given their context (``None`` for an unconditional model)
Loss = Callable[[Tensor, Tensor | None], Tensor]
#: the minibatches of an epoch, ``(rows, context)`` pairs, given the epoch's number
Batches = Callable[[int], Iterable[tuple[Tensor, Tensor | None]]]


def fit_max_likelihood(
    model: FlowDistribution | nn.Module,
    train: Tensor | Batches,
    valid: Tensor,
    *,
    epochs: int = 500,
    batch_size: int = 256,
    lr: float = 1e-3,
    patience: int = 30,
    tolerance: float = 1e-3,
    clip: float = 5.0,
    compile: bool = False,
    progress: bool = True,
    description: str = "fit",
    train_context: Tensor | None = None,
    valid_context: Tensor | None = None,
    objective: Loss | None = None,
) -> pd.DataFrame:
    r"""Fit ``model`` to ``train`` by minibatch Adam; return the history per epoch.

    ``model`` is a :class:`~pyroflows.FlowDistribution` (its flow is trained) or a module
    with a ``log_prob`` method (all its parameters are trained). Each epoch shuffles
    ``train`` into minibatches of ``batch_size`` rows, clips the gradient norm to ``clip``,
    and then scores ``valid``. The learning rate halves when the validation loss stalls for
    ``patience // 3`` epochs (torch's ``ReduceLROnPlateau``). Training stops after
    ``patience`` epochs without *progress*, a validation loss below the last progress by
    more than ``tolerance`` nats per row, and the best weights seen (by any margin) are
    restored. The tolerance ends the long tail of ever smaller gains at an ever smaller
    learning rate: on a 100,000-row table it cut a third of the epochs for 0.001 nats per
    row. The starting point is a candidate too, so
    the result never scores worse on ``valid`` than the model it started from. Losses are
    mean negative log-likelihoods in nats per row; the progress bar (``progress``) is
    labelled ``description``. Draws use torch's global generator (seed it for
    reproducibility). Adam runs fused (one kernel for all parameters).

    For a conditional model, ``train_context`` and ``valid_context`` hold one context row
    per data row, passed as ``model.log_prob(rows, context)``.

    ``objective(rows, context)``, a mean loss over rows, replaces the negative
    log-likelihood (e.g. :class:`~pyroflows.density.matching.MatchingObjective`, flow
    matching); the validation rows are then scored by it too, with the same random draws
    every epoch (a fixed seed), so that the early stopping compares like with like.

    ``train`` is a tensor of rows (with ``train_context``), or a function from the epoch's
    number to its minibatches, ``(rows, context)`` pairs: a stream of a table larger than
    memory (:meth:`~pyroflows.density.streaming.ParquetRows.batches`), each process's own
    share under ``torchrun``.

    Under :mod:`torch.distributed` (a process group initialised, e.g. by ``torchrun``, with
    more than one process) the model trains as one :class:`~torch.nn.parallel.
    DistributedDataParallel` replica per process: every process starts from the same
    weights (rank 0's, broadcast) and, for tensor rows, draws the same permutation each
    epoch and takes its ``1 / world`` of each batch of ``batch_size`` rows (full batches
    only; ``batch_size`` a multiple of the number of processes); the gradients are averaged
    over the processes in the backward pass, so that each step is the step of one process
    on the whole batch. Every process scores all of ``valid`` and the mean of their scores
    decides, so all stop at the same epoch with the same best weights. Draws inside the
    loss (dequantisation noise, flow matching's times) differ between processes.

    ``compile=True`` compiles the training loss with :func:`torch.compile`: it costs
    tens of seconds once and then runs each step faster (the benchmarks say by how much).
    Minibatches are then all of ``batch_size`` rows (each epoch leaves out the
    ``len(train) % batch_size`` rows that its shuffle puts last), so one compiled graph
    serves every step.

    Example:
        >>> import torch, pyro.distributions as dist, pyroflows
        >>> from pyroflows.density.training import fit_max_likelihood
        >>> _ = torch.manual_seed(0)
        >>> data = torch.randn(600, 2) * torch.tensor([2.0, 0.5])
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> model = pyroflows.FlowDistribution(base, pyroflows.build("realnvp", 2))
        >>> history = fit_max_likelihood(model, data[:500], data[500:], epochs=20, progress=False)
        >>> bool(history["valid_loss"].min() < history["valid_loss"].iloc[0])
        True
    """
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    check_positive_int("patience", patience)
    check_positive_float("lr", lr)
    check_positive_float("clip", clip)
    check_non_negative_float("tolerance", tolerance)
    flow = model.transform if isinstance(model, FlowDistribution) else model
    params = [p for p in flow.parameters() if p.requires_grad]
    optimiser = adam(params, lr)
    rank, world = process_group()
    loss = objective or negative_log_likelihood(model)
    if world > 1:
        loss = _replicated(flow, loss, valid.device)
    step = training_step(loss, params, optimiser, clip, compile=compile)
    # One permutation stream, the same in every process; the loss's own draws differ.
    order = torch.Generator(device=valid.device).manual_seed(int(torch.randint(2**62, ())))
    if world > 1:
        torch.manual_seed(int(torch.randint(2**62, ())) + rank)
    if isinstance(train, Tensor):
        full = (compile and len(train) >= batch_size) or world > 1
        train = shuffled(train, train_context, batch_size, order, full, rank, world)

    if objective is not None:  # each validation row repeated once, not every epoch
        draws, draws_context = repeated(valid, valid_context, VALIDATION_DRAWS)

    def validate() -> float:
        if objective is None:
            value = evaluate(model, valid, batch_size, valid_context)
        else:
            value = _fixed_draws(objective, draws, batch_size, draws_context)
        return _mean_over_processes(value, valid.device) if world > 1 else value

    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, factor=0.5, patience=max(1, patience // 3)
    )
    best = mark = validate()  # mark: the last improvement
    best_state, stale, rows = copy.deepcopy(flow.state_dict()), 0, []
    bar = tqdm(range(epochs), disable=not progress, desc=description, unit="epoch")
    for epoch in bar:  # epoch 0 is the starting point, scored above
        flow.train()
        total, seen = torch.zeros((), device=valid.device, dtype=valid.dtype), 0
        for rows_, context in train(epoch):
            total += step(rows_, context) * len(rows_)
            seen += len(rows_)
        if seen == 0:
            raise ValueError("an epoch had no training rows: give more rows or a smaller batch")
        valid_loss = validate()
        train_loss = (total / seen).item()
        schedule.step(valid_loss)
        rows.append((epoch + 1, train_loss, valid_loss, optimiser.param_groups[0]["lr"]))
        bar.set_postfix(train=f"{train_loss:.4f}", valid=f"{valid_loss:.4f}", refresh=False)
        if valid_loss < best:
            best, best_state = valid_loss, copy.deepcopy(flow.state_dict())
        if valid_loss < mark - tolerance:
            mark, stale = valid_loss, 0
        else:
            stale += 1
            if stale >= patience:
                break
    bar.close()
    flow.load_state_dict(best_state)
    flow.eval()
    return pd.DataFrame(rows, columns=["epoch", "train_loss", "valid_loss", "lr"])


def shuffled(
    rows: Tensor,
    context: Tensor | None,
    batch_size: int,
    generator: torch.Generator,
    full_only: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Batches:
    """The minibatches of ``rows`` (and their ``context``): each epoch a new permutation
    drawn by ``generator``, cut into batches of ``batch_size`` rows (``full_only``: the
    last, shorter one left out); of ``world`` processes, process ``rank`` takes its
    ``1 / world`` of each batch.

    Example:
        >>> order = torch.Generator().manual_seed(0)
        >>> epoch = shuffled(torch.arange(10.0).unsqueeze(-1), None, 4, order, rank=1, world=2)
        >>> [len(rows) for rows, _ in epoch(0)]  # rows 2-3 of each batch of 4 (of 2 of 2)
        [2, 2, 1]
    """
    if world > 1 and batch_size % world:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the {world} processes, so that "
            "each takes an equal share of every batch"
        )
    if full_only and len(rows) < batch_size:
        raise ValueError(f"{len(rows)} training rows make no whole batch of {batch_size}")

    def epoch(number: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        order = torch.randperm(len(rows), device=rows.device, generator=generator)
        for index in order.split(batch_size):
            if full_only and len(index) < batch_size:
                break
            if world > 1:
                index = index.tensor_split(world)[rank]
            yield rows[index], None if context is None else context[index]

    return epoch


def process_group() -> tuple[int, int]:
    """This process's rank and the number of processes of :mod:`torch.distributed`'s
    default group, or ``(0, 1)`` when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Objective(nn.Module):
    """A loss as the forward pass of a module that owns the trained parameters, for
    :class:`~torch.nn.parallel.DistributedDataParallel` (which averages their gradients
    over the processes as the backward pass reaches them)."""

    def __init__(self, owner: nn.Module, loss: Callable[..., Tensor]) -> None:
        super().__init__()
        self.owner = owner
        self._loss = (loss,)  # a tuple: a loss that is a module is not a second owner

    def forward(self, *args: Any) -> Tensor:
        return self._loss[0](*args)


def _replicated(owner: nn.Module, loss: Callable[..., Tensor], device: torch.device) -> nn.Module:
    """``loss`` as a :class:`~torch.nn.parallel.DistributedDataParallel` module over
    ``owner``'s parameters (rank 0's weights broadcast to every process)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(_Objective(owner, loss), device_ids=ids)


def _mean_over_processes(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the processes (every process gets the same float)."""
    import torch.distributed as dist

    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def negative_log_likelihood(model: FlowDistribution | nn.Module) -> Loss:
    """The loss ``(rows, context) -> -mean log p(rows | context)`` of ``model``."""

    def loss(rows: Tensor, context: Tensor | None) -> Tensor:
        if context is None:
            return -model.log_prob(rows).mean()
        return -model.log_prob(rows, context).mean()

    return loss


def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam over ``params``, fused (one kernel for all of them) on the devices that have a
    fused kernel, and ``foreach`` elsewhere (e.g. the ``meta`` device)."""
    fused = all(p.device.type in _fused_devices() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def training_step(
    loss: Callable[..., Tensor],
    params: list[nn.Parameter],
    optimiser: torch.optim.Optimizer,
    clip: float,
    *,
    compile: bool = False,
) -> Callable[..., Tensor]:
    r"""One optimisation step as a function: ``step(*args)`` evaluates ``loss(*args)``,
    back-propagates, clips the gradient norm of ``params`` to ``clip``, steps the
    optimiser, and returns the loss, detached.

    The step reads no value on the host: no ``.item()``, no branch on a tensor, so a GPU
    never waits for its queue inside a step, and the training loops read losses only at
    their logging intervals (tests/test_gpu_clean.py runs every family's step under a
    dispatch-level check). ``compile=True`` compiles ``loss`` with :func:`torch.compile`
    (its forward and, through AOTAutograd, its backward graph); the clipping and the
    optimiser, one fused kernel each, stay eager.

    Example:
        >>> weight = nn.Parameter(torch.tensor([3.0]))
        >>> optimiser = torch.optim.SGD([weight], lr=0.25)
        >>> step = training_step(lambda x: ((weight - x) ** 2).sum(), [weight], optimiser, 5.0)
        >>> step(torch.tensor([1.0])), weight.data  # loss 4, gradient 4 (not clipped)
        (tensor(4.), tensor([2.]))
    """
    compiled = torch.compile(loss) if compile else loss

    def step(*args: Any) -> Tensor:
        value = compiled(*args)
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimiser.step()
        return value.detach()

    return step


@functools.cache
def _fused_devices() -> frozenset[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return frozenset(_get_fused_kernels_supported_devices())


@torch.no_grad()
def evaluate(
    model: FlowDistribution | nn.Module,
    data: Tensor,
    batch_size: int = 4096,
    context: Tensor | None = None,
) -> float:
    """Mean negative log-likelihood of ``data`` in nats per row (inf if any row is not finite).

    ``context`` (one row per data row) is passed on to a conditional model's ``log_prob``.

    Example:
        >>> import torch, pyro.distributions as dist, pyroflows
        >>> from pyroflows.density.training import evaluate
        >>> base = dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1)
        >>> model = pyroflows.FlowDistribution(base, pyroflows.build("realnvp", 1))
        >>> round(evaluate(model, torch.zeros(3, 1)), 4)  # log(2 pi) / 2
        0.9189
    """
    module = model.transform if isinstance(model, FlowDistribution) else model
    training = module.training
    module.eval()
    size = max(batch_size, 4096)
    if context is None:
        total = sum(model.log_prob(chunk).sum() for chunk in data.split(size))
    else:
        pairs = zip(data.split(size), context.split(size), strict=True)
        total = sum(model.log_prob(chunk, c).sum() for chunk, c in pairs)
    module.train(training)
    value = -total.item() / len(data)
    return value if math.isfinite(value) else math.inf


@torch.no_grad()
def _fixed_draws(
    objective: Callable[[Tensor, Tensor | None], Tensor],
    data: Tensor,
    batch_size: int,
    context: Tensor | None,
) -> float:
    """The mean of a stochastic ``objective`` over ``data``, with the same draws at every
    call (torch's generators forked and seeded; the caller's are left as they were)."""
    devices = [data.device] if data.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        chunks = data.split(batch_size)  # a minibatch OT coupling pairs within a chunk
        contexts = context.split(batch_size) if context is not None else [None] * len(chunks)
        total = sum(objective(c, k) * len(c) for c, k in zip(chunks, contexts, strict=True))
    value = float(total) / len(data)
    return value if math.isfinite(value) else math.inf


def repeated(data: Tensor, context: Tensor | None, least: int) -> tuple[Tensor, Tensor | None]:
    """``data`` (and its ``context``, one row per row) repeated to at least ``least`` rows,
    for objectives that draw afresh at every row: a validation loss averaged over
    :data:`VALIDATION_DRAWS` draws (one draw of each of 36 validation rows is too noisy to
    stop on), or flow matching's epochs of at least 32 steps.

    Example:
        >>> rows, context = repeated(torch.arange(3.0).unsqueeze(-1), None, 7)
        >>> rows.squeeze(-1).tolist(), context
        ([0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0], None)
    """
    copies = -(-least // len(data))
    return data.repeat(copies, 1), None if context is None else context.repeat(copies, 1)
