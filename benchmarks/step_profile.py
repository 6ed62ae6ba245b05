"""Where a training step's time goes: pyroflows beside Pyro and zuko, operator by operator.

Builds the contenders of ``benchmarks/throughput.py`` (same architecture, same step
function), runs warm-up steps, then profiles ``--steps`` steps of each with
:mod:`torch.profiler` and prints, per contender, the total time, the number of operators
dispatched, and the operators that took the most time (self CPU time). It answers why a
family is faster or slower than a peer in eager mode: the matrix products are the same in
every library, so a gap is in the elementwise work and in the count of small operators.

    python benchmarks/step_profile.py [--family realnvp] [--dim 64] [--batch 4096]
"""

from __future__ import annotations

import argparse

import torch
from throughput import CONTENDERS, Config, Settings, Trial
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="realnvp", choices=list(CONTENDERS))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = Settings(device="cpu", rows=args.batch * args.steps, repeats=1, warmup=3, seed=0)
    config = Config(args.family, args.dim, False, (args.batch,), settings)
    pool = torch.randn(65536, args.dim)
    for contender in CONTENDERS[args.family]:
        if contender.sequential:
            continue
        trial = Trial(contender, config, torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        trial.run(pool, args.batch, 3, generator)
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            trial.run(pool, args.batch, args.steps, generator)
        events = recorded.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
        count = sum(e.count for e in events) / args.steps
        print(
            f"\n### {contender.column}: {total:.1f} ms a step, {count:.0f} operators a step "
            f"({args.family}, dim {args.dim}, batch {args.batch}, {args.threads} threads)\n"
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
