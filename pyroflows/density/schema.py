r"""Column inference: what each column of a table is (its dtype, whether it is discrete,
and its support), decided from the training rows or declared by the user.

Each column :math:`y` is modelled on a support that every training value lies strictly
inside (discrete values after dequantisation, :math:`y + u` with :math:`u \in (0, 1)`), so
that the column transform (identity, :math:`\log y`, or
:math:`\operatorname{logit}\frac{y - a}{b - a}` on an interval :math:`(a, b)`) is finite on
every row, and samples, mapped back through it, never leave the support. With
``auto_support=True`` an undeclared column gets the support its values show, with
:math:`m` and :math:`M` its smallest and largest value:

========================  =================================  =================================
column                    values                             support
========================  =================================  =================================
boolean                   0 or 1                             :math:`(0, 2)`
integer                   :math:`m \ge 0` (a count)          positive
integer                   :math:`m < 0`                      real
float                     :math:`0 < m,\ M < 1`              :math:`(0, 1)`
float                     in :math:`[0, 1]`, touching 0/1    :math:`(0, 1)`, widened by
                                                             :data:`MARGIN` at a touched end
float                     :math:`m > 0,\ M > 1`              positive (whatever the skew)
float                     :math:`m = 0,\ M > 1`              :math:`(-\text{MARGIN}\,M,
                                                             \text{FAR}\,M)`
float                     :math:`m < 0`                      real
========================  =================================  =================================

A float value touches 0 when it is below float32's smallest normal number, and touches 1
when it rounds to 1 in float32: rows are held in float32 by default, where
:math:`1 - 10^{-9}` *is* 1 and the logit of it infinite. With ``auto_support=False`` every
undeclared column is real except booleans, which stay in :math:`(0, 2)`. A declared support
(``"real"``, ``"positive"`` or a ``(low, high)`` pair) wins, and is checked against the
values; a boolean's cannot be declared. Each :class:`Column` says in ``reason`` why it got
its support; :meth:`Schema.table` lists them all (the fit report shows it).

The decision needs only each column's dtype, smallest and largest value
(:class:`ColumnStats`): :func:`infer_schema` computes them from a frame,
:func:`schema_from_stats` takes them from a reader that streams a table too large to load
(:mod:`pyroflows.density.streaming`), and both decide by the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

KINDS = ("real", "positive", "interval")

#: how far past a touched end of :math:`[0, 1]` the support of a float column reaches (and,
#: times the largest value, below 0 for a column >= 0 with exact zeros)
MARGIN = 1e-5
#: the upper end of the support of a float column >= 0 with exact zeros, times its largest value
FAR = 1e3
# the smallest normal float32: a smaller value may be 0 (flushed) in float32 rows
_TINY = float(np.finfo(np.float32).tiny)


@dataclass
class Column:
    """How one column is modelled.

    ``kind`` is ``"real"``, ``"positive"`` or ``"interval"`` (with ``low``, ``high``), the
    support of the column after dequantisation; ``discrete`` columns (integers, booleans)
    are dequantised; ``dtype`` is the column's original dtype, restored on sampling;
    ``reason`` says why the column got its support (``"declared"``, or the rule of
    :func:`infer_schema` that the values met).
    """

    name: str
    dtype: str
    kind: str = "real"
    discrete: bool = False
    low: float = -math.inf
    high: float = math.inf
    reason: str = ""

    @property
    def support(self) -> str:
        """The support, readable: ``"real"``, ``"positive"`` or ``"(low, high)"``.

        Example:
            >>> Column("share", "float64", "interval", low=-1e-5, high=1.0).support
            '(-1e-05, 1)'
        """
        if self.kind == "interval":
            return f"({self.low:g}, {self.high:g})"
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Schema:
    """The columns of a table, and the input's type: ``"frame"``, ``"array"`` or ``"tensor"``."""

    columns: list[Column]
    source: str
    index_name: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def table(self) -> pd.DataFrame:
        """One row per column: its name, dtype, whether it is discrete, its support
        (:attr:`Column.support`) and why it got it.

        Example:
            >>> frame = pd.DataFrame({"count": [0, 2, 1, 5], "flag": [True, False, True, True]})
            >>> table = infer_schema(frame, "frame", None, auto_support=True).table()
            >>> list(table.columns)
            ['column', 'dtype', 'discrete', 'support', 'reason']
            >>> print(table[["column", "dtype", "discrete", "support"]].to_string(index=False))
            column dtype  discrete  support
             count int64      True positive
              flag  bool      True   (0, 2)
        """
        rows = [(c.name, c.dtype, c.discrete, c.support, c.reason) for c in self.columns]
        return pd.DataFrame(rows, columns=["column", "dtype", "discrete", "support", "reason"])


