"""Nothing is lost: saves are atomic and never overwrite unasked, loads are safe and strict,
and values that overflow the model's dtype are refused instead of scoring NaN."""

from __future__ import annotations

import errno
import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pyroflows._io import write_atomically
from pyroflows.density.estimator import ENTRIES, FORMAT, SCHEMA_ENTRIES, DensityEstimator


@pytest.fixture(scope="module")
def fitted() -> tuple[DensityEstimator, pd.DataFrame]:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=200), "n": rng.poisson(3.0, size=200)})
    model = DensityEstimator(
        "realnvp", epochs=2, progress=False, seed=0, layers=2, hidden=(8, 8), select=False
    )
    model.fit(frame)
    return model, frame


def _full_disk(*args, **kwargs):
    """A writer that gets half a file out and then finds the disk full."""
    destination = next(a for a in args if isinstance(a, str))
    with open(destination, "wb") as handle:
        handle.write(b"half a fi")
    raise OSError(errno.ENOSPC, "No space left on device")


# ------------------------------------------------------------------ saving


def test_save_refuses_an_existing_file_unless_asked(fitted, tmp_path):
    model, frame = fitted
    path = tmp_path / "model.pt"
    path.write_bytes(b"an older model")
    message = f"'{path}' already exists; pass overwrite=True to replace it"
    with pytest.raises(FileExistsError, match=re.escape(message)):
        model.save(path)
    assert path.read_bytes() == b"an older model"
    model.save(path, overwrite=True)
    pd.testing.assert_series_equal(
        DensityEstimator.load(path).log_prob(frame), model.log_prob(frame)
    )


@pytest.mark.parametrize(
    ("where", "error", "message"),
    [
        ("missing/model.pt", FileNotFoundError, "there is no folder '{tmp}/missing'; create it"),
        ("folder", IsADirectoryError, "cannot write '{tmp}/folder': it is a folder"),
    ],
)
def test_save_refuses_a_destination_it_cannot_write(fitted, tmp_path, where, error, message):
    (tmp_path / "folder").mkdir()
    with pytest.raises(error, match=re.escape(message.format(tmp=tmp_path))):
        fitted[0].save(tmp_path / where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_save_refuses_a_read_only_folder(fitted, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode)
    )
    with pytest.raises(PermissionError, match=re.escape(f"the folder '{tmp_path}' is read-only")):
        fitted[0].save(tmp_path / "model.pt")


def test_a_save_that_fails_partway_keeps_the_old_file_and_leaves_no_temporary(
    fitted, tmp_path, monkeypatch
):
    model, _ = fitted
    path = tmp_path / "model.pt"
    model.save(path)
    good = path.read_bytes()
    monkeypatch.setattr(torch, "save", _full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        model.save(path, overwrite=True)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    with pytest.raises(OSError, match="No space left on device"):
        model.save(tmp_path / "new.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no half-written new.pt


def test_an_exception_in_the_writer_removes_the_temporary_too(tmp_path):
    def interrupted(temporary: str) -> None:
        Path(temporary).write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "table.csv", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_a_saved_file_has_ordinary_permissions_and_a_replaced_one_keeps_its_own(fitted, tmp_path):
    model, _ = fitted
    old_umask = os.umask(0o022)
    try:
        model.save(tmp_path / "new.pt")
        kept = tmp_path / "kept.pt"
        kept.write_bytes(b"old")
        kept.chmod(0o600)
        model.save(kept, overwrite=True)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "new.pt").stat().st_mode & 0o777 == 0o644
    assert kept.stat().st_mode & 0o777 == 0o600


def test_save_refuses_a_model_with_non_finite_weights(fitted, tmp_path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"x": rng.normal(size=100), "y": rng.normal(size=100)})
    model = DensityEstimator("nice", epochs=1, progress=False, layers=1, hidden=(4,), select=False)
    model.fit(frame)
    name, parameter = next(iter(model.model.density.flow.named_parameters()))
    with torch.no_grad():
        parameter.view(-1)[0] = math.nan
    with pytest.raises(ValueError, match=re.escape(f"parameter 'density.flow.{name}' has NaN")):
        model.save(tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ loading


def _saved(model: DensityEstimator, path: Path) -> dict:
    model.save(path, overwrite=True)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["density.flow.", "scale"], ids=["flow weight", "scaling"])
