"""One reduction step's merge folded into the next block's add + RMSNorm, against merging first (stand-alone).

    PYTHONPATH=src python benchmarks/merge_norm.py [--threads 2] [--batch 8] [--dim 384] [--r 11]
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824 \\
        PYTHONPATH=src python benchmarks/merge_norm.py      # the same without the allocator's page faults

An R-MeeTo step (r tokens of L = 197 merged, Vim-S width, batch 8) on random streams, then the block's
first op, four ways (median of ``--reps`` calls each): the plain add + RMSNorm on already reduced rows, the
eager merge of both streams followed by it (what the reducer did before), the fused kernel, and the plain
kernel on all L rows. Writes JSON (default benchmarks/results/merge_norm.json). docs/performance.md says
why the two allocator settings give very different stand-alone numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from vimtr.cli import tune_cpu_threads

tune_cpu_threads()  # GOMP_SPINCOUNT as the CLI sets it, before torch loads libgomp

import torch  # noqa: E402

import vimtr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import machine, write  # noqa: E402


def median_us(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None):
    from vimtr.ops.cpu import add_rms_norm_cpu
    from vimtr.reduction.merge import _FlatPlan, bipartite_plan, row_map

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--r", type=int, default=11)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", help="JSON path (default benchmarks/results/merge_norm.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, L, D, c = args.batch, args.length, args.dim, args.length // 2
    hidden, residual, w = torch.randn(B, L, D), torch.randn(B, L, D), torch.rand(D)
    plan = bipartite_plan(hidden, args.r, cls_index=c, length=L, metric_has_cls=True)
    merge = row_map(_FlatPlan.of(plan, c, B, L, "cpu"), torch.ones(B, L, 1), residual)
    h_red, r_red = merge.apply(hidden), merge.apply(residual)
    cases = {
        "norm_on_reduced_rows": lambda: add_rms_norm_cpu(h_red, r_red, w, 1e-5),
        "eager_merge_then_norm": lambda: add_rms_norm_cpu(merge.apply(hidden), merge.apply(residual), w, 1e-5),
        "fused_merge_norm": lambda: add_rms_norm_cpu(hidden, residual, w, 1e-5, row_map=merge),
        "norm_on_all_rows": lambda: add_rms_norm_cpu(hidden, residual, w, 1e-5),
    }
    rec = {"benchmark": "merge_norm", "machine": machine(), "batch": B, "length": L, "dim": D, "r": args.r,
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "median_us": {}}
    for name, fn in cases.items():
        rec["median_us"][name] = median_us(fn, args.reps)
        print(f"{name:24s} {rec['median_us'][name]:8.0f} µs")
    print(f"wrote {write(rec, args.out, 'merge_norm')}")


if __name__ == "__main__":
    sys.exit(main())
