r"""Tabular data to the real line and back: the preprocessing of a density estimator.

A table's row :math:`y` is mapped to :math:`u = W(s(y))` with

* :math:`s`, column by column: integer and boolean columns are dequantised (the row's value
  :math:`k` becomes :math:`k + \epsilon`, :math:`\epsilon \sim U(0, 1)`); positive columns
  go through :math:`\log`; columns bounded in :math:`(a, b)` through
  :math:`\mathrm{logit}((y - a) / (b - a))`; real columns stay as they are;
* :math:`W`, a whitening by the Gaussian fitted to the training rows:
  :math:`W(x) = L^{-1}(x - \mu)` with :math:`LL^\top` their covariance.

Both are bijections with exact log-dets, so the density of :math:`y` in its own units is
:math:`\log p(y) = \log q(u) + \log|\det J_W| + \sum_i \log|s_i'(y_i)|`, where :math:`q` is
the flow's density. A flow that starts at the identity therefore starts as the Gaussian
fitted to the (transformed) data. Training reads each discrete value at fresh noise, whose
expectation bounds :math:`\log P(Y = k)` from below (Theis et al. 2016); scoring
integrates the density over the value's bin,
:math:`P(Y = k) = \int_{[0,1)^D} p(k + \epsilon)\, d\epsilon`, by :data:`QUADRATURE`
points of a fixed Latin hypercube (:func:`bin_points`): each discrete column by the
composite midpoint rule, so a lone discrete column's probabilities sum to one.

References:
    RNADE: The real-valued neural autoregressive density-estimator (Uria, Murray &
    Larochelle, 2013) https://arxiv.org/abs/1306.0186 (uniform dequantisation)

    A note on the evaluation of generative models (Theis, van den Oord & Bethge, 2016)
    https://arxiv.org/abs/1511.01844 (the dequantisation bound)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from pyroflows.distributions import FlowDistribution

KINDS = ("real", "positive", "interval")
# Dequantisation noise is drawn from [EPS, 1 - EPS] so that a dequantised 0 stays > 0.
EPS = 1e-6
#: points per bin when a discrete value is scored (the log of its bin's probability)
QUADRATURE = 8


@dataclass
class Column:
    """How one column is modelled.

    ``kind`` is ``"real"``, ``"positive"`` or ``"interval"`` (with ``low``, ``high``), the
    support of the column after dequantisation; ``discrete`` columns (integers, booleans)
    are dequantised; ``dtype`` is the column's original dtype, restored on sampling.
    """

    name: str
    dtype: str
    kind: str = "real"
    discrete: bool = False
    low: float = -math.inf
    high: float = math.inf

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


def infer_schema(
    frame: pd.DataFrame, source: str, support: dict[Any, Any] | None, auto_support: bool
) -> Schema:
    """Validate a table and decide each column's kind.

    Declared ``support`` entries (``"real"``, ``"positive"`` or a ``(low, high)`` pair) win;
    otherwise, with ``auto_support``, an integer column whose values are all >= 0 (a count:
    dequantisation moves it above 0) is positive, and a float column whose values are all
    > 0 is positive, i.e. modelled in log space, when the log makes it less skewed (a
    right-skewed measurement, not values piled up near 0); booleans live in ``(0, 2)``
    after dequantisation.
    """
    support = dict(support or {})
    unknown = [key for key in support if key not in frame.columns]
    if unknown:
        raise ValueError(f"support names columns that are not in the data: {unknown}")
    check_values(frame)
    if len(frame) < 4:
        raise ValueError(
            f"a density estimator needs at least 4 rows to fit and validate, got {len(frame)}"
        )
    columns = []
    for name in frame.columns:
        values = frame[name]
        dtype = str(values.dtype)
        is_bool = pd.api.types.is_bool_dtype(values)
        discrete = is_bool or pd.api.types.is_integer_dtype(values)
        numbers = values.to_numpy(dtype=np.float64)
        if numbers.min() == numbers.max():
            raise ValueError(
                f"column {name!r} is constant (every value is {numbers[0]!r}): its density is "
                "a point mass, which no flow can model; drop the column"
            )
        column = Column(name=name, dtype=dtype, discrete=discrete)
        declared = support.get(name)
        if declared is not None:
            _declare(column, declared, numbers)
        elif is_bool:
            column.kind, column.low, column.high = "interval", 0.0, 2.0
        elif auto_support and (numbers.min() >= 0 if discrete else _log_is_better(numbers)):
            column.kind = "positive"
        columns.append(column)
    return Schema(columns, source, frame.index.name)


def _declare(column: Column, declared: Any, numbers: np.ndarray) -> None:
    name = column.name
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
    top = numbers.max() + (1 if column.discrete else 0)
    if column.kind == "positive" and numbers.min() < (0 if column.discrete else 1e-300):
        raise ValueError(f"column {name!r} is declared positive but has values <= 0")
    if column.kind == "interval" and (numbers.min() < column.low or top > column.high):
        raise ValueError(
            f"column {name!r} is declared in ({column.low}, {column.high}) but its values "
            f"span [{numbers.min()}, {numbers.max()}]"
            + (" (dequantised up to max + 1)" if column.discrete else "")
        )


def _log_is_better(values: np.ndarray) -> bool:
    """Whether ``values`` are all positive and their log is less skewed than they are."""
    if values.min() <= 0:
        return False
    return abs(_skewness(np.log(values))) < abs(_skewness(values))


def _skewness(values: np.ndarray) -> float:
    centred = values - values.mean()
    return float((centred**3).mean() / max((centred**2).mean(), 1e-300) ** 1.5)


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


class TabularDensity(nn.Module):
    r"""The density of table rows: column transforms, whitening, and a flow (see module doc).

    ``log_prob(rows)`` takes raw rows (a tensor in the table's column order) and returns
    :math:`\log p(y)` per row in the data's units; in training mode discrete columns are
    dequantised with fresh uniform noise, otherwise integrated over their bins.
    ``sample(n)`` returns raw rows, discrete columns decoded back to integers. With a
    conditional flow (``flow.context_features > 0``) both take a ``context`` of one row per
    data row, standardised by :meth:`set_context_scaling`, and the density is
    :math:`\log p(y \mid c)`.
    """

    def __init__(
        self, columns: list[Column], distribution: FlowDistribution, mean: Tensor, chol: Tensor
    ):
        super().__init__()
        self.distribution = distribution
        self.flow = distribution.transform  # the trained module
        self.context_features = self.flow.context_features
        self.register_buffer("context_mean", torch.zeros(self.context_features))
        self.register_buffer("context_scale", torch.ones(self.context_features))
        kinds = [c.kind for c in columns]
        self._has_discrete = any(c.discrete for c in columns)
        self.register_buffer("discrete", torch.tensor([c.discrete for c in columns]))
        self.register_buffer("lattice", bin_points(len(columns)), persistent=False)
        self.register_buffer("positive", torch.tensor([k == "positive" for k in kinds]))
        self.register_buffer("interval", torch.tensor([k == "interval" for k in kinds]))
        self.register_buffer(
            "low",
            torch.tensor([c.low if k == "interval" else 0.0 for c, k in zip(columns, kinds)]),
        )
        self.register_buffer(
            "high",
            torch.tensor([c.high if k == "interval" else 1.0 for c, k in zip(columns, kinds)]),
        )
        self.register_buffer("mean", mean)
        self.register_buffer("chol", chol)
        self.register_buffer("chol_inverse", torch.empty_like(chol))
        self.set_whitening(mean, chol)

    @torch.no_grad()
    def set_whitening(self, mean: Tensor, chol: Tensor) -> None:
        """Whiten by the Gaussian with this mean and lower Cholesky factor of its covariance."""
        self.mean.copy_(mean)
        self.chol.copy_(chol)
        eye = torch.eye(len(chol), dtype=chol.dtype, device=chol.device)
        self.chol_inverse.copy_(torch.linalg.solve_triangular(chol, eye, upper=False))

    @torch.no_grad()
    def initialize(self, rows: Tensor, context: Tensor | None = None) -> None:
        """Start from the training ``rows`` (and their ``context``): whiten by the Gaussian
        fitted to them (dequantised at the midpoint), standardise the contexts, then start
        the flow from the whitened rows (:meth:`~pyroflows.transforms.Flow.initialize`).

        The only data-dependent start; :meth:`~pyroflows.DensityEstimator.fit` calls it.
        """
        midpoints = self.dequantise(rows, 0.5)
        self.set_whitening(*gaussian_moments(self.to_real(midpoints)[0]))
        if context is not None:
            scale = context.std(0)
            self.set_context_scaling(context.mean(0), torch.where(scale > 0, scale, 1.0))
        u = self.whiten(self.to_real(midpoints)[0])[0]
        self.flow.initialize(u, self._scaled(context))

    @torch.no_grad()
    def set_context_scaling(self, mean: Tensor, scale: Tensor) -> None:
        """Standardise contexts as ``(c - mean) / scale``."""
        self.context_mean.copy_(mean)
        self.context_scale.copy_(scale)

    def _scaled(self, context: Tensor | None) -> Tensor | None:
        if not self.context_features:
            if context is not None:
                raise ValueError("this model is not conditional: it takes no context")
            return None
        if context is None:
            raise ValueError("this model is conditional: pass the context of each row")
        return (context - self.context_mean) / self.context_scale

    def dequantise(self, y: Tensor, noise: Tensor | float) -> Tensor:
        """``y`` with ``noise`` (in ``[0, 1)``) added to its discrete columns."""
        return torch.where(self.discrete, y + noise, y) if self._has_discrete else y

    def to_real(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Map each (dequantised) column to the real line; return it with log|det|.

        Rows outside a column's support get log|det| = -inf (density 0).
        """
        width = self.high - self.low
        outside = (self.positive & (y <= 0)) | (
            self.interval & ((y <= self.low) | (y >= self.high))
        )
        # Each map is evaluated on safe values only, so no inf or NaN arises anywhere.
        log_y = torch.where(self.positive & ~outside, y, torch.ones_like(y)).log()
        unit = torch.where(
            self.interval & ~outside, (y - self.low) / width, torch.full_like(y, 0.5)
        )
        x = torch.where(self.positive, log_y, torch.where(self.interval, torch.logit(unit), y))
        log_det = torch.where(
            self.positive,
            -log_y,
            torch.where(
                self.interval, -(unit * (1 - unit)).log() - width.log(), torch.zeros_like(y)
            ),
        )
        log_det = torch.where(outside.any(-1), -math.inf, log_det.sum(-1))
        return x, log_det

    def from_real(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`to_real`, with discrete columns rounded back."""
        y = torch.where(
            self.positive,
            x.exp(),
            torch.where(self.interval, self.low + (self.high - self.low) * torch.sigmoid(x), x),
        )
        return torch.where(self.discrete, torch.ceil(y) - 1, y)

    def whiten(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`L^{-1}(x - \\mu)` and its log|det|."""
        u = (x - self.mean) @ self.chol_inverse.T
        return u, -self.chol.diagonal().log().sum().expand(x.shape[:-1])

    def log_prob(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        r""":math:`\log p(y)` of raw rows (module doc); for discrete columns, in training
        mode at fresh uniform noise (the dequantisation bound), otherwise the log of the
        bin's probability, integrated over :func:`bin_points` (:data:`QUADRATURE` points)."""
        context = self._scaled(context)
        if not self._has_discrete:
            return self._log_density(y, context)
        if self.training:
            noise = torch.rand_like(y).clamp(EPS, 1 - EPS)
            return self._log_density(self.dequantise(y, noise), context)
        points = self.lattice.unsqueeze(-2)  # (M, 1, columns): one pass for all
        values = self._log_density(self.dequantise(y, points), context)
        return torch.logsumexp(values, 0) - math.log(len(points))

    def _log_density(self, y: Tensor, context: Tensor | None) -> Tensor:
        x, log_det_columns = self.to_real(y)
        u, log_det_whiten = self.whiten(x)
        if context is None:
            log_q = self.distribution.log_prob(u)
        else:
            z, log_det_flow = self.flow.inverse_and_log_det(u, context=context)
            log_q = self.distribution.base.log_prob(z) + log_det_flow
        return log_q + log_det_whiten + log_det_columns

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        context = self._scaled(context)
        if context is None:
            u = self.distribution.sample((n,))
        else:
            z = self.distribution.base.sample((n,))
            u = self.flow.forward_and_log_det(z, context=context)[0]
        x = self.mean + (self.chol @ u.unsqueeze(-1)).squeeze(-1)
        return self.from_real(x)


def bin_points(dim: int, points: int = QUADRATURE) -> Tensor:
    r"""A fixed Latin hypercube of ``points`` points in :math:`[0, 1)^{dim}`, shape
    ``(points, dim)``: each coordinate is a permutation of the midpoints
    :math:`(j + \tfrac12) / M`, so each discrete column's bin is integrated by the composite
    midpoint rule, and the permutations (seeded, the same on every call) spread the points
    over the joint bin.

    Example:
        >>> sorted(bin_points(2, 4)[:, 1].tolist())
        [0.125, 0.375, 0.625, 0.875]
    """
    generator = torch.Generator().manual_seed(0)
    midpoints = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    columns = [midpoints[torch.randperm(points, generator=generator)] for _ in range(dim)]
    return torch.stack(columns, -1) if columns else torch.zeros(points, 0, dtype=torch.float64)


def gaussian_moments(x: Tensor, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Mean and Cholesky factor of the covariance of rows ``x`` (computed in float64).

    A ridge of ``ridge`` times the mean variance on the diagonal keeps collinear columns
    invertible.
    """
    x64 = x.double()
    mean = x64.mean(0)
    cov = torch.cov(x64.T, correction=1).reshape(x.shape[1], x.shape[1])
    cov = cov + ridge * cov.diagonal().mean() * torch.eye(
        x.shape[1], dtype=torch.float64, device=x.device
    )
    return mean.to(x.dtype), torch.linalg.cholesky(cov).to(x.dtype)
