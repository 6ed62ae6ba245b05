"""The ``pyroflows`` console script (also ``python -m pyroflows``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pyroflows.registry import list_flows


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; return the exit status."""
    parser = argparse.ArgumentParser(prog="pyroflows", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="fit a flow to a bundled real table and print held-out log-likelihoods",
        description="Fit a flow to two columns of scikit-learn's breast cancer table and "
        "compare its held-out log-likelihood with a Gaussian's.",
    )
    demo.add_argument("--flow", default="realnvp", choices=list_flows())
    demo.add_argument("--epochs", type=int, default=1000, help="most epochs (early stopping)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from pyroflows.demo import COLUMNS, run_demo

        result = run_demo(args.flow, seed=args.seed, epochs=args.epochs, progress=not args.quiet)
        print(f"breast cancer table, columns {COLUMNS}, {result.test_rows} held-out rows")
        print("held-out log-likelihood (nats per row, data units; higher is better):")
        print(f"  {result.flow:<10s} {result.flow_loglik:9.4f}  ({result.epochs} epochs)")
        print(f"  {'gaussian':<10s} {result.gaussian_loglik:9.4f}")
    return 0
