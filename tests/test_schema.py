"""Column inference: each column gets the support its values show, and says why."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pyroflows.density.schema import FAR, MARGIN, Column, Schema, infer_schema

INF = math.inf


def infer(values: list, *, support: dict | None = None, auto_support: bool = True) -> Column:
    """The inferred column of a one-column frame holding ``values``."""
    frame = pd.DataFrame({"y": values})
    return infer_schema(frame, "frame", support, auto_support).columns[0]


def assert_inside(column: Column, values: np.ndarray) -> None:
    """Every value strictly inside the column's support: ``y`` itself for a continuous
    column, ``y + u`` for every ``u`` in (0, 1) for a discrete one; in float64 and, for a
    continuous column, also as float32 rows and bounds hold it."""
    values = values.astype(np.float64)
    low, high = column.low, column.high
    if column.kind == "real":
        return
    if column.discrete:  # y + u sweeps (y, y + 1)
        least, most = values.min(), values.max() + 1
        if column.kind == "positive":
            assert least >= 0
        else:
            assert low <= least and most <= high
        return
    if column.kind == "positive":
        low, high = 0.0, INF
    assert low < values.min() and values.max() < high
    single = values.astype(np.float32)
    assert np.float32(low) < single.min() and single.max() < np.float32(high)


# ------------------------------------------------------------------ each rule


RULES = {
    "bool": ([True, False, True, True], "interval", 0.0, 2.0, "boolean: 0 or 1"),
    "count": ([0, 3, 1, 7], "positive", -INF, INF, "integer, every value >= 0"),
    "signed integer": ([-2, 0, 1, 5], "real", -INF, INF, "integer with negative values"),
    "beta": ([0.1, 0.25, 0.5, 0.9], "interval", 0.0, 1.0, "every value in (0, 1)"),
    "unit with 0": ([0.0, 0.2, 0.5, 0.9], "interval", -MARGIN, 1.0, "some at 0: widened"),
    "unit with 1": ([0.1, 0.2, 0.5, 1.0], "interval", 0.0, 1 + MARGIN, "some at 1: widened"),
    "unit with 0 and 1": ([0.0, 0.2, 1.0, 1.0], "interval", -MARGIN, 1 + MARGIN, "0 and 1"),
    # 1 - 1e-9 is 1.0 in float32 rows, 1e-50 is 0.0: the ends are touched there
    "unit near 1": ([0.1, 0.2, 1 - 1e-9, 0.5], "interval", 0.0, 1 + MARGIN, "some at 1"),
    "unit near 0": ([1e-50, 0.2, 0.3, 0.5], "interval", -MARGIN, 1.0, "some at 0"),
    "right-skewed": ([0.5, 2.0, 30.0, 1000.0], "positive", -INF, INF, "every value > 0"),
    "left-skewed": ([1.0, 9.9, 9.95, 10.0], "positive", -INF, INF, "every value > 0"),
    "far from 0": ([100.1, 99.8, 100.3, 100.0], "positive", -INF, INF, "every value > 0"),
    "zeros": ([0.0, 0.0, 3.0, 10.0], "interval", -MARGIN * 10, FAR * 10, "some at 0"),
    "normal": ([-0.5, 0.2, 3.0, 1.0], "real", -INF, INF, "real: takes negative values"),
}


@pytest.mark.parametrize(("values", "kind", "low", "high", "reason"), RULES.values(), ids=RULES)
def test_each_column_gets_the_support_its_values_show(values, kind, low, high, reason):
    column = infer(values)
    assert (column.kind, column.low, column.high) == (kind, low, high)
    assert reason in column.reason
    assert_inside(column, np.array(values))


def test_float32_columns_follow_the_same_rules():
    column = infer(np.array([0.0, 0.25, 0.5, 0.75], dtype=np.float32))
    assert (column.dtype, column.kind, column.low, column.high) == (
        "float32",
        "interval",
        -MARGIN,
        1,
    )


@pytest.mark.parametrize("values", [[0.1, 0.2, 0.5, 0.9], [0.5, 2.0, 30.0, 1e3], [0, 3, 1, 7]])
def test_without_auto_support_columns_are_real(values):
    column = infer(values, auto_support=False)
    assert (column.kind, column.reason) == ("real", "auto_support=False")


def test_without_auto_support_booleans_stay_in_0_2():
    column = infer([True, False, False, True], auto_support=False)
    assert (column.kind, column.low, column.high) == ("interval", 0.0, 2.0)
    assert column.reason.startswith("boolean")


# ------------------------------------------------------------------ declared supports


@pytest.mark.parametrize(
    ("values", "declared", "kind", "low", "high"),
    [
        ([0.1, 0.2, 0.5, 0.9], "real", "real", -INF, INF),
        ([0.1, 0.2, 0.5, 0.9], (0, 10), "interval", 0.0, 10.0),
        ([-1.0, 0.2, 0.5, 0.9], [-5, 5], "interval", -5.0, 5.0),
        ([0.1, 0.2, 0.5, 0.9], "positive", "positive", -INF, INF),
        ([0, 3, 1, 7], "real", "real", -INF, INF),
        ([0, 3, 1, 7], (0, 8), "interval", 0.0, 8.0),  # 7 + u < 8
    ],
)
def test_a_declared_support_wins(values, declared, kind, low, high):
    for auto_support in (True, False):
        column = infer(values, support={"y": declared}, auto_support=auto_support)
        assert (column.kind, column.low, column.high, column.reason) == (
            kind,
            low,
            high,
            "declared",
        )


@pytest.mark.parametrize(
    ("values", "declared", "message"),
    [
        ([0.0, 0.2, 0.5, 0.9], "positive", "column 'y' is declared positive but has values <= 0"),
        ([-1, 3, 1, 7], "positive", "column 'y' is declared positive but has values <= 0"),
        ([0.0, 0.2, 0.5, 0.9], (0, 1), r"column 'y' is declared in \(0.0, 1.0\) but its values"),
        ([0.1, 0.2, 0.5, 1.0], (0, 1), r"span \[0.1, 1.0\]$"),
        ([0, 3, 1, 7], (0, 7.5), r"span \[0.0, 7.0\] \(dequantised up to max \+ 1\)"),
        ([0.1, 0.2, 0.5, 0.9], (1, 1), r"support of column 'y' must be \(low, high\) with low"),
        ([0.1, 0.2, 0.5, 0.9], "bounded", "must be 'real', 'positive' or a \\(low, high\\) pair"),
        ([True, False, True, True], "real", "column 'y' is boolean: its values are False and"),
    ],
)
def test_a_declared_support_the_values_leave_is_refused(values, declared, message):
    with pytest.raises(ValueError, match=message):
        infer(values, support={"y": declared})


# ------------------------------------------------------------------ refused tables


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        (pd.DataFrame({"y": [2.0] * 5}), ValueError, "column 'y' is constant"),
        (pd.DataFrame({"y": list("abcd")}), TypeError, "column 'y' is not numeric"),
        (pd.DataFrame({"y": [1.0, np.nan, 2.0, 3.0]}), ValueError, "column 'y' has 1 missing"),
        (
            pd.DataFrame({"y": [1.0, 2.0, 3.0]}),
            ValueError,
            "at least 4 rows to fit and validate, got 3",
        ),
        (pd.DataFrame({"y": []}), ValueError, r"the table is empty \(0 rows, 1 columns\)"),
    ],
)
def test_bad_tables_are_refused_naming_the_column(frame, error, message):
    with pytest.raises(error, match=message):
        infer_schema(frame, "frame", None, auto_support=True)


def test_a_support_for_a_missing_column_is_refused():
    with pytest.raises(ValueError, match=r"support names columns that are not in the data: \['z'"):
        infer([0.1, 0.2, 0.5, 0.9], support={"z": "real"})


# ------------------------------------------------------------------ Column and Schema


@pytest.mark.parametrize(
    ("column", "support"),
    [
        (Column("a", "float64"), "real"),
        (Column("a", "float64", "positive"), "positive"),
        (Column("a", "bool", "interval", True, 0.0, 2.0), "(0, 2)"),
        (Column("a", "float64", "interval", low=-MARGIN, high=1 + MARGIN), "(-1e-05, 1.00001)"),
        (Column("a", "float64", "interval", low=-3e-5, high=3000.0), "(-3e-05, 3000)"),
    ],
)
def test_support_is_readable(column, support):
    assert column.support == support


def test_a_column_saved_before_reason_existed_still_loads():
    old = {"name": "a", "dtype": "int64", "kind": "positive", "discrete": True}
    old |= {"low": -INF, "high": INF}
    column = Column(**old)
    assert (column.kind, column.reason) == ("positive", "")
    assert Column(**infer([0.1, 0.2, 0.5, 0.9]).to_dict()).reason == "float, every value in (0, 1)"


def test_the_table_lists_every_column_with_its_support_and_reason():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "share": rng.beta(2.0, 5.0, 100),
            "income": rng.lognormal(10.0, 1.0, 100),
            "score": rng.normal(0.0, 1.0, 100),
            "visits": rng.poisson(3.0, 100),
            "member": rng.random(100) < 0.3,
        }
    )
    schema = infer_schema(frame, "frame", {"score": (-10, 10)}, auto_support=True)
    table = schema.table()
    assert isinstance(schema, Schema)
    assert list(table.columns) == ["column", "dtype", "discrete", "support", "reason"]
    assert table.shape == (5, 5)
    assert table["column"].tolist() == list(frame.columns)
    assert table["dtype"].tolist() == ["float64", "float64", "float64", "int64", "bool"]
    assert table["discrete"].tolist() == [False, False, False, True, True]
    assert table["support"].tolist() == ["(0, 1)", "positive", "(-10, 10)", "positive", "(0, 2)"]
    assert table["reason"].str.len().gt(0).all()
    assert table.loc[2, "reason"] == "declared"


# ------------------------------------------------------------------ random tables

FLOATS = {
    "in (0, 1)": st.floats(0, 1, exclude_min=True, exclude_max=True),
    "in [0, 1]": st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)),
    "> 0": st.floats(0, 1e6, exclude_min=True),
    ">= 0 with zeros": st.one_of(st.just(0.0), st.floats(0, 1e6)),
    "mixed sign": st.floats(-1e6, 1e6),
}
COLUMNS = [
    *(st.lists(values, min_size=4, max_size=40) for values in FLOATS.values()),
    st.lists(st.integers(0, 1000), min_size=4, max_size=40),
    st.lists(st.integers(-1000, 1000), min_size=4, max_size=40),
    st.lists(st.booleans(), min_size=4, max_size=40),
]


@settings(max_examples=300, deadline=None)
@given(values=st.one_of(COLUMNS))
def test_every_training_value_lies_strictly_inside_the_inferred_support(values):
    assume(len(set(values)) > 1)
    column = infer(values)
    numbers = np.array(values, dtype=np.float64)
    assert column.reason
    assert_inside(column, numbers)
    # and the support hugs the values: samples stay (all but) within [0, 1] or >= 0
    if column.kind == "interval" and not column.discrete:
        if numbers.max() <= 1:
            assert -MARGIN <= column.low and column.high <= 1 + MARGIN
        else:
            assert column.low == -MARGIN * numbers.max()
    if numbers.min() >= 0:
        assert column.kind != "real"
