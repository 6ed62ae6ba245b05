"""Shared pieces of the benchmarks: data sets, splits, and timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits


@dataclass
class Split:
    """Train/validation/test rows, standardised with the training rows' moments.

    ``log_jacobian`` is log|det| of the standardisation, to be added to a log-density of
    standardised rows to get one in the data's own units.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    log_jacobian: float

    @property
    def dim(self) -> int:
        return self.train.shape[1]


def two_moons(n: int, generator: np.random.Generator, noise: float = 0.08) -> np.ndarray:
    angle = generator.uniform(0, np.pi, n)
    upper = generator.uniform(size=n) < 0.5
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    return np.stack([x, y], 1) + noise * generator.normal(size=(n, 2))


def load(name: str, seed: int = 0) -> np.ndarray:
    """A data set as a float64 array; integer-valued sets are dequantised with U(0, 1) noise."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        return two_moons(10_000, rng)
    if name == "cancer2":
        frame = load_breast_cancer(as_frame=True).frame
        return frame[["worst concavity", "worst area"]].to_numpy(np.float64)
    if name == "cancer30":
        return load_breast_cancer().data.astype(np.float64)
    if name == "digits64":
        pixels = load_digits().data.astype(np.float64)
        return pixels + rng.uniform(size=pixels.shape)
    raise ValueError(f"unknown data set {name!r}")


def split(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Split:
    data = np.ascontiguousarray(load(name, seed))
    order = np.random.default_rng(seed + 1).permutation(len(data))
    n = len(data) // 5
    test, valid, train = data[order[:n]], data[order[n : 2 * n]], data[order[2 * n :]]
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)

    def tensor(rows: np.ndarray) -> torch.Tensor:
        return torch.tensor((rows - mean) / std, device=device, dtype=dtype)

    return Split(name, tensor(train), tensor(valid), tensor(test), float(-np.log(std).sum()))


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """Run ``fn`` and return its result with the wall time, synchronising a GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start
