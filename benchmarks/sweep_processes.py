"""The demo's sweep in one process (all threads) against one one-thread process per core, taking turns.

    PYTHONPATH=src python benchmarks/sweep_processes.py [--pairs 2] [--out FILE.json]

The sweep is ``vimtr demo``'s: the bundled model, the six training-free methods at 10-40% fewer FLOPs,
``random`` over 5 seeds (41 evaluations of the 360 test images). Each pair runs ``sweep(processes=1)``
then ``sweep(processes=N)`` (N = one per core, at most 2); wall seconds include starting the processes.
Also checks that both give the same accuracies. Writes JSON (default benchmarks/results/sweep_processes.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vimtr.cli import tune_cpu_threads

tune_cpu_threads()  # GOMP_SPINCOUNT as the CLI sets it, before torch loads libgomp

import vimtr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    from vimtr.data import digits
    from vimtr.engine.distributed import cpu_workers
    from vimtr.io import write_json
    from vimtr.tools import sweep
    from vimtr.tools.demo import METHODS, SCHEDULE, SWEEP_PROCESSES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "sweep_processes.json")
    args = p.parse_args(argv)

    model = vimtr.load_model("vim_digits").eval()
    test = digits.digits_dataset("test")
    processes = cpu_workers(SWEEP_PROCESSES)
    levels = (0.1, 0.2, 0.3, 0.4)
    seconds, top1 = {1: [], processes: []}, {}
    for _ in range(args.pairs):
        for n in (1, processes):
            t0 = time.perf_counter()
            rows = sweep.sweep(model, test, METHODS, levels, progress=False, params=SCHEDULE, processes=n)
            seconds[n].append(time.perf_counter() - t0)
            top1[n] = [r["top1"] for r in rows]
            print(f"processes={n}: {seconds[n][-1]:.1f} s", flush=True)
    evaluations = 1 + len(levels) * sum(sweep.RANDOM_SEEDS if m == "random" else 1 for m in METHODS)
    result = {"machine": machine(), "evaluations": evaluations, "processes": processes,
              "seconds": {str(n): s for n, s in seconds.items()},
              "speedup_min": min(seconds[1]) / min(seconds[processes]),
              "same_accuracies": top1[1] == top1[processes]}
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
