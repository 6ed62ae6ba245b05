"""The ``pyroflows`` console script (also ``python -m pyroflows``).

pyroflows fit DATA.csv --flow realnvp --out model.pt [--force]
pyroflows sample model.pt -n 1000 --out samples.csv [--force]
pyroflows score model.pt DATA.csv --out scores.csv [--force]
pyroflows demo

Nothing is lost: ``--out`` is checked before any work (its folder exists and is writable,
its suffix is known: ``.pt``/``.pth`` for a model, ``.csv``/``.parquet``/``.pq`` for a
table), an existing file is replaced only with ``--force``, an input file never (not even
with ``--force``), and every file is written to a temporary file beside it and renamed into
place, so a write that fails partway leaves the old file as it was. Errors are one line on
stderr with exit status 1. Parquet needs pyarrow (``pip install 'pyroflows[parquet]'``), the
demo scikit-learn and matplotlib (``pip install 'pyroflows[demo]'``).
"""

from __future__ import annotations

import argparse
import ast
import atexit
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pyroflows._io import check_destination, import_extra, write_atomically
from pyroflows.density.estimator import OBJECTIVES, DensityEstimator, density_families
from pyroflows.density.matching import COUPLINGS
from pyroflows.density.streaming import ParquetRows

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MODEL_SUFFIXES = (".pt", ".pth")


def read_table(path: str) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame, with errors that name the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path!r}")
    kind = _table_kind(path)
    if kind == "parquet":
        _pyarrow("reading Parquet")
    try:
        if kind == "parquet":
            return pd.read_parquet(file, engine="pyarrow")
        return pd.read_csv(file)
    except Exception as error:  # pandas and pyarrow raise many types for unreadable files
        raise ValueError(f"could not read {path!r} as {kind}: {error}") from None


def write_table(frame: pd.DataFrame, path: str | None, *, overwrite: bool = False) -> None:
    """Write ``frame`` to a CSV or Parquet file by suffix, or as CSV to stdout.

    The file is written whole or not at all (:func:`pyroflows._io.write_atomically`); an
    existing file is refused with a ``FileExistsError`` unless ``overwrite``.
    """
    if path is None:
        frame.to_csv(sys.stdout, index=False)
        return
    write: Callable[[str], object]
    if _table_kind(path) == "parquet":
        _pyarrow("writing Parquet")

        def write(temporary: str) -> object:
            return frame.to_parquet(temporary, index=False, engine="pyarrow")

    else:

        def write(temporary: str) -> object:
            return frame.to_csv(temporary, index=False)

    write_atomically(path, write, overwrite=overwrite, allow="--force")


def check_out(out: str, inputs: Sequence[str], *, force: bool, model: bool = False) -> None:
    """Refuse ``--out`` before any work: an input file (even with ``force``), an unknown
    suffix (a model file if ``model``, else a table), a missing or read-only folder, an
    existing file without ``force``."""
    for source in inputs:
        if _same_file(out, source):
            raise ValueError(
                f"--out {out!r} is the input file {source!r}: writing there would destroy it, "
                "even with --force; choose another path"
            )
    suffix = Path(out).suffix.lower()
    if model and suffix not in MODEL_SUFFIXES:
        raise ValueError(
            f"--out {out!r}: unknown model file type {suffix!r}; use {' or '.join(MODEL_SUFFIXES)}"
        )
    if not model and _table_kind(out, "--out ") == "parquet":
        _pyarrow("writing Parquet")
    check_destination(out, overwrite=force, allow="--force")


def _table_kind(path: str, label: str = "") -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{label}{path!r}: unknown file type {suffix!r}; use .csv or .parquet")
    return TABLE_SUFFIXES[suffix]


