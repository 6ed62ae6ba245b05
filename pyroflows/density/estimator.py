r"""DensityEstimator: an exact, trainable density of a table (forward KL), pandas in and out."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pyroflows._checks import (
    check_choice,
    check_non_negative_float,
    check_positive_float,
    check_positive_int,
)
from pyroflows._io import write_atomically
from pyroflows.density.latent import Blend, FlowDensity, blend_weight
from pyroflows.density.matching import COUPLINGS, MatchingObjective
from pyroflows.density.mixture import GaussianMixture
from pyroflows.density.schema import (
    Column,
    Schema,
    check_values,
    infer_schema,
    schema_from_stats,
)
from pyroflows.density.selection import choose_mixture
from pyroflows.density.streaming import ParquetRows
from pyroflows.density.tabular import EPS, TabularDensity
from pyroflows.density.training import (
    Batches,
    fit_max_likelihood,
    process_group,
    repeated,
)
from pyroflows.transforms import Flow
from pyroflows.transforms.registry import build, check_options, list_flows

FORMAT = "pyroflows.DensityEstimator/4"
#: draws of dequantisation noise the start reads, for a table with discrete columns (fewer
#: where the draws would exceed 100,000 values: the mixture search grows with them)
DRAWS = 4
#: the families that ``flow="auto"`` trains, keeping the best on the validation rows
AUTO = ("nsf", "realnvp", "maf")
#: how a density estimator's flow may compute its inverse, which scores every row
DENSITY_INVERSES = ("analytic", "integrated")
#: the training objectives: maximum likelihood (every family), flow matching (``cnf``)
OBJECTIVES = ("likelihood", "flow_matching")
#: the fewest steps an epoch of flow matching takes (rows repeated on small tables)
MATCHING_STEPS = 32
#: Parquet sources of more rows than this are streamed, not read whole
STREAM_ROWS = 100_000
#: on more training rows than this, the families race: each trains ``RACE_EPOCHS`` epochs,
#: and only the leader on the validation rows trains on
RACE_ROWS = 16_384
RACE_EPOCHS = 10
# The entries of a saved model that load needs, with their types.
ENTRIES = {
    "flow": str,
    "options": dict,
    "fit_options": dict,
    "support": (dict, type(None)),
    "auto_support": bool,
    "seed": (int, type(None)),
    "dtype": str,
    "schema": dict,
    "density": dict,
    "report": dict,
    "state": dict,
}
DENSITY_ENTRIES = {"chosen": str, "family": str, "components": int, "covariance": str}
SCHEMA_ENTRIES = {"columns": list, "source": str, "extra": dict}


class DensityEstimator:
    r"""Maximum-likelihood flow density of tabular data: ``fit``, ``log_prob``, ``sample``.

    ``fit(data)`` takes a pandas DataFrame, a 2-D numpy array or a 2-D tensor (on any device).
    Each row :math:`y` is mapped to the real line column by column (integer and boolean
    columns dequantised, positive columns through log, bounded columns through logit) and
    standardised by the training rows (:mod:`pyroflows.density.tabular`). Every map's
    log-det is counted, so :meth:`log_prob` is an exact log-density in the data's own units
    (for integer and boolean columns, of the probability of the value: the density
    integrated over the value's bin).

    The density of the standardised rows is the best, on the validation rows (``valid=`` or a
    ``validation`` fraction of ``data``), of four candidates: the Gaussian, a Gaussian
    mixture validated over its components and covariance type
    (:func:`~pyroflows.density.selection.choose_mixture`), the flow family ``flow``
    (built with ``**options``; ``"auto"`` trains each of :data:`AUTO` and keeps the best on
    the validation rows) over the Gaussian and guarded in the tails
    (:mod:`pyroflows.density.latent`), trained from the identity by minibatch Adam with a
    learning rate that halves on plateaus, gradient clipping, early stopping on the
    validation rows (``patience`` epochs without a gain of more than ``tolerance`` nats per
    row) and the best weights restored
    (:func:`~pyroflows.density.training.fit_max_likelihood`), and a blend of the flow and
    the mixture (:class:`~pyroflows.density.latent.Blend`). So the fitted model never
    scores worse than the Gaussian or the mixture on the validation rows; ``select=False``
    keeps the flow regardless. :meth:`summary` reports the four scores and the choice,
    :meth:`supports` the support of each column and why.

    Column supports: ``support={"col": "positive" | "real" | (low, high)}`` declares them;
    undeclared ones follow the data (:mod:`pyroflows.density.schema`): every value in
    ``[0, 1]`` bounded to ``(0, 1)``, every value > 0 positive, integers >= 0 positive,
    booleans in ``(0, 2)``, unless ``auto_support=False``. Rows outside a fitted support
    score ``-inf`` (density 0); samples never leave it.
    Categorical and string columns are refused with an error that names them: encode them
    as numbers or indicators first.

    :meth:`sample` returns the input's type: a DataFrame with the same columns and dtypes,
    an array, or a tensor on the fitted device. :meth:`save` writes one file, read back by
    :meth:`load` with ``torch.load(weights_only=True)`` (no pickled code).

    ``compile=True`` compiles the training step with :func:`torch.compile` (tens of seconds
    once, then faster steps; worth it for long fits).

    ``objective="likelihood"`` (the default) trains by maximum likelihood;
    ``objective="flow_matching"`` trains the one continuous flow of ``flow="cnf"`` by flow
    matching (:mod:`pyroflows.density.matching`; ``coupling="ot"`` pairs base draws and
    rows by minibatch optimal transport), with early stopping on the validation rows'
    flow-matching loss. Either way the scores are exact log-likelihoods.

    Conditional densities :math:`p(y \mid c)`: ``fit(data, context=ctx)`` with one numeric
    context row per data row (same input types) builds the family's conditional form
    (``context=`` in :func:`~pyroflows.build`; every built-in family has one) on
    standardised contexts; :meth:`log_prob`, :meth:`score` and :meth:`sample` then take the
    context of each row. The baselines are then the marginal Gaussian and mixture of
    :math:`y`.

    Families whose inverse is not one analytic pass (``planar``: numerical; ``iaf``: ``dim``
    sequential passes) are refused: scoring data needs the inverse on every step.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios, Pavlakou &
        Murray, 2017) https://arxiv.org/abs/1705.07057 (tabular benchmarks, preprocessing)

    Example:
        >>> import numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> frame = pd.DataFrame({"x": rng.normal(size=500), "n": rng.poisson(3.0, size=500)})
        >>> model = DensityEstimator("realnvp", epochs=5, progress=False, seed=0)
        >>> history = model.fit(frame)
        >>> model.log_prob(frame.head(3)).shape
        (3,)
        >>> model.sample(4).dtypes.to_dict() == frame.dtypes.to_dict()
        True
    """

    def __init__(
        self,
        flow: str = "auto",
        *,
        epochs: int = 1000,
        batch_size: int | None = None,
        lr: float = 1e-3,
        patience: int = 30,
        tolerance: float = 1e-3,
        clip: float = 5.0,
        validation: float = 0.2,
        select: bool = True,
        compile: bool = False,
        objective: str = "likelihood",
        coupling: str = "independent",
        support: dict[Any, Any] | None = None,
        auto_support: bool = True,
        seed: int | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        for family in AUTO if flow == "auto" else [flow]:
            check_options(family, options)  # an unknown family or option fails here
        check_choice("objective", objective, OBJECTIVES)
        check_choice("coupling", coupling, COUPLINGS)
        if objective == "flow_matching" and (flow != "cnf" or options.get("layers", 1) != 1):
            raise ValueError(
                "objective='flow_matching' trains one continuous flow: pass flow='cnf' "
                f"(layers=1), not flow={flow!r}" + (" with layers > 1" if flow == "cnf" else "")
            )
        self.family = flow
        self.options = options
        self.fit_options = {
            "epochs": check_positive_int("epochs", epochs),
            "batch_size": None
            if batch_size is None
            else check_positive_int("batch_size", batch_size),
            "lr": check_positive_float("lr", lr),
            "patience": check_positive_int("patience", patience),
            "tolerance": check_non_negative_float("tolerance", tolerance),
            "clip": check_positive_float("clip", clip),
            "validation": _fraction(validation),
            "select": bool(select),
            "compile": bool(compile),
            "objective": objective,
            "coupling": coupling,
        }
        self.support = support
        self.auto_support = bool(auto_support)
        self.seed = seed
        self.progress = progress
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self.model: TabularDensity | None = None
        self.schema: Schema | None = None
        self.context_columns: list[str] | None = None
        self.history: pd.DataFrame | None = None
        self.report: pd.DataFrame | None = None
        self.flow_family: str | None = None
        self.mixtures: pd.DataFrame | None = None

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        data: pd.DataFrame | np.ndarray | Tensor,
        context: Any = None,
        *,
        valid: pd.DataFrame | np.ndarray | Tensor | None = None,
        valid_context: Any = None,
    ) -> pd.DataFrame:
        """Fit to the rows of ``data`` (given each row's ``context``, if any); return the
        flow's training history (train and validation loss by epoch).

        The validation rows are ``valid`` (same columns and type as ``data``, with their
        ``valid_context`` for a conditional model) or, by default, a ``validation``
        fraction of ``data`` drawn at random. Column supports are inferred from all rows.
        Then, on the training rows: the standardisation, Gaussian mixtures with 1 to 10
        components (:func:`~pyroflows.density.selection.choose_mixture`), the flow, and
        last the choice, by validation score, of the Gaussian, the mixture, the flow or a
        blend of the last two (:attr:`report`, :meth:`summary`).
        """
        if _is_path(data):
            return self._fit_parquet(data, context, valid, valid_context)
        frame, source, device, dtype = self._as_frame(data)
        frames = [frame]
        if valid is not None:
            valid_frame = self._as_frame(valid)[0]
            if list(valid_frame.columns) != list(frame.columns):
                raise ValueError(
                    f"valid has columns {list(valid_frame.columns)}, data {list(frame.columns)}"
                )
            frames.append(valid_frame)
        self.schema = infer_schema(pd.concat(frames), source, self.support, self.auto_support)
        if source != "frame":
            self.schema.extra["dtype"] = str(data.dtype)
        self._device, self._dtype = device, dtype
        if self.seed is not None:
            torch.manual_seed(self.seed)
        self.context_columns = None
        if context is not None:
            names = self._context_frame(context, len(frame)).columns
            self.context_columns = [str(c) for c in names]
        train, valid_rows, train_context, valid_contexts = self._split(
            frame, context, valid_frame if valid is not None else None, valid_context
        )
        return self._fit_rows(train, valid_rows, train_context, valid_contexts)

    def _fit_parquet(
        self, source: Any, context: Any, valid: Any, valid_context: Any
    ) -> pd.DataFrame:
        """:meth:`fit` on Parquet files: up to :data:`STREAM_ROWS` rows read whole and
        fitted as a frame, more streamed (:mod:`~pyroflows.density.streaming`): one scan
        for the column statistics, the validation rows (a stable hash of each row's
        position picks them) and a sample of training rows for the start; then each epoch
        streams the training rows through a shuffle buffer (this process's shard under
        ``torchrun``)."""
        if context is not None or valid is not None or valid_context is not None:
            raise ValueError(
                "a Parquet source is fitted without context= or valid=: its validation rows "
                "are picked by a hash of their position; fit a DataFrame for those options"
            )
        table = ParquetRows(source)
        if table.rows <= STREAM_ROWS:  # small: read whole, fitted as a frame
            return self.fit(table.read())
        scan = table.scan(self.fit_options["validation"])
        self.schema = schema_from_stats(
            scan.stats, scan.rows, "frame", self.support, self.auto_support, table.index_name
        )
        self._device = self.device or torch.device("cpu")
        self._dtype = self.dtype or torch.float32
        if self.seed is not None:
            torch.manual_seed(self.seed)
        self.context_columns = None
        ends = [[c.minimum for c in scan.stats], [c.maximum for c in scan.stats]]
        self._to_tensor(pd.DataFrame(ends, columns=self.schema.names))  # none overflows
        valid_rows, sample = self._to_tensor(scan.valid), self._to_tensor(scan.sample)
        if len(valid_rows) == 0 or len(sample) < 2:
            raise ValueError(
                f"{scan.rows} rows are too few to stream: {len(valid_rows)} validation rows "
                f"and {len(sample)} training rows in the start sample; fit a DataFrame"
            )
        rank, world = process_group()
        batch_size = self.fit_options["batch_size"] or default_batch_size(scan.train_rows)
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is no multiple of {world} processes")
        local = batch_size // world
        steps = table.steps_per_epoch(scan, local, world)

        def epoch(number: int) -> Iterator[tuple[Tensor, None]]:
            batches = table.batches(
                number,
                local,
                steps,
                fraction=scan.fraction,
                seed=self.seed or 0,
                rank=rank,
                world=world,
            )
            for rows in batches:
                yield torch.as_tensor(rows, dtype=self._dtype).to(self._device), None

        return self._fit_rows(sample, valid_rows, None, None, stream=(epoch, scan.train_rows))

    def _fit_rows(
        self,
        train: Tensor,
        valid_rows: Tensor,
        train_context: Tensor | None,
        valid_contexts: Tensor | None,
        stream: tuple[Batches, int] | None = None,
    ) -> pd.DataFrame:
        """The rest of :meth:`fit`, on the training rows (a start sample of a ``stream``:
        its epochs' batches and its number of training rows) and the validation rows."""
        device, dtype = self._device, self._dtype
        families = list(AUTO) if self.family == "auto" else [self.family]
        for family in families:
            inverse = self._build_flow(family).inverse_method
            if inverse not in DENSITY_INVERSES:
                raise ValueError(
                    f"flow family {family!r} has a {inverse} inverse; a density estimator "
                    f"scores data with the inverse on every step, so it needs an analytic "
                    f"one-pass inverse (or an ODE solve): {', '.join(density_families())}"
                )
        dim = len(self.schema.columns)
        context_features = 0 if self.context_columns is None else len(self.context_columns)
        maps = TabularDensity(self.schema.columns, GaussianMixture(1, dim), context_features)
        maps = maps.to(device=device, dtype=dtype)
        # Discrete columns are read at uniform noise: the start (standardisation, Gaussian,
        # mixtures) sees a few draws of it, so that a mixture cannot fit one draw's lumps.
        copies = max(1, min(DRAWS, 100_000 // train.numel())) if maps.has_discrete else 1
        repeated = train.repeat(copies, 1)
        repeated_context = None if train_context is None else train_context.repeat(copies, 1)
        noise = torch.rand_like(repeated).clamp(EPS, 1 - EPS)
        maps.initialize(repeated, repeated_context, noise)
        latent = maps.latent(repeated, noise)
        started = time.perf_counter()
        search = choose_mixture(
            maps, latent, valid_rows, valid_context=valid_contexts, progress=self.progress
        )
        seconds = [0.0, time.perf_counter() - started]
        self.mixtures = pd.DataFrame(
            search.tried, columns=["components", "covariance", "ridge", "valid"]
        )
        started = time.perf_counter()
        models = {}
        for family in families:
            flow = self._build_flow(family).to(device=device, dtype=dtype)
            flow.initialize(latent, maps.scaled_context(repeated_context))
            models[family] = maps.with_density(FlowDensity(flow, search.gaussian))
        flows, raced = self._train_flows(
            models, stream or train, valid_rows, train_context, valid_contexts
        )
        seconds.append(time.perf_counter() - started)
        self.flow_family = max(flows, key=lambda family: _mean(flows[family][2]))
        model, self.history, flow_rows = flows[self.flow_family]
        mixture = maps.with_density(search.best)
        mixture_rows = _log_probs(mixture, valid_rows, valid_contexts)
        weight, blend_score = blend_weight(flow_rows, mixture_rows)  # its ends: flow, mixture
        candidates = {
            "gaussian": maps.with_density(search.gaussian),
            "mixture": mixture,
            "flow": model,
            "blend": maps.with_density(Blend(model.density, search.best, weight)),
        }
        scores = [search.gaussian_score, _mean(mixture_rows), _mean(flow_rows), blend_score]
        seconds.append(0.0)
        chosen = int(np.argmax(scores)) if self.fit_options["select"] else 2  # first of ties
        self.model = list(candidates.values())[chosen].eval()
        best = search.best
        self.report = pd.DataFrame(
            {
                "valid_nats": scores,
                "details": [
                    "full covariance",
                    f"{best.components} components, {best.covariance} covariance, "
                    f"ridge {search.best_ridge:g}",
                    ", ".join(
                        f"{family} {_mean(rows):.3f} ({len(history)} epochs"
                        f"{', raced' if family in raced else ''})"
                        for family, (_, history, rows) in flows.items()
                    )
                    + f": {self.flow_family}",
                    f"{1 - weight:.2f} flow + {weight:.2f} mixture",
                ],
                "seconds": seconds,
                "chosen": [i == chosen for i in range(len(scores))],
            },
            index=pd.Index(list(candidates), name="model"),
        )
        return self.history

    def _split(
        self, frame: pd.DataFrame, context: Any, valid: pd.DataFrame | None, valid_context: Any
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Training and validation rows, and their contexts."""
        rows = self._to_tensor(frame)
        contexts = None
        if context is not None:
            contexts = self._to_tensor(self._context_frame(context, len(frame)))
        elif valid_context is not None:
            raise ValueError("valid_context is given, but no context for the training rows")
        if valid is not None:
            if (context is None) != (valid_context is None):
                raise ValueError("a conditional fit with valid= needs valid_context= too")
            valid_rows = self._to_tensor(valid)
            valid_contexts = None
            if valid_context is not None:
                valid_contexts = self._to_tensor(self._context_frame(valid_context, len(valid)))
            train, train_context = rows, contexts
        else:
            order = torch.randperm(len(rows), device=rows.device)
            n_valid = max(1, round(self.fit_options["validation"] * len(rows)))
            if len(rows) - n_valid < 2:
                raise ValueError(f"too few rows ({len(rows)}) for a validation split of {n_valid}")
            valid_rows, train = rows[order[:n_valid]], rows[order[n_valid:]]
            valid_contexts = train_context = None
            if contexts is not None:
                train_context, valid_contexts = (
                    contexts[order[n_valid:]],
                    contexts[order[:n_valid]],
                )
        return train, valid_rows, train_context, valid_contexts

    def _train_flows(
        self,
        models: dict[str, TabularDensity],
        train: Tensor | tuple[Batches, int],
        valid: Tensor,
        train_context: Tensor | None,
        valid_context: Tensor | None,
    ) -> tuple[dict[str, tuple[TabularDensity, pd.DataFrame, Tensor]], set[str]]:
        """Train each family's model; return ``{family: (model, history, validation
        log-densities)}`` and the families the race stopped.

        On more than :data:`RACE_ROWS` training rows several families race: each trains
        :data:`RACE_EPOCHS` epochs, and only the one that scores best on the validation rows
        trains on (from its best weights, with a fresh optimiser) until it stops.
        """
        streamed = isinstance(train, tuple)  # (epoch -> batches, training rows)
        count = train[1] if streamed else len(train)
        options = self._training_options(count)
        race = len(models) > 1 and count > RACE_ROWS and options["epochs"] > RACE_EPOCHS

        matching = self.fit_options["objective"] == "flow_matching"
        rows, contexts = (train[0], None) if streamed else (train, train_context)
        if matching and not streamed:
            # Each step draws fresh base points and times, so an epoch may see a row more
            # than once: at least MATCHING_STEPS steps an epoch, whatever the table's size.
            least = MATCHING_STEPS * options["batch_size"]
            rows, contexts = repeated(train, train_context, least)

        def train_for(family: str, epochs: int, done: int = 0) -> pd.DataFrame:
            objective = None
            if matching:
                objective = MatchingObjective(models[family], self.fit_options["coupling"])
            history = fit_max_likelihood(
                models[family],
                rows,
                valid,
                progress=self.progress,
                description=f"fit {family}" + (" (race)" if race and not done else ""),
                train_context=contexts,
                valid_context=valid_context,
                objective=objective,
                **{**options, "epochs": epochs},
            )
            return history.assign(epoch=history["epoch"] + done)

        histories = {
            family: train_for(family, RACE_EPOCHS if race else options["epochs"])
            for family in models
        }
        scores = {family: _log_probs(models[family], valid, valid_context) for family in models}
        raced = set()
        if race:
            leader = max(scores, key=lambda family: _mean(scores[family]))
            rest = train_for(leader, options["epochs"] - RACE_EPOCHS, RACE_EPOCHS)
            histories[leader] = pd.concat([histories[leader], rest], ignore_index=True)
            scores[leader] = _log_probs(models[leader], valid, valid_context)
            raced = set(models) - {leader}
        flows = {family: (models[family], histories[family], scores[family]) for family in models}
        return flows, raced

    def _build_flow(self, family: str) -> Flow:
        options = dict(self.options)
        if self.context_columns is not None:
            options["context"] = len(self.context_columns)
        return build(family, len(self.schema.columns), **options)

    def _training_options(self, rows: int) -> dict[str, Any]:
        """The options of :func:`~pyroflows.density.training.fit_max_likelihood`."""
        skip = ("validation", "select", "objective", "coupling")
        options = {k: v for k, v in self.fit_options.items() if k not in skip}
        options["batch_size"] = options["batch_size"] or default_batch_size(rows)
        return options

    # ------------------------------------------------------------------ scoring

    def log_prob(
        self, data: pd.DataFrame | np.ndarray | Tensor, context: Any = None
    ) -> pd.Series | np.ndarray | Tensor:
        """Log-density of each row in nats, in the data's own units (``-inf`` outside support),
        given each row's ``context`` for a conditional model.

        Returns a Series on the input's index for a DataFrame, an array for an array, and a
        tensor on the fitted device for a tensor.
        """
        model = self._fitted()[0]
        frame = self._checked(data)
        rows = self._to_tensor(frame)
        contexts = self._checked_context(context, len(frame))
        values = _log_probs(model, rows, contexts)
        if isinstance(data, Tensor):
            return values
        if isinstance(data, pd.DataFrame):
            return pd.Series(values.cpu().double().numpy(), index=data.index, name="log_prob")
        return values.cpu().double().numpy()

    def score(self, data: pd.DataFrame | np.ndarray | Tensor, context: Any = None) -> float:
        """Mean log-density of the rows of ``data`` (given ``context``), in nats per row."""
        values = self.log_prob(data, context)
        return float(values.mean()) if not isinstance(values, Tensor) else values.mean().item()

    def sample(self, n: int, context: Any = None) -> pd.DataFrame | np.ndarray | Tensor:
        """``n`` new rows, in the type (and columns, dtypes, device) of the fitted data.

        A conditional model takes ``context``: ``n`` rows (row ``i`` drawn given context row
        ``i``) or one row (all ``n`` drawn given it).
        """
        model, schema = self._fitted()
        check_positive_int("n", n)
        contexts = self._checked_context(context, None)
        if contexts is not None:
            if len(contexts) not in (1, n):
                raise ValueError(f"context has {len(contexts)} rows; give 1 or n = {n}")
            contexts = contexts.expand(n, -1)
        model.eval()
        rows = model.sample(n, contexts)
        if schema.source == "tensor":
            dtype = _torch_dtype(schema.extra["dtype"])
            return rows if dtype.is_floating_point else rows.round().to(dtype)
        frame = pd.DataFrame(rows.cpu().double().numpy(), columns=schema.names)
        for column in schema.columns:
            frame[column.name] = _restore(frame[column.name], column)
        if schema.source == "array":
            return frame.to_numpy().astype(schema.extra["dtype"])
        return frame

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the fitted model (weights, preprocessing, options) to one file.

        The file is written whole or not at all: into a temporary file in the same folder,
        which is then renamed over ``path`` (:func:`os.replace`), so a write that fails
        partway (a full disk) leaves whatever was at ``path`` as it was. An existing ``path``
        is refused with a ``FileExistsError`` unless ``overwrite=True``; a missing or
        read-only folder raises before anything is written. :meth:`load` reads the file back.

        Example:
            >>> import tempfile
            >>> from pathlib import Path
            >>> frame = pd.DataFrame({"x": np.random.default_rng(0).normal(size=100)})
            >>> model = DensityEstimator("nice", epochs=2, progress=False, seed=0)
            >>> history = model.fit(frame)
            >>> path = Path(tempfile.mkdtemp()) / "model.pt"
            >>> model.save(path)
            >>> model.save(path)
            Traceback (most recent call last):
            ...
            FileExistsError: '...model.pt' already exists; pass overwrite=True to replace it
            >>> model.save(path, overwrite=True)
            >>> DensityEstimator.load(path).score(frame) == model.score(frame)
            True
        """
        model, schema = self._fitted()
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        damaged = _non_finite(state)
        if damaged is not None:
            raise ValueError(
                f"not saving {os.fspath(path)!r}: the model's parameter {damaged!r} has NaN or "
                "inf values, so the model cannot score data; refit it"
            )
        saved = {
            "format": FORMAT,
            "flow": self.family,
            "options": _plain(self.options),
            "fit_options": self.fit_options,
            "support": _plain(self.support),
            "auto_support": self.auto_support,
            "seed": self.seed,
            "dtype": str(self._dtype).removeprefix("torch."),
            "schema": {
                "columns": [c.to_dict() for c in schema.columns],
                "source": schema.source,
                "extra": _plain(schema.extra),
            },
            "context_columns": self.context_columns,
            "density": self._density_spec(),
            "report": _plain(self.report.reset_index().to_dict(orient="list")),
            "state": state,
        }
        write_atomically(path, lambda temporary: torch.save(saved, temporary), overwrite=overwrite)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str | None = None
    ) -> DensityEstimator:
        """Read a model written by :meth:`save` onto ``device`` (default: the CPU).

        Safe: the file is read with ``torch.load(weights_only=True)``, so a file whose
        unpickling would run code is refused, and that code never runs. Strict: a file that
        is not a whole, sound model (not a pyroflows model, an entry missing or of the wrong
        type, weights that do not fit the saved layout, NaN or inf weights) raises a
        ``ValueError`` that names the file and what is wrong, instead of giving a model
        that scores NaN.
        """
        name = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model file at {name!r}")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{name!r} is not a pyroflows model file: {error}") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"{name!r} is not a {FORMAT} file")
        _check_entries(saved, ENTRIES, name, "")
        _check_entries(saved["schema"], SCHEMA_ENTRIES, name, "schema.")
        _check_entries(saved["density"], DENSITY_ENTRIES, name, "density.")
        state = saved["state"]
        damaged = _non_finite(state)
        if damaged is not None:
            raise ValueError(
                f"{name!r} holds a damaged model: its parameter {damaged!r} has NaN or inf "
                "values, so it cannot score data; refit and save it again"
            )
        try:
            estimator = cls(
                saved["flow"],
                support=saved["support"],
                auto_support=saved["auto_support"],
                seed=saved["seed"],
                progress=False,
                **saved["fit_options"],
                **saved["options"],
            )
            columns = [Column(**c) for c in saved["schema"]["columns"]]
            estimator.schema = Schema(
                columns, saved["schema"]["source"], extra=saved["schema"]["extra"]
            )
            estimator._dtype = _torch_dtype(saved["dtype"])
            estimator._device = torch.device("cpu" if device is None else device)
            estimator.context_columns = saved.get("context_columns")
            estimator.model = estimator._structure(saved["density"])
            estimator.flow_family = saved["density"]["family"]
            estimator.model.load_state_dict(state)
            estimator.report = pd.DataFrame(saved["report"]).set_index("model")
        except (TypeError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"{name!r} is a damaged {FORMAT} file: {error}") from error
        estimator.model.eval()
        return estimator

    # ------------------------------------------------------------------ helpers

    def _density_spec(self) -> dict[str, Any]:
        """What :meth:`_structure` needs to rebuild the fitted model's modules."""
        density = self._fitted()[0].density
        chosen = self.report.index[self.report["chosen"]][0]
        mixture = {"flow": "base", "blend": "mixture"}.get(chosen)
        mixture = density if mixture is None else getattr(density, mixture)
        return {
            "chosen": chosen,
            "family": self.flow_family,
            "components": mixture.components,
            "covariance": mixture.covariance,
        }

    def _structure(self, spec: dict[str, Any]) -> TabularDensity:
        """The fitted model's modules (weights unset) from :meth:`_density_spec`'s spec."""
        dim = len(self.schema.columns)
        mixture = GaussianMixture(spec["components"], dim, spec["covariance"])
        flow = self._build_flow(spec["family"])
        densities = {
            "gaussian": lambda: mixture,
            "mixture": lambda: mixture,
            "flow": lambda: FlowDensity(flow, mixture),
            "blend": lambda: Blend(FlowDensity(flow, GaussianMixture(1, dim)), mixture, 0.5),
        }
        if spec["chosen"] not in densities:
            raise ValueError(f"unknown density {spec['chosen']!r}")
        model = TabularDensity(
            self.schema.columns, densities[spec["chosen"]](), flow.context_features
        )
        return model.to(device=self._device, dtype=self._dtype)

    def summary(self) -> pd.DataFrame:
        """How the fit did on the validation rows: one row per candidate (the Gaussian, the
        validated mixture, the flow) with its mean log-likelihood (``valid_nats``, nats per
        row in the data's units), its gain over the Gaussian, what it is, the seconds its
        fit took (the mixture's: the whole search), and which one the estimator chose (and
        now is). The supports chosen for the columns are
        :meth:`supports`.

        Example:
            >>> rng = np.random.default_rng(0)
            >>> x = rng.normal(size=400)
            >>> frame = pd.DataFrame({"x": x, "y": x**2 + 0.1 * rng.normal(size=400)})
            >>> model = DensityEstimator(epochs=3, progress=False, seed=0)
            >>> _ = model.fit(frame)
            >>> model.summary().columns.tolist()
            ['valid_nats', 'gain_over_gaussian', 'details', 'seconds', 'chosen']
            >>> model.summary().index.tolist()
            ['gaussian', 'mixture', 'flow', 'blend']
        """
        if self.report is None:
            raise RuntimeError("this DensityEstimator is not fitted yet: call fit(data) first")
        report = self.report.copy()
        report.insert(
            1, "gain_over_gaussian", report["valid_nats"] - report.loc["gaussian", "valid_nats"]
        )
        return report

    def supports(self) -> pd.DataFrame:
        """The support inferred or declared for each column, and why
        (:meth:`~pyroflows.density.schema.Schema.table`)."""
        return self._fitted()[1].table()

    @property
    def columns(self) -> list[str]:
        """The fitted column names, in order."""
        return self._fitted()[1].names

    def _fitted(self) -> tuple[TabularDensity, Schema]:
        if self.model is None or self.schema is None:
            raise RuntimeError("this DensityEstimator is not fitted yet: call fit(data) first")
        return self.model, self.schema

    def _as_frame(self, data: Any) -> tuple[pd.DataFrame, str, torch.device, torch.dtype]:
        """The data as a DataFrame, with where it came from and the device/dtype to fit on."""
        if isinstance(data, pd.DataFrame):
            frame, source = data, "frame"
            device, dtype = self.device or torch.device("cpu"), self.dtype or torch.float32
        elif isinstance(data, np.ndarray):
            frame, source = _array_frame(data, "data"), "array"
            device, dtype = self.device or torch.device("cpu"), self.dtype or torch.float32
        elif isinstance(data, Tensor):
            frame, source = _array_frame(data.detach().cpu().numpy(), "data"), "tensor"
            device = self.device or data.device
            dtype = self.dtype or (data.dtype if data.is_floating_point() else torch.float32)
        else:
            raise TypeError(
                f"data must be a pandas DataFrame, a numpy array or a torch tensor, "
                f"got {type(data).__name__}"
            )
        return frame, source, device, dtype

    def _checked(self, data: Any) -> pd.DataFrame:
        """Input at scoring time, checked against the fitted columns."""
        schema = self._fitted()[1]
        frame = self._as_frame(data)[0]
        if isinstance(data, pd.DataFrame):
            missing = [c for c in schema.names if c not in frame.columns]
            extra = [c for c in frame.columns if c not in schema.names]
            if missing or extra:
                raise ValueError(
                    f"the data's columns differ from the fitted ones: missing {missing}, "
                    f"unexpected {extra}"
                )
            if list(frame.columns) != schema.names:
                raise ValueError(
                    f"the data's columns are in another order than at fit ({schema.names}); "
                    "reorder them, e.g. data[estimator.columns]"
                )
        elif frame.shape[1] != len(schema.names):
            raise ValueError(
                f"the data has {frame.shape[1]} columns, the model {len(schema.names)}"
            )
        check_values(frame)
        return frame

    def _context_frame(self, context: Any, n_rows: int | None) -> pd.DataFrame:
        """A context table, checked: numeric, finite (in the model's dtype too), one row per
        data row."""
        if isinstance(context, pd.DataFrame):
            frame = context
        elif isinstance(context, (np.ndarray, Tensor)):
            values = context.detach().cpu().numpy() if isinstance(context, Tensor) else context
            frame = _array_frame(values, "context")
        else:
            raise TypeError(
                f"context must be a pandas DataFrame, a numpy array or a torch tensor, "
                f"got {type(context).__name__}"
            )
        if n_rows is not None and len(frame) != n_rows:
            raise ValueError(f"context has {len(frame)} rows, the data {n_rows}")
        check_values(frame)
        _cast(frame, self._dtype, "context column")
        return frame

    def _checked_context(self, context: Any, n_rows: int | None) -> Tensor | None:
        """The context at scoring or sampling time, checked against the fitted one."""
        if self.context_columns is None:
            if context is not None:
                raise ValueError("this model was fitted without context; pass none")
            return None
        if context is None:
            raise ValueError(
                f"this model is conditional on {self.context_columns}: pass context=..."
            )
        frame = self._context_frame(context, n_rows)
        names = [str(c) for c in frame.columns]
        if isinstance(context, pd.DataFrame) and names != self.context_columns:
            raise ValueError(
                f"the context's columns {names} differ from the fitted ones {self.context_columns}"
            )
        if frame.shape[1] != len(self.context_columns):
            raise ValueError(
                f"the context has {frame.shape[1]} columns, the model {len(self.context_columns)}"
            )
        return self._to_tensor(frame)

    def _to_tensor(self, frame: pd.DataFrame, what: str = "column") -> Tensor:
        """The (checked) table as a tensor in the model's dtype, on its device.

        Values finite in float64 can overflow a smaller dtype (``1e39`` is ``inf`` in
        float32); those are refused here, naming the column (a ``what``) and the dtype.
        """
        return _cast(frame, self._dtype, what).to(self._device)

    def __repr__(self) -> str:
        head = f"DensityEstimator(flow={self.family!r}"
        if self.report is None:
            return head + ", not fitted)"
        scores = ", ".join(
            f"{name} {row.valid_nats:.3f}{' (chosen)' if row.chosen else ''}"
            for name, row in self.report.iterrows()
        )
        return (
            f"{head}, fitted on {len(self.schema.columns)} columns; validation nats per row: "
            f"{scores})"
        )


