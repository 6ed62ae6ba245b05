"""Shared fixtures: the ``--device`` option, float64 by default, a clean Pyro state per test."""

from __future__ import annotations

import pyro
import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", help="torch device the suite runs on, e.g. cpu or cuda"
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda given but torch sees no CUDA device")
    return device


@pytest.fixture(autouse=True)
def clean_pyro_state():
    """Clear the param store, validate distributions and seed every test, as Pyro's own do."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
