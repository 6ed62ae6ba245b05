r"""Rows of Parquet files larger than memory: one scan, then shuffled training batches.

:class:`ParquetRows` reads a Parquet file, a folder of them or a list of them
(``pyarrow.dataset``) in *read units*: one row group of one file, read a record batch at a
time. Each row has a *position*, its index in the whole data: files in sorted path order,
their row groups in order, the rows of a row group in order.

**The split.** A row is a validation row when :math:`h_V(i) < f`, where :math:`i` is its
position, :math:`f` the validation fraction and :math:`h_V` = :func:`unit_interval` with
:data:`VALID_SALT`: the splitmix64 mixing function of :math:`i` XOR a constant derived from
the salt, read as a number in :math:`[0, 1)`. The hash is integer arithmetic on the position
alone, so the split needs no memory and no coordination: every process of a multi-process
run, every epoch and every later run on the same files agree on which rows are held out,
and a validation row never leaks into training. About :math:`f\,n` of the :math:`n` rows
are held out (binomially many). Adding a file whose path sorts after the others keeps every
earlier row's position, hence its side of the split; a file that sorts before them moves
the positions after it.

**The start sample.** About ``sample_rows`` training rows, those with
:math:`h_S(i) < \text{sample\_rows} / \text{training rows}` (a second hash,
:data:`SAMPLE_SALT`), are kept by the scan for the estimator's data-dependent start
(standardisation, the Gaussian mixture search, actnorm).

**The shuffle.** A process reads its shard's read units in an order drawn anew for each
epoch, and streams their training rows into a buffer of :math:`B` rows (``buffer_rows``).
Once the buffer is full, each batch of :math:`b` rows is drawn uniformly without
replacement from the buffer, and the freed slots take the next incoming rows; when the
shard is read, the buffer is emitted in a random order. A row leaves the buffer at each
draw with probability :math:`b/B`, so it is emitted on average :math:`B` rows of stream
after it arrives (a geometric tail), and never more than :math:`B` rows before: a buffer
alone only shuffles *locally*. Files are often sorted (by time, by id, by class); without
the shuffled unit order every epoch would see the same slow drift through the data.
With it, the stream is a random concatenation of row groups, and a batch mixes the rows of
about :math:`B / \text{rows per row group}` row groups: write row groups well smaller than
the buffer (``pyarrow.parquet.write_table(..., row_group_size=65_536)``) for batches that
mix many.

**Memory** is bounded by the buffer (:math:`\min(B, \text{shard rows}) \times` columns
float64 numbers), one record batch of ``read_rows`` rows (in Arrow and as float64),
pyarrow's read buffers (1 MiB per column: a row group is not read whole) and the scan's
validation and start frames (at most about ``max_valid`` and ``sample_rows`` rows); never
by the size of the data (``benchmarks/parquet_rss.py`` measures it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pyroflows._io import import_extra
from pyroflows.density.schema import ColumnStats

#: the salt of the hash that puts a row in validation (:func:`unit_interval`)
VALID_SALT = 0x56414C4944  # "VALID"
#: the salt of the hash that puts a training row in the scan's start sample
SAMPLE_SALT = 0x53414D504C45  # "SAMPLE"

# bytes pyarrow reads of a column chunk at a time (else the whole row group is read at once)
_READ_BUFFER = 1 << 20
# splitmix64: the increment and the two multipliers of its finaliser
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(state: np.ndarray) -> np.ndarray:
    """The splitmix64 output for each uint64 ``state`` (a bijection of 64-bit integers).

    Example:
        >>> hex(int(_splitmix64(np.array([0], dtype=np.uint64))[0]))  # splitmix64's first
        '0xe220a8397b1dcdaf'
    """
    with np.errstate(over="ignore"):  # wrapping arithmetic modulo 2**64 is the point
        z = state + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def unit_interval(positions: np.ndarray, salt: int) -> np.ndarray:
    r"""A stable hash of row positions into :math:`[0, 1)`, one per ``salt``.

    :math:`h(i) = \lfloor s(i \oplus s(\text{salt})) / 2^{11} \rfloor \cdot 2^{-53}`, with
    :math:`s` the splitmix64 mixing function: integer arithmetic modulo :math:`2^{64}`, the
    same on every machine, process and run; the values of distinct positions look
    independent and uniform.

    Example:
        >>> unit_interval(np.arange(4), VALID_SALT).round(6).tolist()
        [0.917025, 0.936772, 0.376735, 0.224851]
        >>> float((unit_interval(np.arange(100_000), VALID_SALT) < 0.1).mean())
        0.10102
    """
    numbers = np.atleast_1d(np.asarray(positions))
    if numbers.size and (not np.issubdtype(numbers.dtype, np.integer) or numbers.min() < 0):
        raise ValueError("positions must be integers >= 0")
    key = _splitmix64(np.array([salt], dtype=np.uint64))
    mixed = _splitmix64(numbers.astype(np.uint64) ^ key)
    return ((mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(np.shape(positions))


@dataclass(frozen=True)
class ReadUnit:
    """One row group of one file: ``rows`` rows, the first at position ``start``."""

    path: str
    row_group: int
    rows: int
    start: int


@dataclass
class Scan:
    """What one pass over the data found (:meth:`ParquetRows.scan`).

    ``stats`` the statistics of each column (for
    :func:`~pyroflows.density.schema.schema_from_stats`); ``rows`` and ``train_rows`` the
    number of rows and of training rows; ``fraction`` the validation fraction in effect;
    ``valid`` the validation rows and ``sample`` the start sample, as frames in the columns'
    own dtypes, indexed by position; ``unit_train_rows`` the training rows of each read unit.
    """

    stats: list[ColumnStats]
    rows: int
    train_rows: int
    fraction: float
    valid: pd.DataFrame
    sample: pd.DataFrame
    unit_train_rows: np.ndarray


class ParquetRows:
    r"""The rows of a Parquet file, a folder of Parquet files or a list of them, streamed.

    Opening reads the files' metadata only: the columns (:attr:`names`) and the pandas
    dtype each reads as (:attr:`dtypes`; the columns of a pandas index are left out, as
    ``pandas.read_parquet`` makes them the index), the number of rows (:attr:`rows`) and the
    read units (:attr:`units`). Every column must be integer, floating or boolean. Then
    :meth:`scan` makes one pass for the statistics, the validation rows and the start
    sample, and :meth:`batches` streams an epoch of shuffled training rows (the module doc
    says how, and what it holds in memory).

    Raises:
        TypeError: for a column that is not integer, floating or boolean.
        ValueError: for data with no rows or no columns, or files whose columns differ.

    Example:
        >>> import tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> rng = np.random.default_rng(0)
        >>> path = os.path.join(tempfile.mkdtemp(), "table.parquet")
        >>> table = pa.table({"x": rng.normal(size=1000), "n": rng.poisson(3.0, 1000)})
        >>> pq.write_table(table, path, row_group_size=100)
        >>> data = ParquetRows(path)
        >>> data.names, data.dtypes, data.rows, len(data.units)
        (['x', 'n'], ['float64', 'int64'], 1000, 10)
        >>> scan = data.scan(validation=0.1)
        >>> scan.train_rows + len(scan.valid) == data.rows, scan.stats[1].minimum
        (True, 0.0)
        >>> steps = data.steps_per_epoch(scan, batch_size=64)
        >>> batches = list(data.batches(0, 64, steps, fraction=scan.fraction, buffer_rows=256))
        >>> len(batches) == steps == scan.train_rows // 64, batches[0].shape, batches[0].dtype
        (True, (64, 2), dtype('float64'))
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        dataset_module = _pyarrow("pyarrow.dataset")
        if isinstance(source, (str, os.PathLike)):
            paths: Any = os.fspath(source)
        else:
            paths = [os.fspath(path) for path in source]
        try:
            dataset = dataset_module.dataset(paths, format="parquet")
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"could not read {paths!r} as parquet: {error}") from None
        self._filesystem = dataset.filesystem
        schema = dataset.schema
        pandas_meta = schema.pandas_metadata or {}
        index = [c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)]
        columns = pandas_meta.get("columns", [])
        numpy_types = {column.get("field_name"): column.get("numpy_type") for column in columns}
        #: the modelled columns, in the files' order
        self.names: list[str] = [name for name in schema.names if name not in index]
        #: the pandas dtype each column reads as (``"float64"``, ``"int64"``, ``"bool"``, ...)
        self.dtypes: list[str] = [
            _pandas_dtype(name, schema.field(name).type, numpy_types.get(name))
            for name in self.names
        ]
        #: the name of the pandas index stored in the files, if one is
        self.index_name: Any = _index_name(pandas_meta)
        #: the read units, in position order
        self.units: list[ReadUnit] = []
        self._metadata: dict[str, Any] = {}
        start = 0
        for fragment in sorted(dataset.get_fragments(), key=lambda fragment: fragment.path):
            _check_columns(fragment, schema, self.names)
            metadata = self._metadata[fragment.path] = fragment.metadata
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                if rows:
                    self.units.append(ReadUnit(fragment.path, group, rows, start))
                    start += rows
        #: the number of rows, from the metadata
        self.rows: int = start
        if self.rows == 0 or not self.names:
            raise ValueError(f"the table is empty ({self.rows} rows, {len(self.names)} columns)")

    def read(self) -> pd.DataFrame:
        """All rows as one DataFrame (the columns' own dtypes; for data that fits memory).

        Example:
            >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
            >>> path = tempfile.mkdtemp() + "/rows.parquet"
            >>> pq.write_table(pa.table({"x": [1.0, 2.0], "n": [3, 4]}), path)
            >>> ParquetRows(path).read()
                 x  n
            0  1.0  3
            1  2.0  4
        """
        parquet = _pyarrow("pyarrow.parquet")
        frames = [  # as pandas.read_parquet reads each: the stored index and dtypes
            parquet.read_table(path, filesystem=self._filesystem).to_pandas()
            for path in self._metadata
        ]
        return frames[0] if len(frames) == 1 else pd.concat(frames)

    # ------------------------------------------------------------------ one pass

    def scan(
        self,
        validation: float,
        max_valid: int = 100_000,
        sample_rows: int = 100_000,
        read_rows: int = 65_536,
    ) -> Scan:
        r"""One pass over every row: check the values, and keep what training needs.

        The validation fraction in effect is :math:`\min(\text{validation},
        \text{max\_valid} / \text{rows})`, so that about ``max_valid`` rows at most are
        held; the start sample holds about ``sample_rows`` training rows. Rows are read
        ``read_rows`` at a time.

        Raises:
            ValueError: for a missing or non-finite value (after the pass, naming the first
                such column, how many it has and a few of their positions), or a
                ``validation`` outside :math:`[0, 1)`.
        """
        if not 0 <= validation < 1:
            raise ValueError(f"validation must be in [0, 1), got {validation!r}")
        fraction = min(validation, max_valid / self.rows)
        expected_train = max(self.rows * (1 - fraction), 1.0)
        rate = min(1.0, sample_rows / expected_train)
        least = np.full(len(self.names), np.inf)
        most = np.full(len(self.names), -np.inf)
        bad_counts = np.zeros(len(self.names), dtype=np.int64)
        bad_rows: list[list[int]] = [[] for _ in self.names]
        valid_parts, sample_parts = [], []
        unit_train_rows = np.zeros(len(self.units), dtype=np.int64)
        for k, unit in enumerate(self.units):
            for positions, batch in self._read(unit, read_rows):
                for j, name in enumerate(self.names):
                    numbers = _numbers(batch.column(name))
                    bad = ~np.isfinite(numbers)
                    if bad.any():
                        bad_counts[j] += int(bad.sum())
                        bad_rows[j].extend(positions[bad][: 5 - len(bad_rows[j])].tolist())
                        numbers = numbers[~bad]
                    if numbers.size:
                        least[j] = min(least[j], numbers.min())
                        most[j] = max(most[j], numbers.max())
                in_valid = unit_interval(positions, VALID_SALT) < fraction
                in_sample = ~in_valid & (unit_interval(positions, SAMPLE_SALT) < rate)
                unit_train_rows[k] += len(positions) - int(in_valid.sum())
                for parts, keep in ((valid_parts, in_valid), (sample_parts, in_sample)):
                    if keep.any():
                        kept = batch.filter(keep)
                        arrays = [_values(kept.column(name)) for name in self.names]
                        parts.append((positions[keep], arrays))
        for name, count, rows in zip(self.names, bad_counts, bad_rows):
            if count:
                raise ValueError(
                    f"column {name!r} has {int(count)} missing or non-finite values "
                    f"(NaN or inf), e.g. at rows {rows}; drop or impute them first"
                )
        stats = [
            ColumnStats(name, dtype, float(low), float(high))
            for name, dtype, low, high in zip(self.names, self.dtypes, least, most)
        ]
        train_rows = int(unit_train_rows.sum())
        return Scan(
            stats,
            self.rows,
            train_rows,
            fraction,
            self._frame(valid_parts),
            self._frame(sample_parts),
            unit_train_rows,
        )

    # ------------------------------------------------------------------ training batches

    def shard(self, rank: int = 0, world: int = 1) -> list[ReadUnit]:
        """The read units of process ``rank`` of ``world``: every ``world``-th unit from the
        ``rank``-th, so the shards are disjoint and cover the data."""
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank!r}")
        return self.units[rank::world]

    def steps_per_epoch(self, scan: Scan, batch_size: int, world: int = 1) -> int:
        """Batches per epoch, the same on every process: the fewest training rows of any
        shard, divided by ``batch_size`` (every process scans all the data, so knows every
        shard's size).

        Raises:
            ValueError: when a shard has fewer training rows than ``batch_size``.
        """
        if len(scan.unit_train_rows) != len(self.units):
            raise ValueError(
                f"scan has {len(scan.unit_train_rows)} read units, the data {len(self.units)}: "
                "it is the scan of other data"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.shard(0, world)  # checks world
        sizes = [int(scan.unit_train_rows[rank::world].sum()) for rank in range(world)]
        rank = int(np.argmin(sizes))
        if sizes[rank] < batch_size:
            raise ValueError(
                f"process {rank} of {world} gets {len(self.shard(rank, world))} of the "
                f"{len(self.units)} row groups, with {sizes[rank]} training rows: fewer than "
                f"one batch of {batch_size}; use fewer processes, a smaller batch_size, or "
                "write the data in more row groups"
            )
        return sizes[rank] // batch_size

    def batches(
        self,
        epoch: int,
        batch_size: int,
        steps: int,
        *,
        fraction: float,
        buffer_rows: int = 262_144,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        read_rows: int = 65_536,
    ) -> Iterator[np.ndarray]:
        """``steps`` float64 arrays of ``batch_size`` training rows of process ``rank``'s
        shard, shuffled through a buffer of ``buffer_rows`` rows (the module doc).

        The rows of the validation ``fraction`` (:attr:`Scan.fraction`) are left out. The
        order is drawn from ``(seed, epoch, rank)``: the same arguments give the same
        batches. With ``steps * batch_size`` the shard's training rows, each of them comes
        exactly once; with fewer, the epoch stops there (other rows are left out each epoch,
        as the unit order changes); with more, a ``ValueError`` when the shard runs out.
        """
        units = self.shard(rank, world)
        if batch_size < 1 or steps < 0:
            raise ValueError(f"batch_size must be >= 1 and steps >= 0, got {batch_size}, {steps}")
        if buffer_rows < batch_size:
            raise ValueError(
                f"buffer_rows ({buffer_rows}) must hold at least one batch ({batch_size} rows)"
            )
        if steps == 0:
            return
        rng = np.random.default_rng([seed, epoch, rank])
        capacity = min(buffer_rows, sum(unit.rows for unit in units))
        buffer = np.empty((capacity, len(self.names)))
        fill = emitted = 0
        for index in rng.permutation(len(units)):
            for positions, batch in self._read(units[index], read_rows):
                rows = self._matrix(batch)[unit_interval(positions, VALID_SALT) >= fraction]
                while len(rows):
                    if fill == capacity:  # full, and rows are waiting: draw a batch
                        yield _draw(buffer, capacity, batch_size, rng)
                        fill -= batch_size
                        emitted += 1
                        if emitted == steps:
                            return
                    count = min(capacity - fill, len(rows))
                    buffer[fill : fill + count] = rows[:count]
                    fill += count
                    rows = rows[count:]
        order = rng.permutation(fill)
        for start in range(0, fill - batch_size + 1, batch_size):
            yield buffer[order[start : start + batch_size]]
            emitted += 1
            if emitted == steps:
                return
        raise ValueError(
            f"process {rank} of {world} ran out of training rows after {emitted} of {steps} "
            f"batches of {batch_size}: take steps from steps_per_epoch, and the fraction of "
            "the scan"
        )

    # ------------------------------------------------------------------ reading

    def _read(self, unit: ReadUnit, read_rows: int) -> Iterator[tuple[np.ndarray, Any]]:
        """The record batches of one read unit, each with its rows' positions."""
        parquet = _pyarrow("pyarrow.parquet")
        source = parquet.ParquetFile(  # a column chunk is read through a buffer, not whole
            unit.path,
            metadata=self._metadata[unit.path],
            filesystem=self._filesystem,
            pre_buffer=False,
            buffer_size=_READ_BUFFER,
        )
        with source:
            start = unit.start
            for batch in source.iter_batches(
                batch_size=read_rows, row_groups=[unit.row_group], columns=self.names
            ):
                yield np.arange(start, start + batch.num_rows, dtype=np.int64), batch
                start += batch.num_rows

    def _matrix(self, batch: Any) -> np.ndarray:
        """A record batch as a float64 array, one column per name (booleans as 0 and 1)."""
        matrix = np.empty((batch.num_rows, len(self.names)))
        for j, name in enumerate(self.names):
            matrix[:, j] = _numbers(batch.column(name))
        return matrix

    def _frame(self, parts: list[tuple[np.ndarray, list[np.ndarray]]]) -> pd.DataFrame:
        """Rows kept by the scan as one frame, in the columns' dtypes, indexed by position."""
        positions = [positions for positions, _ in parts] or [np.empty(0, dtype=np.int64)]
        index = pd.Index(np.concatenate(positions))
        columns = {
            name: pd.Series(
                np.concatenate([arrays[j] for _, arrays in parts] or [[]]), index=index
            ).astype(dtype)
            for j, (name, dtype) in enumerate(zip(self.names, self.dtypes))
        }
        return pd.DataFrame(columns, index=index)


def _draw(buffer: np.ndarray, fill: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Take ``size`` rows uniformly without replacement from ``buffer[:fill]``, and close
    the holes with the last rows, so that the ``fill - size`` others are ``buffer[:fill -
    size]``."""
    slots = rng.choice(fill, size, replace=False)
    batch = buffer[slots]
    cut = fill - size
    taken_from_tail = np.zeros(size, dtype=bool)
    taken_from_tail[slots[slots >= cut] - cut] = True
    buffer[slots[slots < cut]] = buffer[cut + np.flatnonzero(~taken_from_tail)]
    return batch


def _numbers(column: Any) -> np.ndarray:
    """An Arrow column as float64 numbers, NaN where a value is missing."""
    pyarrow, compute = _pyarrow("pyarrow"), _pyarrow("pyarrow.compute")
    return compute.cast(column, pyarrow.float64(), safe=False).to_numpy(zero_copy_only=False)


def _values(column: Any) -> np.ndarray:
    """An Arrow column as numpy values of its own type (float64 where a value is missing)."""
    return column.to_numpy(zero_copy_only=False)


def _pandas_dtype(name: str, arrow_type: Any, numpy_type: str | None) -> str:
    """The pandas dtype of a column (the one pandas metadata names, for a pandas nullable
    number), refusing a column that is not integer, floating or boolean."""
    types = _pyarrow("pyarrow").types
    if not (types.is_integer(arrow_type) or types.is_floating(arrow_type)) and not (
        types.is_boolean(arrow_type)
    ):
        raise TypeError(
            f"column {name!r} is not numeric (arrow type {arrow_type}); DensityEstimator "
            "models integer, floating and boolean columns: encode categories as numbers or "
            "indicator columns, or drop the column"
        )
    if numpy_type is not None:
        try:
            declared = pd.api.types.pandas_dtype(numpy_type)
        except TypeError:
            declared = None
        numeric = declared is not None and (
            pd.api.types.is_numeric_dtype(declared) or pd.api.types.is_bool_dtype(declared)
        )
        if numeric and isinstance(declared, pd.api.extensions.ExtensionDtype):
            return str(declared)
    return str(np.dtype(arrow_type.to_pandas_dtype()))


def _index_name(pandas_meta: dict[str, Any]) -> Any:
    """The name of the (single) pandas index stored with the files, else None."""
    index = pandas_meta.get("index_columns", [])
    if len(index) != 1:
        return None
    if isinstance(index[0], dict):
        return index[0].get("name")
    names = {c.get("field_name"): c.get("name") for c in pandas_meta.get("columns", [])}
    return names.get(index[0])


def _check_columns(fragment: Any, schema: Any, names: list[str]) -> None:
    """Refuse a file whose columns are not those of the first, of the same types."""
    physical = fragment.physical_schema
    for name in names:
        field = physical.field(name) if name in physical.names else None
        if field is None or field.type != schema.field(name).type:
            found = "no such column" if field is None else f"arrow type {field.type}"
            raise ValueError(
                f"file {fragment.path!r} does not match the others: column {name!r} is "
                f"{schema.field(name).type} elsewhere, {found} there"
            )


def _pyarrow(module: str) -> Any:
    return import_extra(module, purpose="streaming Parquet", package="pyarrow", extra="parquet")