@dataclass(frozen=True)
class ColumnStats:
    """What the support of a column is decided from: its name, its pandas ``dtype`` (as
    pandas reads the column: ``"float64"``, ``"int64"``, ``"bool"``, ...), and its smallest
    and largest value as float64 numbers (booleans as 0 and 1).

    Example:
        >>> ColumnStats.of(pd.Series([3, 0, 7], name="visits"))
        ColumnStats(name='visits', dtype='int64', minimum=0.0, maximum=7.0)
    """

    name: Any
    dtype: str
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: pd.Series) -> ColumnStats:
        """The statistics of one column of finite numbers (:func:`check_values` first)."""
        numbers = values.to_numpy(dtype=np.float64)
        return cls(values.name, str(values.dtype), float(numbers.min()), float(numbers.max()))


def infer_schema(
    frame: pd.DataFrame, source: str, support: dict[Any, Any] | None, auto_support: bool
) -> Schema:
    r"""Validate a table and decide each column's support (the rules in the module doc).

    Declared ``support`` entries (``"real"``, ``"positive"`` or a ``(low, high)`` pair) win
    and are checked against the values; otherwise, with ``auto_support``, each column gets
    the support its values show (booleans :math:`(0, 2)`, counts positive, floats in
    :math:`[0, 1]` an interval, floats :math:`> 0` positive, floats :math:`\ge 0` with zeros
    :math:`(-\text{MARGIN}\,M, \text{FAR}\,M)`, the rest real), so that every training value
    lies strictly inside it; without, every column but the booleans is real. The decision
    needs only each column's dtype, minimum and maximum: this checks the values and hands
    those (:class:`ColumnStats`) to :func:`schema_from_stats`, which a streaming reader
    calls with the statistics of a file too large to load.

    Raises:
        ValueError: for an empty table, non-finite values, fewer than 4 rows, a constant
            column, a ``support`` entry naming no column, or a declared support the values
            leave; ``TypeError`` for a non-numeric column.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> frame = pd.DataFrame({
        ...     "share": rng.beta(2.0, 5.0, 200),
        ...     "income": rng.lognormal(10.0, 1.0, 200),
        ...     "score": rng.normal(0.0, 1.0, 200),
        ...     "visits": rng.poisson(3.0, 200),
        ...     "member": rng.random(200) < 0.3,
        ... })
        >>> schema = infer_schema(frame, "frame", {"score": (-10, 10)}, auto_support=True)
        >>> for column in schema.columns:
        ...     print(f"{column.name}: {column.support} ({column.reason})")
        share: (0, 1) (float, every value in (0, 1))
        income: positive (float, every value > 0)
        score: (-10, 10) (declared)
        visits: positive (integer, every value >= 0: dequantised above 0)
        member: (0, 2) (boolean: 0 or 1, dequantised into (0, 2), split by its frequency)
    """
    _check_support_names(support, list(frame.columns))
    check_values(frame)
    stats = [ColumnStats.of(frame[name]) for name in frame.columns]
    return schema_from_stats(stats, len(frame), source, support, auto_support, frame.index.name)


def schema_from_stats(
    stats: list[ColumnStats],
    rows: int,
    source: str,
    support: dict[Any, Any] | None,
    auto_support: bool,
    index_name: Any = None,
) -> Schema:
    """Decide each column's support from its statistics over ``rows`` finite values (the
    rules of :func:`infer_schema`, which calls this; the same errors, but for the checks of
    the values themselves, which are the caller's).

    Example:
        >>> stats = [ColumnStats("share", "float64", 0.0, 0.9)]
        >>> stats.append(ColumnStats("visits", "int64", 1.0, 9.0))
        >>> for column in schema_from_stats(stats, 10**9, "frame", None, True).columns:
        ...     print(f"{column.name}: {column.support} ({column.reason})")
        share: (-1e-05, 1) (float, every value in [0, 1], some at 0: widened by 1e-05 there)
        visits: positive (integer, every value >= 0: dequantised above 0)
    """
    support = dict(support or {})
    _check_support_names(support, [column.name for column in stats])
    if rows < 4:
        raise ValueError(
            f"a density estimator needs at least 4 rows to fit and validate, got {rows}"
        )
    return Schema([_column(column, support, auto_support) for column in stats], source, index_name)


def _check_support_names(support: dict[Any, Any] | None, names: list[Any]) -> None:
    unknown = [key for key in support or {} if key not in names]
    if unknown:
        raise ValueError(f"support names columns that are not in the data: {unknown}")


