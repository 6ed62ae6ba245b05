"""Peak memory of streaming a Parquet file larger than the shuffle buffer.

Writes a synthetic file of ``--rows`` x ``--columns`` float64 normal numbers, one row group
at a time (never the whole table in memory), then, in a fresh process, runs
:meth:`ParquetRows.scan` and one full epoch of :meth:`ParquetRows.batches` (or, with
``--estimator``, ``DensityEstimator(flow="realnvp", epochs=1, select=False).fit(path)``),
and prints its peak resident memory (``getrusage``'s ``ru_maxrss``) beside the file's size
and the buffer's, and the rows per second of each pass.

    python benchmarks/parquet_rss.py                   # ~1.5 GB of values: 23.4M x 8
    python benchmarks/parquet_rss.py --rows 2e6        # a quick run
    python benchmarks/parquet_rss.py --rows 2e6 --estimator

The memory the streaming reader needs is the buffer, a record batch, pyarrow's decoding of
a row group and the scan's validation and start frames; the "over the imports" line is the
peak less what the process held once torch, pyro and pyarrow were imported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def write(path: str, rows: int, columns: int, row_group: int, seed: int = 0) -> None:
    """A Parquet file of ``rows`` x ``columns`` normal numbers, written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    names = [f"x{j}" for j in range(columns)]
    schema = pa.schema([(name, pa.float64()) for name in names])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            block = rng.normal(size=(min(row_group, rows - start), columns))
            writer.write_table(pa.table(dict(zip(names, block.T))), row_group_size=row_group)


def peak_rss() -> int:
    """The peak resident memory of this process so far, in bytes (Linux: KiB reported)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> dict:
    """Run in the fresh process: the measured work, and what it cost."""
    import pyarrow.parquet  # noqa: F401  (counted in the baseline, as torch is)
    import torch  # noqa: F401

    from pyroflows.density.streaming import ParquetRows

    baseline = peak_rss()
    started = time.perf_counter()
    if args.estimator:
        from pyroflows import DensityEstimator

        model = DensityEstimator(flow="realnvp", epochs=1, select=False, progress=False)
        model.fit(args.path)
        return {"baseline": baseline, "peak": peak_rss(), "fit_s": time.perf_counter() - started}
    data = ParquetRows(args.path)
    scan = data.scan(validation=0.1)
    scanned = time.perf_counter()
    steps = data.steps_per_epoch(scan, args.batch)
    rows = 0
    for batch in data.batches(
        0, args.batch, steps, fraction=scan.fraction, buffer_rows=args.buffer
    ):
        rows += len(batch)
    done = time.perf_counter()
    return {
        "baseline": baseline,
        "peak": peak_rss(),
        "scan_rows_s": data.rows / (scanned - started),
        "epoch_rows_s": rows / (done - scanned),
        "epoch_rows": rows,
        "valid_rows": len(scan.valid),
        "sample_rows": len(scan.sample),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=1.5e9 / 64, help="rows (default 23.4M)")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--row-group", type=int, default=65_536, help="rows per row group")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--buffer", type=int, default=262_144, help="shuffle buffer rows")
    parser.add_argument("--path", default=None, help="the file (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--estimator", action="store_true", help="fit DensityEstimator")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    folder = None
    if args.path is None:
        folder = tempfile.mkdtemp(prefix="parquet_rss_")
        args.path = os.path.join(folder, "rows.parquet")
    rows = int(args.rows)
    try:
        started = time.perf_counter()
        write(args.path, rows, args.columns, args.row_group)
        print(f"wrote {rows:,} x {args.columns} in {time.perf_counter() - started:.0f} s")
        command = [sys.executable, __file__, "--child", "--path", args.path]
        command += ["--batch", str(args.batch), "--buffer", str(args.buffer)]
        command += ["--estimator"] if args.estimator else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        report(args, rows, os.path.getsize(args.path), result)
    finally:
        if folder is not None and not args.keep:
            os.remove(args.path)
            os.rmdir(folder)


def report(args: argparse.Namespace, rows: int, size: int, result: dict) -> None:
    mib = 2**20
    lines = [
        ("data", f"{rows:,} rows x {args.columns} float64, row groups of {args.row_group:,}"),
        ("values", f"{rows * args.columns * 8 / mib:,.0f} MiB"),
        ("file on disk", f"{size / mib:,.0f} MiB"),
        (
            "shuffle buffer",
            f"{args.buffer:,} rows = {args.buffer * args.columns * 8 / mib:.0f} MiB",
        ),
        ("peak RSS", f"{result['peak'] / mib:,.0f} MiB"),
        ("after imports", f"{result['baseline'] / mib:,.0f} MiB"),
        ("over the imports", f"{(result['peak'] - result['baseline']) / mib:,.0f} MiB"),
    ]
    if args.estimator:
        lines.append(("fit", f"{result['fit_s']:.0f} s"))
    else:
        lines += [
            ("scan", f"{result['scan_rows_s'] / 1e6:.2f} M rows/s"),
            ("epoch", f"{result['epoch_rows_s'] / 1e6:.2f} M rows/s, batches of {args.batch}"),
            ("rows held", f"{result['valid_rows']:,} validation, {result['sample_rows']:,} start"),
        ]
    print("\n| measure | value |\n|---|---|")
    for measure, value in lines:
        print(f"| {measure} | {value} |")


if __name__ == "__main__":
    main()
