"""Streaming Parquet rows: the same schema as a frame, a stable split, exact epochs, shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pyroflows.density.schema import ColumnStats, infer_schema, schema_from_stats
from pyroflows.density.streaming import VALID_SALT, ParquetRows, unit_interval

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def table(rows: int, seed: int = 0) -> pd.DataFrame:
    """Columns of every kind, and ``id``: the row's position, to follow each row."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(rows, dtype=np.float64),
            "score": rng.normal(0.0, 1.0, rows),
            "income": rng.lognormal(10.0, 1.0, rows),
            "share": rng.beta(2.0, 5.0, rows),
            "visits": rng.poisson(3.0, rows),
            "member": rng.random(rows) < 0.3,
            "small": rng.normal(0.0, 1.0, rows).astype(np.float32),
        }
    )


def write(frame: pd.DataFrame, path, row_group_size: int = 100):
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size)
    return path


def epoch(data: ParquetRows, fraction: float, batch_size: int, steps: int, **options) -> list:
    return list(data.batches(0, batch_size, steps, fraction=fraction, **options))


def divisor(rows: int, most: int = 64) -> int:
    """The largest batch size up to ``most`` that divides ``rows``: one epoch, every row."""
    return max(size for size in range(1, most + 1) if rows % size == 0)


@pytest.fixture
def data(tmp_path) -> ParquetRows:
    return ParquetRows(write(table(2000), tmp_path / "rows.parquet"))


# ------------------------------------------------------------------ schema from statistics


SUPPORTS = {
    "inferred": ({}, True),
    "declared": ({"score": (-10, 10), "visits": "real", "income": "positive"}, True),
    "no auto_support": ({"share": (0, 1)}, False),
}


@pytest.mark.parametrize(("support", "auto_support"), SUPPORTS.values(), ids=SUPPORTS)
def test_statistics_a_frame_and_a_parquet_scan_give_the_same_schema(
    tmp_path, support, auto_support
):
    frame = table(500).assign(unit=lambda f: f["share"].where(f["id"] != 3, 0.0))
    expected = infer_schema(frame, "frame", support, auto_support)
    stats = [ColumnStats.of(frame[name]) for name in frame.columns]
    assert schema_from_stats(stats, len(frame), "frame", support, auto_support) == expected
    scan = ParquetRows(write(frame, tmp_path / "rows.parquet")).scan(validation=0.1)
    assert scan.stats == stats
    assert schema_from_stats(scan.stats, scan.rows, "frame", support, auto_support) == expected
    rules = {c.reason for c in infer_schema(frame, "frame", None, True).columns}
    assert len(rules) == 7  # every column its own rule, but the two normal ones


BAD = {
    "constant": (pd.DataFrame({"y": [2.0] * 5}), None),
    "3 rows": (pd.DataFrame({"y": [1.0, 2.0, 3.0]}), None),
    "leaves its support": (pd.DataFrame({"y": [0.0, 0.2, 0.5, 0.9]}), {"y": (0, 1)}),
    "declared boolean": (pd.DataFrame({"y": [True, False, True, True]}), {"y": "real"}),
    "unknown name": (pd.DataFrame({"y": [0.1, 0.2, 0.5, 0.9]}), {"z": "real"}),
    "unknown kind": (pd.DataFrame({"y": [0.1, 0.2, 0.5, 0.9]}), {"y": "bounded"}),
}


@pytest.mark.parametrize(("frame", "support"), BAD.values(), ids=BAD)
def test_statistics_and_a_frame_refuse_alike(frame, support):
    with pytest.raises(ValueError) as from_frame:
        infer_schema(frame, "frame", support, auto_support=True)
    stats = [ColumnStats.of(frame[name]) for name in frame.columns]
    with pytest.raises(ValueError) as from_stats:
        schema_from_stats(stats, len(frame), "frame", support, auto_support=True)
    assert str(from_stats.value) == str(from_frame.value)


# ------------------------------------------------------------------ the split


def test_the_split_is_stable_and_holds_the_fraction(tmp_path):
    path = write(table(20_000), tmp_path / "rows.parquet", row_group_size=1000)
    first, second = (ParquetRows(path).scan(0.2, max_valid=10**6) for _ in range(2))
    pd.testing.assert_frame_equal(first.valid, second.valid)
    assert abs(len(first.valid) / 20_000 - 0.2) < 0.01  # sd 0.0028
    assert first.valid.index.equals(pd.Index(first.valid["id"].astype(np.int64)))
    assert first.train_rows + len(first.valid) == 20_000
    assert first.valid.dtypes.astype(str).tolist() == table(1).dtypes.astype(str).tolist()


