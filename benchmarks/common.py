"""Shared pieces of the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """Run ``fn`` and return its result with the wall time, synchronising a GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start