def _column(stats: ColumnStats, support: dict[Any, Any], auto_support: bool) -> Column:
    """The :class:`Column` of one column's statistics (the rules of the module doc)."""
    name, dtype = stats.name, pd.api.types.pandas_dtype(stats.dtype)
    is_bool = pd.api.types.is_bool_dtype(dtype)
    discrete = is_bool or pd.api.types.is_integer_dtype(dtype)
    if stats.minimum == stats.maximum:
        raise ValueError(
            f"column {name!r} is constant (every value is {stats.minimum!r}): its density is "
            "a point mass, which no flow can model; drop the column"
        )
    column = Column(name=name, dtype=stats.dtype, discrete=discrete)
    declared = support.get(name)
    if is_bool:
        if declared is not None:
            raise ValueError(
                f"column {name!r} is boolean: its values are False and True, and its "
                f"support cannot be declared (got {declared!r}); drop it from support"
            )
        column.kind, column.low, column.high = "interval", 0.0, 2.0
        column.reason = "boolean: 0 or 1, dequantised into (0, 2), split by its frequency"
    elif declared is not None:
        _declare(column, declared, stats.minimum, stats.maximum)
    elif not auto_support:
        column.reason = "auto_support=False"
    elif discrete:
        _infer_integer(column, stats.minimum)
    else:
        _infer_float(column, stats.minimum, stats.maximum)
    return column


def _infer_integer(column: Column, low: float) -> None:
    if low >= 0:
        column.kind = "positive"
        column.reason = "integer, every value >= 0: dequantised above 0"
    else:
        column.reason = "real: integer with negative values"


def _infer_float(column: Column, low: float, high: float) -> None:
    if low < 0:
        column.reason = "real: takes negative values"
        return
    zero = low < _TINY  # 0 in float32 rows (or flushed to 0 there)
    if high <= 1:
        one = np.float32(high) == 1  # 1 in float32 rows
        column.kind = "interval"
        column.low = -MARGIN if zero else 0.0
        column.high = 1 + MARGIN if one else 1.0
        ends = " and ".join(end for end, hit in (("0", zero), ("1", one)) if hit)
        column.reason = (
            f"float, every value in [0, 1], some at {ends}: widened by {MARGIN:g} there"
            if ends
            else "float, every value in (0, 1)"
        )
    elif not zero:
        column.kind = "positive"
        column.reason = "float, every value > 0"
    else:
        column.kind, column.low, column.high = "interval", -MARGIN * high, FAR * high
        column.reason = (
            f"float, every value >= 0, some at 0: from -{MARGIN:g} to {FAR:g} times the "
            "largest value, so samples stay (all but) >= 0"
        )


def _declare(column: Column, declared: Any, least: float, most: float) -> None:
    r"""Give ``column`` its declared support, checking that every value, from ``least`` to
    ``most`` (for a discrete column, :math:`y + u` for every :math:`u \in (0, 1)`), lies
    strictly inside it."""
    name = column.name
    column.reason = "declared"
    if declared in ("real", "positive"):
        column.kind = declared
    elif isinstance(declared, (tuple, list)) and len(declared) == 2:
        low, high = float(declared[0]), float(declared[1])
        if not low < high:
            raise ValueError(f"support of column {name!r} must be (low, high) with low < high")
        column.kind, column.low, column.high = "interval", low, high
    else:
        raise ValueError(
            f"support of column {name!r} must be 'real', 'positive' or a (low, high) pair, "
            f"got {declared!r}"
        )
    top = most + (1 if column.discrete else 0)
    if column.kind == "positive" and least < (0 if column.discrete else 1e-300):
        raise ValueError(f"column {name!r} is declared positive but has values <= 0")
    # a continuous value on an end would have density 0 (logit of 0 or 1); a discrete k is
    # read in (k, k + 1), inside the interval when low <= k and k + 1 <= high
    outside = (
        least < column.low or top > column.high
        if column.discrete
        else least <= column.low or top >= column.high
    )
    if column.kind == "interval" and outside:
        raise ValueError(
            f"column {name!r} is declared in ({column.low}, {column.high}) but its values "
            f"span [{least}, {most}]" + (" (dequantised up to max + 1)" if column.discrete else "")
        )


def check_values(frame: pd.DataFrame) -> None:
    """Refuse empty tables, non-numeric columns and non-finite values, naming the column."""
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"the table is empty ({frame.shape[0]} rows, {frame.shape[1]} columns)")
    for name in frame.columns:
        values = frame[name]
        if isinstance(values.dtype, pd.CategoricalDtype) or not (
            pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
        ):
            raise TypeError(
                f"column {name!r} is not numeric (dtype {values.dtype}); DensityEstimator "
                "models numeric and boolean columns: encode categories as numbers or indicator "
                "columns (e.g. pandas.get_dummies), or drop the column"
            )
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(numbers)
        if bad.any():
            rows = frame.index[bad][:5].tolist()  # plain Python values, not np.int64(...)
            raise ValueError(
                f"column {name!r} has {int(bad.sum())} missing or non-finite values "
                f"(NaN or inf), e.g. at rows {rows}; drop or impute them first"
            )