def default_batch_size(rows: int) -> int:
    """The minibatch size for ``rows`` training rows when none is given: 256 up to 16,384
    rows (64 steps an epoch or fewer), then the power of two nearest to ``rows / 64``, up to
    2,048, so that an epoch of a large table takes about 64 steps, not hundreds.

    Example:
        >>> default_batch_size(455), default_batch_size(80_000), default_batch_size(10**7)
        (256, 1024, 2048)
    """
    if rows <= 16_384:
        return 256
    return min(2048, 2 ** round(math.log2(rows / 64)))


def density_families() -> list[str]:
    """The registered families a density estimator takes: those whose inverse (the density
    direction) is one analytic pass, or an ODE solve (``cnf``).

    Example:
        >>> "realnvp" in density_families(), "cnf" in density_families()
        (True, True)
        >>> "planar" in density_families()  # its inverse is a root search
        False
    """
    return [name for name in list_flows() if build(name, 2).inverse_method in DENSITY_INVERSES]


@torch.no_grad()
def _log_probs(model: TabularDensity, rows: Tensor, context: Tensor | None) -> Tensor:
    """``model.log_prob`` of each row (given its context) in eval mode, in chunks."""
    model.eval()
    if context is None:
        return torch.cat([model.log_prob(chunk) for chunk in rows.split(65536)])
    pairs = zip(rows.split(65536), context.split(65536), strict=True)
    return torch.cat([model.log_prob(chunk, c) for chunk, c in pairs])