def test_load_refuses_non_finite_weights_naming_file_and_parameter(fitted, tmp_path, where, value):
    path = tmp_path / "model.pt"
    saved = _saved(fitted[0], path)
    key = next(
        k for k, v in saved["state"].items() if k.startswith(where) and v.is_floating_point()
    )
    saved["state"][key].view(-1)[-1] = value
    torch.save(saved, path)
    message = f"'{path}' holds a damaged model: its parameter '{key}' has NaN or inf values"
    with pytest.raises(ValueError, match=re.escape(message)):
        DensityEstimator.load(path)


@pytest.mark.parametrize(
    "entry", [*ENTRIES, *(f"schema.{key}" for key in SCHEMA_ENTRIES)], ids=str
)
def test_load_names_the_file_and_a_missing_entry(fitted, tmp_path, entry):
    path = tmp_path / "model.pt"
    saved = _saved(fitted[0], path)
    *parents, key = entry.split(".")
    holder = saved
    for parent in parents:
        holder = holder[parent]
    del holder[key]
    torch.save(saved, path)
    message = f"'{path}' is not a complete {FORMAT} file: it has no '{entry}' entry"
    with pytest.raises(ValueError, match=re.escape(message)):
        DensityEstimator.load(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.update(state="weights"), "its 'state' entry is a str"),
        (lambda s: s["state"].popitem(), "Missing key(s) in state_dict"),
        (lambda s: s["schema"]["columns"][0].pop("name"), "missing 1 required"),
        (lambda s: s.update(dtype="float99"), "unknown dtype 'float99'"),
        (lambda s: s["options"].update(bins=3), "has no option 'bins'"),
    ],
    ids=["wrong type", "weight missing", "column incomplete", "bad dtype", "bad option"],
)
def test_load_names_the_file_of_a_damaged_model(fitted, tmp_path, damage, message):
    path = tmp_path / "model.pt"
    saved = _saved(fitted[0], path)
    damage(saved)
    torch.save(saved, path)
    with pytest.raises(ValueError, match=re.escape(f"'{path}' is a damaged {FORMAT} file")) as e:
        DensityEstimator.load(path)
    assert message in str(e.value)


class _RunsCode:
    """An object whose unpickling writes a marker file: what a crafted model file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "pickled code ran")


def _torch_file(payload: dict, path: Path) -> None:
    torch.save(payload, path)


def _pickle_file(payload: dict, path: Path) -> None:
    path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize(
    ("write", "unsafe_load"),
    [
        (_torch_file, lambda path: torch.load(path, weights_only=False)),
        (_pickle_file, lambda path: pickle.loads(path.read_bytes())),
    ],
    ids=["torch.save", "pickle"],
)
def test_load_refuses_a_crafted_pickle_without_running_it(tmp_path, write, unsafe_load):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "model.pt"
    write({"format": FORMAT, "flow": "realnvp", "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=re.escape(f"'{path}' is not a pyroflows model file")):
        DensityEstimator.load(path)
    assert not marker.exists()
    unsafe_load(path)  # the file really is crafted: an unsafe load runs its code
    assert marker.read_text() == "pickled code ran"


# ------------------------------------------------------------------ dtypes


def test_values_that_overflow_the_models_dtype_are_refused(fitted):
    model, frame = fitted
    data = frame.head(6).copy()
    data.loc[[2, 4], "x"] = [1e39, -2e39]
    message = (
        "column 'x' has values too large for float32, the model's dtype (2 of them, "
        "e.g. 1e+39 at row 2: inf in float32)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        model.log_prob(data)
    with pytest.raises(ValueError, match=re.escape(message)):
        DensityEstimator("nice", epochs=1, progress=False).fit(pd.concat([frame, data]))


def test_values_that_overflow_are_fine_in_float64():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=100) * 1e39, "y": rng.normal(size=100)})
    model = DensityEstimator("nice", epochs=1, progress=False, dtype=torch.float64)
    model.fit(frame)
    assert np.isfinite(model.log_prob(frame)).all()


def test_contexts_that_overflow_the_models_dtype_are_refused():
    rng = np.random.default_rng(0)
    data = pd.DataFrame({"y": rng.normal(size=100)})
    context = pd.DataFrame({"c": rng.normal(size=100)})
    model = DensityEstimator("nice", epochs=1, progress=False, layers=1, hidden=(4,))
    model.fit(data, context=context)
    context.loc[7, "c"] = 5e38
    message = "context column 'c' has values too large for float32, the model's dtype (1 of"
    with pytest.raises(ValueError, match=re.escape(message)):
        model.log_prob(data, context)