def test_positions_are_global_across_files(tmp_path):
    frame = table(2000)
    one = ParquetRows(write(frame, tmp_path / "one.parquet"))
    folder = tmp_path / "parts"
    folder.mkdir()
    write(frame.iloc[1200:], folder / "part-1.parquet", row_group_size=150)
    write(frame.iloc[:1200], folder / "part-0.parquet", row_group_size=150)
    parts = ParquetRows(folder)
    assert [unit.start for unit in parts.units][8:10] == [1200, 1350]
    pd.testing.assert_frame_equal(parts.scan(0.3).valid, one.scan(0.3).valid)
    in_valid = unit_interval(np.arange(2000), VALID_SALT) < 0.3
    assert one.scan(0.3).valid.index.tolist() == np.flatnonzero(in_valid).tolist()


def test_at_most_max_valid_rows_are_held_and_the_sample_is_training_rows(data):
    scan = data.scan(0.5, max_valid=100, sample_rows=300)
    assert scan.fraction == 100 / 2000
    assert 50 < len(scan.valid) < 150 and 200 < len(scan.sample) < 400
    assert not set(scan.sample.index) & set(scan.valid.index)


# ------------------------------------------------------------------ epochs


def test_one_epoch_yields_every_training_row_once(data):
    scan = data.scan(0.1)
    size = divisor(scan.train_rows)
    steps = data.steps_per_epoch(scan, size)
    assert steps * size == scan.train_rows
    rows = np.concatenate(epoch(data, scan.fraction, size, steps, buffer_rows=300))
    assert rows.shape == (scan.train_rows, 7) and rows.dtype == np.float64
    training = table(2000).drop(index=scan.valid.index).to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(rows[np.argsort(rows[:, 0])], training)


def test_epochs_are_shuffled_anew_and_reproducible(data):
    scan = data.scan(0.1)
    ids = {
        key: np.concatenate(
            list(data.batches(epoch, 32, 40, fraction=scan.fraction, buffer_rows=300, seed=seed))
        )[:, 0]
        for key, (seed, epoch) in {"first": (0, 0), "again": (0, 0), "next": (0, 1)}.items()
    }
    np.testing.assert_array_equal(ids["first"], ids["again"])
    assert not np.array_equal(ids["first"], ids["next"])


def test_a_batch_mixes_row_groups_from_across_the_file(data):
    scan = data.scan(0.1)
    first = next(data.batches(0, 64, 1, fraction=scan.fraction, buffer_rows=400))
    groups = set((first[:, 0] // 100).astype(int))  # 100 rows per row group
    assert len(groups) >= 3  # the buffer mixes row groups...
    assert max(groups) >= 5  # ...drawn from across the file, not the first four


def test_shards_are_disjoint_and_cover_the_training_rows(data):
    scan = data.scan(0.1)
    shards = [data.shard(rank, 2) for rank in range(2)]
    covered = [np.arange(u.start, u.start + u.rows) for shard in shards for u in shard]
    assert sorted(np.concatenate(covered).tolist()) == list(range(2000))
    ids = []
    for rank in range(2):
        steps = int(scan.unit_train_rows[rank::2].sum())  # batches of one row: all of them
        rows = epoch(data, scan.fraction, 1, steps, buffer_rows=300, rank=rank, world=2)
        ids.append(set(np.concatenate(rows)[:, 0].astype(int)))
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(range(2000)) - set(scan.valid.index)
    steps = data.steps_per_epoch(scan, 64, world=2)
    assert steps == min(len(ids[0]), len(ids[1])) // 64
    for rank in range(2):
        assert len(epoch(data, scan.fraction, 64, steps, rank=rank, world=2)) == steps


def test_a_pandas_index_is_left_out_and_nullable_dtypes_kept(tmp_path):
    frame = table(400)[["score", "visits"]].astype({"visits": "Int64"})
    frame.index = pd.Index(np.arange(400) * 7, name="key")
    path = tmp_path / "frame.parquet"
    frame.to_parquet(path, row_group_size=100)
    data = ParquetRows(path)
    assert (data.names, data.dtypes, data.index_name) == (
        ["score", "visits"],
        ["float64", "Int64"],
        "key",
    )
    assert data.scan(0.2).valid.dtypes.tolist() == pd.read_parquet(path).dtypes.tolist()


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array(["a", "b"] * 50), r"column 'bad' is not numeric \(arrow type string\)"),
        (
            pa.array(["a", "b"] * 50).dictionary_encode(),
            "column 'bad' is not numeric .*dictionary",
        ),
    ],
    ids=["string", "categorical"],
)
def test_a_column_that_is_not_a_number_is_refused_on_open(tmp_path, column, message):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"fine": np.arange(100.0), "bad": column}), path)
    with pytest.raises(TypeError, match=message):
        ParquetRows(path)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (pa.array([np.nan if i in (7, 250) else 1.0 * i for i in range(300)]), "2 missing"),
        (pa.array([None if i == 299 else i for i in range(300)]), r"1 missing .* rows \[299\]"),
        (pa.array([np.inf if i == 7 else 1.0 * i for i in range(300)]), r"1 missing .* \[7\]"),
    ],
    ids=["NaN", "null", "inf"],
)
def test_a_missing_value_is_refused_naming_its_column_and_rows(tmp_path, bad, message):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"fine": np.arange(300.0), "bad": bad}), path, row_group_size=100)
    with pytest.raises(ValueError, match=f"column 'bad' has {message}"):
        ParquetRows(path).scan(0.1)


