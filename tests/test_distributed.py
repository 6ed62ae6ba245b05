"""Multi-process training (issue 15, item 4): two processes with gloo on loopback train the
same model as one process on the same global batches and seed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyroflows import DensityEstimator

#: 256 training rows in batches of 64: every batch whole, an equal share per process
OPTIONS = {
    "flow": "realnvp",
    "epochs": 4,
    "lr": 1e-2,
    "batch_size": 64,
    "select": False,
    "progress": False,
    "seed": 0,
    "dtype": torch.float64,
}


def banana(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows)
    return pd.DataFrame({"x": x, "y": x**2 / 2 + 0.3 * rng.normal(size=rows)})


def fitted(train: pd.DataFrame, valid: pd.DataFrame) -> DensityEstimator:
    model = DensityEstimator(**OPTIONS)
    model.fit(train, valid=valid)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, port: int, train, valid, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(fitted(train, valid).model.state_dict(), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_train_the_weights_of_one(tmp_path):
    train, valid = banana(256, 0), banana(64, 1)
    mp.spawn(_process, args=(free_port(), train, valid, str(tmp_path)), nprocs=2)
    alone = fitted(train, valid)
    losses = alone.history["valid_loss"]
    assert losses.iloc[-1] < losses.iloc[0] - 0.05  # it trained, 4 epochs of 4 steps
    expected = alone.model.state_dict()
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-9, msg=key)


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path):
    from pyroflows.density.training import shuffled

    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        shuffled(torch.zeros(10, 1), None, 5, torch.Generator(), rank=0, world=2)


@pytest.mark.slow
def test_torchrun_fits_a_parquet_file_in_two_processes(tmp_path):
    """The command of the docs under torchrun: the CLI joins the process group from
    torchrun's environment, the first process alone writes the model and reports, and the
    model scores the data like a one-process fit (a file this small is read whole by each
    process; the test below streams shards)."""
    frame = banana(6000, 2)
    path = tmp_path / "data.parquet"
    frame.to_parquet(path, row_group_size=500)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "pyroflows", "fit", str(path), "--flow", "realnvp", "--epochs", "20"),
        *("--seed", "0", "--quiet", "--out", str(tmp_path / "model.pt")),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("wrote") == 1  # one process wrote and reported
    model = DensityEstimator.load(tmp_path / "model.pt")
    alone = DensityEstimator("realnvp", epochs=20, seed=0, progress=False)
    alone.fit(path)
    assert abs(model.score(frame) - alone.score(frame)) < 0.05


def _streaming_process(rank: int, port: int, path: str, folder: str) -> None:
    import pyroflows.density.estimator as estimator

    estimator.STREAM_ROWS = 0  # stream this small file (each process reads its shard)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = DensityEstimator("realnvp", epochs=10, batch_size=128, seed=0, progress=False)
        model.fit(path)
        torch.save(model.model.state_dict(), Path(folder) / f"rank{rank}.pt")
        if rank == 0:
            model.save(Path(folder) / "model.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_stream_their_shards_of_a_parquet_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    frame = banana(4000, 3).assign(visits=rng.poisson(3.0, 4000))
    path = tmp_path / "data.parquet"
    frame.to_parquet(path, row_group_size=250)  # 16 row groups: 8 per process
    mp.spawn(_streaming_process, args=(free_port(), str(path), str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    for key, value in first.items():  # one model, replicated
        torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)
    monkeypatch.setattr("pyroflows.density.estimator.STREAM_ROWS", 0)
    alone = DensityEstimator("realnvp", epochs=10, batch_size=128, seed=0, progress=False)
    alone.fit(path)
    held_out = banana(2000, 4).assign(visits=np.random.default_rng(4).poisson(3.0, 2000))
    together = DensityEstimator.load(tmp_path / "model.pt")
    assert together.score(held_out) > together.report.loc["gaussian", "valid_nats"] + 0.2
    assert abs(together.score(held_out) - alone.score(held_out)) < 0.1