def _mean(values: Tensor) -> float:
    """The mean of ``values`` as a float, ``-inf`` where it is not finite."""
    mean = values.double().mean().item()
    return mean if math.isfinite(mean) else -math.inf


def _is_path(data: Any) -> bool:
    """Whether ``data`` names Parquet files: a path, or a non-empty list of paths."""
    if isinstance(data, (str, os.PathLike)):
        return True
    return isinstance(data, (list, tuple)) and bool(data) and all(map(_is_path, data))


def _array_frame(values: np.ndarray, name: str) -> pd.DataFrame:
    if values.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x columns), got shape {values.shape}")
    return pd.DataFrame(values)


def _restore(values: pd.Series, column: Column) -> pd.Series:
    if column.dtype.startswith("bool"):
        return values.round().clip(0, 1).astype(column.dtype)
    if column.discrete:
        return values.round().astype(column.dtype)
    return values.astype(column.dtype)


def _fraction(value: Any) -> float:
    value = check_positive_float("validation", value)
    if value >= 1:
        raise ValueError(f"validation must be a fraction in (0, 1), got {value!r}")
    return value


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, for a weights-only save."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cast(frame: pd.DataFrame, dtype: torch.dtype, what: str) -> Tensor:
    """``frame`` as a CPU tensor of ``dtype``, refusing values that overflow it (naming the
    first such ``what``, e.g. column, with a row and the dtype)."""
    values = frame.to_numpy(dtype=np.float64)
    tensor = torch.tensor(values, dtype=dtype)
    bad = ~torch.isfinite(tensor)
    if bad.any():
        column = int(bad.any(0).nonzero()[0, 0])
        rows = bad[:, column].nonzero()[:, 0]
        row = int(rows[0])
        kind = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"{what} {frame.columns[column]!r} has values too large for {kind}, the model's "
            f"dtype ({len(rows)} of them, e.g. {float(values[row, column])!r} at row "
            f"{frame.index[[row]].tolist()[0]!r}: inf in {kind}); rescale the column, or fit with "
            "dtype=torch.float64"
        )
    return tensor


def _non_finite(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state`` with a NaN or inf, if any."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                return key
    return None


def _check_entries(saved: dict[str, Any], entries: dict[str, Any], name: str, prefix: str) -> None:
    """Refuse a saved model without one of ``entries`` or with one of the wrong type."""
    for key, kind in entries.items():
        if key not in saved:
            raise ValueError(
                f"{name!r} is not a complete {FORMAT} file: it has no {prefix + key!r} entry"
            )
        if not isinstance(saved[key], kind):
            raise ValueError(
                f"{name!r} is a damaged {FORMAT} file: its {prefix + key!r} entry is a "
                f"{type(saved[key]).__name__}"
            )