def _pyarrow(purpose: str) -> None:
    import_extra("pyarrow", purpose=purpose, package="pyarrow", extra="parquet")


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (through links and ``..`` too)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _key_value(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a Python literal (``layers=6``, ``hidden=(64,64)``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parser() -> argparse.ArgumentParser:
    """The command-line parser; ``--flow`` offers the families a density estimator takes."""
    families = ["auto", *density_families()]
    force = "replace --out if it exists (an input file is never replaced)"
    top = argparse.ArgumentParser(
        prog="pyroflows", description="Normalizing-flow densities of tables, and a demo."
    )
    commands = top.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a flow density to a CSV or Parquet table")
    fit.add_argument("data", help="a .csv or .parquet file, one row per observation")
    fit.add_argument("--flow", default="auto", choices=families)
    fit.add_argument(
        "--out", required=True, help="where to write the fitted model (.pt), checked first"
    )
    fit.add_argument("--force", action="store_true", help=force)
    fit.add_argument("--epochs", type=int, default=1000, help="most epochs (early stopping)")
    fit.add_argument("--batch-size", type=int, default=None)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--patience", type=int, default=30)
    fit.add_argument("--seed", type=int, default=None)
    fit.add_argument(
        "--objective",
        default="likelihood",
        choices=OBJECTIVES,
        help="maximum likelihood (every family) or flow matching (--flow cnf)",
    )
    fit.add_argument(
        "--coupling",
        default="independent",
        choices=COUPLINGS,
        help="flow matching: base draws and rows paired at random, or by minibatch OT",
    )
    fit.add_argument(
        "-o",
        "--option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a flow option, e.g. -o layers=6 -o hidden=(64,64)",
    )
    fit.add_argument(
        "--support",
        type=_key_value,
        action="append",
        default=[],
        metavar="COLUMN=SUPPORT",
        help="a column's support: real, positive or (low,high), e.g. --support age=(0,120)",
    )
    fit.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cuda (under torchrun: each process its cuda:LOCAL_RANK)",
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = commands.add_parser("sample", help="draw rows from a fitted model")
    sample.add_argument("model", help="a model written by 'pyroflows fit'")
    sample.add_argument("-n", type=int, required=True, help="how many rows")
    sample.add_argument("--seed", type=int, default=None)
    sample.add_argument("--out", default=None, help=".csv or .parquet file (default: stdout)")
    sample.add_argument("--force", action="store_true", help=force)

    score = commands.add_parser("score", help="log-likelihood of each row of a table")
    score.add_argument("model", help="a model written by 'pyroflows fit'")
    score.add_argument("data", help="a .csv or .parquet file with the fitted columns")
    score.add_argument("--out", default=None, help=".csv or .parquet file (default: stdout)")
    score.add_argument("--force", action="store_true", help=force)

    demo = commands.add_parser(
        "demo",
        help="the main job: a flow density of a bundled real table against two baselines",
        description="Fit a flow density to scikit-learn's breast cancer table (30 columns) on "
        "80%% of the rows; print its held-out log-likelihood beside a Gaussian's and a "
        "Gaussian mixture's, and write figures of samples against data and of the loss. "
        "Needs the demo extra: pip install 'pyroflows[demo]'.",
    )
    demo.add_argument("--flow", default="auto", choices=families)
    demo.add_argument("--epochs", type=int, default=1000, help="most epochs (early stopping)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--out", default="pyroflows-demo", help="folder for the figures (replaced there)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv``; return the exit status (1 with a message on bad input).

    Bad input, a file that cannot be read or written, an existing ``--out`` without
    ``--force`` and a missing extra are each reported as one line on stderr.
    """
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as error:
        print(f"pyroflows {args.command}: error: {error}", file=sys.stderr)
        return 1


def _fit(args: argparse.Namespace) -> int:
    rank, device = _join_processes(args.device)
    check_out(args.out, [args.data], force=args.force, model=True)
    if _table_kind(args.data) == "parquet":  # streamed, never read whole
        _pyarrow("reading Parquet")
        if not Path(args.data).exists():
            raise FileNotFoundError(f"no such file or folder: {args.data!r}")
        data, rows = args.data, ParquetRows(args.data).rows
    else:
        data = read_table(args.data)
        rows = len(data)
    estimator = DensityEstimator(
        args.flow,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        objective=args.objective,
        coupling=args.coupling,
        progress=not args.quiet and rank == 0,
        support=dict(args.support),
        device=device,
        **dict(args.option),
    )
    history = estimator.fit(data)
    if rank != 0:  # only the first process writes; the others hold the same model
        return 0
    try:
        estimator.save(args.out, overwrite=args.force)
    except FileExistsError:
        raise FileExistsError(
            f"{args.out!r} was created while fitting; pass --force to replace it"
        ) from None
    chosen = estimator.report.index[estimator.report["chosen"]][0]
    unit = "nats per row" if args.objective == "likelihood" else "(flow matching)"
    print(
        f"fitted {estimator.flow_family} to {rows} rows x {len(estimator.columns)} columns "
        f"in {len(history)} "
        f"epochs; best validation loss {history['valid_loss'].min():.4f} {unit}; "
        f"the model is the {chosen}; wrote {args.out}\n\n"
        f"validation log-likelihood, nats per row:\n{estimator.summary().to_string()}\n\n"
        f"column supports:\n{estimator.supports().to_string(index=False)}",
        file=sys.stderr,
    )
    return 0


def _join_processes(device: str) -> tuple[int, str]:
    """Under ``torchrun`` (its ``WORLD_SIZE`` above 1 in the environment): join the
    process group (nccl on CUDA, else gloo) and return this process's rank and device
    (``cuda:LOCAL_RANK`` for CUDA); else ``(0, device)``."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), device


def _sample(args: argparse.Namespace) -> int:
    import torch

    if args.out is not None:
        check_out(args.out, [args.model], force=args.force)
    estimator = DensityEstimator.load(args.model)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    samples = estimator.sample(args.n)
    write_table(pd.DataFrame(samples, columns=estimator.columns), args.out, overwrite=args.force)
    return 0


def _score(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out(args.out, [args.model, args.data], force=args.force)
    estimator = DensityEstimator.load(args.model)
    scores = estimator.log_prob(read_table(args.data))
    write_table(pd.DataFrame({"log_prob": scores}), args.out, overwrite=args.force)
    print(
        f"mean log-likelihood {scores.mean():.4f} nats per row ({len(scores)} rows)",
        file=sys.stderr,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pyroflows.demo import run_demo

    result = run_demo(
        args.flow, out=args.out, seed=args.seed, epochs=args.epochs, progress=not args.quiet
    )
    print(f"breast cancer table (scikit-learn): 30 columns, {result.test_rows} held-out rows")
    print("held-out log-likelihood, nats per row in the data's units (higher is better):")
    print(f"  pyroflows {result.flow:<22s} {result.flow_loglik:9.3f}  ({result.epochs} epochs)")
    print(f"  {'Gaussian (full covariance)':<32s} {result.gaussian_loglik:9.3f}")
    mixture = f"Gaussian mixture ({result.mixture_components} comp.)"
    print(f"  {mixture:<32s} {result.mixture_loglik:9.3f}")
    print("figures: " + ", ".join(str(path) for path in result.figures))
    return 0


COMMANDS = {"fit": _fit, "sample": _sample, "score": _score, "demo": _demo}