def test_a_shard_smaller_than_a_batch_is_refused(data):
    scan = data.scan(0.1)
    with pytest.raises(ValueError, match="fewer than one batch of 600; use fewer processes"):
        data.steps_per_epoch(scan, 600, world=4)
    batches = data.batches(0, 64, 100, fraction=scan.fraction)
    with pytest.raises(ValueError, match="ran out of training rows after 27 of 100 batches"):
        list(batches)


def test_files_with_other_columns_are_refused(tmp_path):
    write(table(300), tmp_path / "a.parquet")
    write(table(300).astype({"visits": np.float64}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet' does not match the others: column 'visit"):
        ParquetRows(tmp_path)


# ------------------------------------------------------------ DensityEstimator.fit(path)


def curved(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows)
    return pd.DataFrame(
        {
            "x": x,
            "y": x**2 / 2 + 0.3 * rng.normal(size=rows),
            "visits": rng.poisson(3.0, rows),
            "income": rng.lognormal(1.0, 0.5, rows),
        }
    )


@pytest.fixture
def stream_all(monkeypatch):
    """Every Parquet source streamed, however small (the default reads small ones whole)."""
    monkeypatch.setattr("pyroflows.density.estimator.STREAM_ROWS", 0)


def test_the_estimator_fits_a_parquet_file_as_it_fits_the_frame(tmp_path, stream_all):
    """Streamed or in memory: the same supports, and held-out scores within noise."""
    from pyroflows import DensityEstimator

    # (no count column: its dequantisation makes the mixture search 5x slower)
    frame, held_out = (curved(2000, seed).drop(columns="visits") for seed in (0, 1))
    path = write(frame, tmp_path / "rows.parquet", row_group_size=250)
    options = {"flow": "realnvp", "epochs": 15, "batch_size": 128, "seed": 0, "progress": False}
    streamed, loaded = DensityEstimator(**options), DensityEstimator(**options)
    history = streamed.fit(path)
    loaded.fit(frame)
    pd.testing.assert_frame_equal(streamed.supports(), loaded.supports())
    assert len(history) == 15 and history["valid_loss"].iloc[-1] < history["valid_loss"].iloc[0]
    gaussian = streamed.report.loc["gaussian", "valid_nats"]
    assert streamed.score(held_out) > gaussian + 0.3  # it learned the curve
    assert abs(streamed.score(held_out) - loaded.score(held_out)) < 0.1
    assert streamed.sample(5).dtypes.to_dict() == frame.dtypes.to_dict()


def test_a_parquet_fit_refuses_what_it_cannot_stream(tmp_path, stream_all):
    from pyroflows import DensityEstimator

    path = write(curved(400), tmp_path / "rows.parquet")
    model = DensityEstimator("realnvp", epochs=1, batch_size=64, progress=False)
    with pytest.raises(ValueError, match="without context= or valid="):
        model.fit(path, valid=curved(50))
    with pytest.raises(ValueError, match="too large for float32"):
        huge = curved(400).assign(x=lambda f: f["x"] * 1e39)  # finite in float64
        model.fit(write(huge, tmp_path / "huge.parquet"))
